"""
Does thinking help? `uv run eval.py checkpoint=out_ebt/final.pt` answers on the val split with
numbers.

Every val character is scored once (non-overlapping windows of block_size; the tail shorter than a
window is left out), so two runs of the same checkpoint print the same figures. The windows are
dealt into a tune slice (every 5th window: it only chooses temperatures) and a report slice (the
rest: every figure below). Parts, each a top-level key of eval.json (written next to the
checkpoint):

  think_sweep          val loss, bits per char and time per token for think_steps in `sweep`
  temperature_control  System 1 at its best temperature beside thinking: a gain that is only
                       temperature shows as such
  self_verification    think_samples M in `samples`: M starts, keep the lowest free energy F or
                       energy E (the model's verify_by, and the other); random_start_chosen is the
                       share of tokens whose kept start is not the model's start
  exact_verifier       the energy of every one-hot candidate, softmax(-E / T*): how good the energy
                       is, apart from how well descent finds its minimum
  uncertainty          how well a token's final energy (and its gap to the exact minimum) predicts
                       its loss and whether its argmax is wrong
  adaptive             stop a token's thinking once its free energy changes by less than epsilon
  ood                  the sweep on text unlike the training data: the README, and val with
                       `corrupt` of its input characters substituted (the targets stay the clean
                       text's next characters)
  chains               the contrastive chains (contrastive.sample_chains) after k steps for k in
                       `chain_steps`: mean KL(q_k || softmax(-E(x, v) / T)), how far each kind's
                       negatives are from the model's own distribution (cd starts at the data, pcd
                       and fast_pcd at noise; fast_pcd with the fast weights of a ckpt.pt, when
                       given one)

Standard errors (`se` of a mean loss, `delta_se` of a paired difference) come from a bootstrap over
windows: neighbouring characters' losses are correlated, so the per-character std / sqrt(N) would
understate them. The windows are resampled with replacement BOOTSTRAP = 1000 times by a seeded
generator (the same figures every run), and the standard deviation of the resampled means is the
standard error. Differences between settings are paired (the same tokens): a pair's difference is
resampled window by window, so both members always see the same windows. A gain smaller than two of
its delta_se is noise.
"""

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from torch.nn import functional as F

from contrastive import chain_energy, chain_start, chain_temperature, sample_chains
from data import load_text, resolve_path, train_val_split
from ebm import (free_energy, make_energy, observe, self_verify, step_rule, system1_logits,
                 system2_logits, think_start)
from energies import Product, onehot_energies
from checkpoints import load_checkpoint, load_experts, load_model
from util import UserError, bootstrap_means, check_overrides, pick_device, run, sync


@dataclass
class EvalConfig:
    checkpoint: str = "out_ebt/final.pt"
    # a product of these checkpoints instead (only its losses)
    experts: List[str] = field(default_factory=list)
    # one weight per expert (empty: 1 each)
    expert_weights: List[float] = field(default_factory=list)
    # K for the parts that think once (default: the model's think_steps)
    think_steps: Optional[int] = None
    sweep: List[int] = field(default_factory=lambda: [0, 1, 2, 4, 8, 16])
    samples: List[int] = field(default_factory=lambda: [1, 2, 4, 8])
    epsilons: List[float] = field(default_factory=lambda: [0.1, 0.03, 0.01, 0.003])
    ood_text: str = "README.md"  # relative paths: the working directory, else the repo root
    corrupt: float = 0.05  # fraction of val characters substituted at random for the corrupted copy
    # the chains part's k ([] = skip)
    chain_steps: List[int] = field(default_factory=lambda: [0, 1, 2, 4, 8, 16])
    # the chains' step (default: the model's langevin_step_size)
    chain_step_size: Optional[float] = None
    max_tokens: int = 0  # score at most this many val tokens (0 = the whole val split)
    batch_size: int = 64  # windows per forward pass
    seed: int = 1337  # self-verification's random starts and the corruption
    device: str = "auto"


ConfigStore.instance().store(name="eval_schema", node=EvalConfig)

LN2 = math.log(2)
BOOTSTRAP = 1000  # resamples of windows behind every standard error

# --------------------------------------------------------------------------------------------------
# metrics on plain tensors (tests/test_eval.py checks each on cases with known answers)


def ce(z, y):
    """Per-token cross-entropy (N,) of logits z (N, V) for targets y (N,)."""
    return F.cross_entropy(z.double(), y, reduction="none")


def bootstrap_se(window_means, resamples=BOOTSTRAP, seed=0):
    """Standard error of the mean of window_means (n,): the std of the means of `resamples` draws of
    n windows with replacement. Seeded, so the same data always gives the same figure."""
    return bootstrap_means(window_means, resamples, seed).std().item()


def summary(losses, base=None):
    """Mean loss, bits per char and its standard error of per-character losses (n_windows, T) (1-D:
    windows of one character); with base (the same characters), the paired difference and its
    standard error. Windows, not characters, are resampled: all windows have T characters, so a
    resample's mean loss is the mean of its window means."""
    losses = losses.double().view(losses.size(0), -1)
    out = {"loss": losses.mean().item(), "bits_per_char": losses.mean().item() / LN2,
           "se": bootstrap_se(losses.mean(1))}
    if base is not None:
        diff = losses - base.double().view_as(losses)  # paired: the same windows for both members
        out["delta"] = diff.mean().item()
        out["delta_se"] = bootstrap_se(diff.mean(1))
    return out


def best_temperature(z, y, lo=1e-4, hi=1e4, iters=100):
    """The temperature T minimising mean CE(z / T): golden-section search on log T. CE is convex in
    1/T (a log-sum-exp of a linear function of 1/T), so it has one minimum and the search finds it.
    The range is wide because energies need not be on the logits' scale: an EBT's one-hot energies
    differ by ~0.01."""
    def loss(log_t):
        return ce(z.double() / math.exp(log_t), y).mean().item()  # float64: T is found to ~1e-8

    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    return math.exp((a + b) / 2)


def ranks(x):
    """Ranks 1..N of x, ties sharing their mean rank."""
    x = x.double()
    order = x.argsort()
    r = torch.empty_like(x)
    r[order] = torch.arange(1, x.numel() + 1, dtype=x.dtype)
    # average the ranks within each group of equal values
    uniq, inverse = x.unique(return_inverse=True)
    total = torch.zeros(uniq.numel(), dtype=x.dtype).index_add_(0, inverse, r)
    count = torch.zeros(uniq.numel(), dtype=x.dtype).index_add_(0, inverse, torch.ones_like(r))
    return (total / count)[inverse]


def pearson(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return ((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300)).item()


def spearman(a, b):
    return pearson(ranks(a), ranks(b))


def auroc(score, positive):
    """P(score of a random positive > score of a random negative), ties counting 1/2 (Mann-Whitney
    U)."""
    positive = positive.bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = ranks(score)
    return ((r[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def as_uncertainty(score, losses, wrong):
    return {"pearson": pearson(score, losses), "spearman": spearman(score, losses),
            "auroc": auroc(score, wrong)}


# --------------------------------------------------------------------------------------------------
# running the model over windows


def windows(ids, block_size, max_tokens=0):
    """Non-overlapping windows x (N, T) of ids and their next tokens y (N, T); every id scored
    once."""
    n = (len(ids) - 1) // block_size
    if max_tokens:
        n = min(n, max(1, max_tokens // block_size))
    if n < 1:
        raise UserError(f"the text has {len(ids)} characters, fewer than one window of "
                        f"{block_size + 1}")
    x = ids[: n * block_size].view(n, block_size)
    y = ids[1 : n * block_size + 1].view(n, block_size)
    return x, y


def val_windows(ckpt_cfg, vocab, block_size, max_tokens):
    """The val windows x, y (N, T) of the run's text, and which of them form the tune slice (every
    5th)."""
    ids = torch.tensor(vocab.encode(load_text(ckpt_cfg["data"]["data_path"])), dtype=torch.long)
    x, y = windows(train_val_split(ids)[1], block_size, max_tokens)
    tune = torch.arange(x.size(0)) % 5 == 0
    if tune.all():
        raise UserError("the val split is too short for a tune and a report slice: "
                        "raise max_tokens")
    return x, y, tune


@dataclass
class Pass:
    """One timed pass of a Runner: System 1 and thinking logits (N, V), seconds per token, the start
    that self-verification kept per token (N,) (0 = the System 1 start), and optionally the energy
    E(p_K) and free energy F(z_K) (N,) of each thinking output."""
    z0: torch.Tensor
    zk: torch.Tensor
    seconds: float
    chosen: torch.Tensor
    energy: Optional[torch.Tensor] = None
    free: Optional[torch.Tensor] = None


class Runner:
    """Forward passes over fixed windows, in batches, timed; what each think setting costs per
    token."""

    def __init__(self, model, x, y, batch_size, device, seed=1337):
        self.model, self.x, self.y, self.bs = model, x, y, batch_size
        self.device, self.seed = device, seed
        self.targets = y.reshape(-1)
        self.tokens = y.numel()

    def losses(self, z):
        """Per-character cross-entropy of logits z (N, V), by window: (n_windows, T), as summary
        takes it."""
        return ce(z, self.targets).view(self.y.shape)

    def batches(self):
        for i in range(0, self.x.size(0), self.bs):
            yield self.x[i : i + self.bs].to(self.device)

    def warm_up(self, steps, starts):
        """One untimed batch first, so that one-time costs (allocator, kernels) do not land in the
        timing."""
        h, e, caches = observe(self.model, self.x[: self.bs].to(self.device))
        self_verify(self.model, e, make_energy(self.model, h, e, caches), steps, starts)

    def logits(self, steps, starts=1, energies=False, verify_by=None):
        """A Pass over every window with `steps` think steps and `starts` starts (self-verification,
        ranked by verify_by, default the model's); energies: with E and F."""
        z0s, zks, chosen, Es, Fs = [], [], [], [], []
        self.warm_up(steps, starts)
        # random starts (self-verification, think_start=noise): the same every run
        torch.manual_seed(self.seed)
        sync(self.device)
        t0 = time.perf_counter()
        for x in self.batches():
            h, e, caches = observe(self.model, x)
            energy = make_energy(self.model, h, e, caches)
            zs, kept = self_verify(self.model, e, energy, steps, starts, verify_by)
            z0s.append(zs[0].flatten(0, 1).float().cpu())
            zks.append(zs[-1].flatten(0, 1).float().cpu())
            chosen.append(kept.flatten().cpu())
            if energies:
                E, free = free_energy(zs[-1], energy, self.model.config.entropy_weight)
                Es.append(E.detach().flatten().cpu())
                Fs.append(free.detach().flatten().cpu())
        sync(self.device)
        out = Pass(torch.cat(z0s), torch.cat(zks), (time.perf_counter() - t0) / self.tokens,
                   torch.cat(chosen))
        if energies:
            out.energy, out.free = torch.cat(Es), torch.cat(Fs)
        return out

    def onehot_energies(self):
        """The exact verifier: E(x, onehot(v)) of every token v at every position, (N, V)."""
        out = []
        for x in self.batches():
            h, e, caches = observe(self.model, x)
            out.append(onehot_energies(self.model, h, e, caches).flatten(0, 1).float().cpu())
        return torch.cat(out)

    def chain_kl(self, steps_list, kinds, step_size=None):
        """KL(q_k || softmax(-E(x, v) / T)) (n_windows, T) of the contrastive chains after each k in
        steps_list, T the model's softmax temperature, for each kind {name: (start, fast_weight)}
        (start: data or noise): {name: {k: KL}}. The target is computed once per batch; every kind
        draws the same noise."""
        kls = {name: {k: [] for k in steps_list} for name in kinds}
        for i, x in enumerate(self.batches()):
            h, e, caches = observe(self.model, x)
            y = self.y[i * self.bs : i * self.bs + x.size(0)].to(self.device)
            target = F.log_softmax(-onehot_energies(self.model, h, e,
                                                    caches) / self.model.config.softmax_temperature,
                                   -1)
            for name, (start, fast_weight) in kinds.items():
                torch.manual_seed(self.seed + i)
                z = chain_start(self.model.config, e, y, start)
                energy = chain_energy(self.model, h, e, caches, fast_weight)
                zs = sample_chains(self.model.config, z, energy, max(steps_list), step_size)
                for k in steps_list:
                    logq = F.log_softmax(zs[k], -1)
                    kls[name][k].append((logq.exp() * (logq - target)).sum(-1).double().cpu())
        return {name: {k: torch.cat(v) for k, v in by_k.items()} for name, by_k in kls.items()}

    def sweep(self, steps_list, tuner=None):
        """Loss of the prediction after K think steps for each K, paired against K = 0. With a tuner
        (the tune slice), also at each K's own best temperature, paired against the model's trained
        K (else the first K) at its best temperature: more thinking must beat the trained thinking
        sharpened or softened the cheap way, not only raw."""
        rows, base, tuned = [], None, {}
        for k in steps_list:
            run = self.logits(k)
            if base is None:
                base = self.losses(run.z0)  # System 1 is the prediction at K = 0
            rows.append({"think_steps": k, **summary(self.losses(run.zk), base),
                         "us_per_token": 1e6 * run.seconds})
            if tuner is not None:
                tune_zk = tuner.logits(k).zk
                rows[-1]["temperature"] = best_temperature(tune_zk, tuner.targets)
                tuned[k] = self.losses(run.zk / rows[-1]["temperature"])
                # every window, both slices: the figure other code scores on the same characters
                # would give
                both = torch.cat([self.losses(run.zk).flatten(), tuner.losses(tune_zk).flatten()])
                rows[-1]["loss_all_windows"] = both.mean().item()
        trained = self.model.config.think_steps
        ref = trained if trained in tuned else steps_list[0]
        if tuned:
            for row in rows:
                row["at_temperature"] = {"vs_think_steps": ref, **summary(tuned[row["think_steps"]],
                                                                          tuned[ref])}
        return rows

    def adaptive(self, max_steps, eps):
        """Think at most max_steps; a token stops once a step changes its free energy by less than
        eps. Returns its logits (N, V) and the steps each token used (N,). Stopped tokens are
        masked, not removed, so this measures steps, not wall time."""
        cfg = self.model.config
        zks, used = [], []
        torch.manual_seed(self.seed)
        for x in self.batches():
            h, e, caches = observe(self.model, x)
            energy = make_energy(self.model, h, e, caches)

            def free(z):
                return free_energy(z, energy, cfg.entropy_weight)[1]

            z = think_start(cfg, system1_logits(self.model, e))
            step = step_rule(self.model, z)
            f = free(z)
            steps = torch.zeros(z.shape[:-1], device=z.device)
            active = torch.ones(z.shape[:-1], dtype=torch.bool, device=z.device)
            for k in range(max_steps):
                z_next = step(z, energy, k)
                f_next = free(z_next)
                z = torch.where(active.unsqueeze(-1), z_next, z)
                steps += active
                active &= (f_next - f).abs() >= eps
                f = f_next
                if not active.any():
                    break
            zks.append(z.flatten(0, 1).float().cpu())
            used.append(steps.flatten().cpu())
        return torch.cat(zks).detach(), torch.cat(used)


# --------------------------------------------------------------------------------------------------
# the report


def corrupt_ids(ids, rate, vocab_size, generator):
    """A copy of ids with a fraction `rate` of positions replaced by a different, uniformly drawn
    id."""
    hit = torch.rand(ids.shape, generator=generator) < rate
    shift = torch.randint(1, vocab_size, ids.shape, generator=generator)  # never the same id again
    return torch.where(hit, (ids + shift) % vocab_size, ids)


def temperature_part(report, tuner, K):
    """System 1 and thinking (K steps), each also at the temperature that is best on the tune slice.
    Returns the part, the report's thinking Pass (with energies) and its System 1 and thinking
    losses."""
    tuned = tuner.logits(K)
    t1, t2 = best_temperature(tuned.z0, tuner.targets), best_temperature(tuned.zk, tuner.targets)
    thought = report.logits(K, energies=True)
    s1, s2 = report.losses(thought.z0), report.losses(thought.zk)
    s1_t, s2_t = report.losses(thought.z0 / t1), report.losses(thought.zk / t2)
    part = {"think_steps": K, "s1": summary(s1), "s2": summary(s2, s1),
            "s1_temperature": t1, "s1_at_temperature": summary(s1_t, s1),
            "s2_temperature": t2, "s2_at_temperature": summary(s2_t, s1_t)}
    return part, thought, s1, s2


def self_verification_part(report, K, samples, seed, s2):
    """One row per M in samples, paired against plain thinking (s2), ranked by the model's verify_by
    and, in by_energy or by_free_energy, by the other (the same random starts); random_start_chosen
    is the share of tokens whose kept start is not start 0, the model's start (as self_verify
    reports it)."""
    rows, own = [], report.model.config.verify_by
    other = "energy" if own == "free_energy" else "free_energy"
    for m in samples:
        parts = {}
        for by in (own, other) if m > 1 else (own,):  # one start: nothing to rank
            torch.manual_seed(seed)
            run = report.logits(K, starts=m, verify_by=by)
            parts[by] = {**summary(report.losses(run.zk), s2), "us_per_token": 1e6 * run.seconds,
                         "random_start_chosen": (run.chosen != 0).double().mean().item()}
        rows.append({"samples": m, "verify_by": own, **parts[own],
                     f"by_{other}": parts.get(other, parts[own])})
    return rows


def exact_verifier_part(report, tuner, thought, s2):
    """
    The exact verifier: the energy of every one-hot candidate, E(x, onehot(v)) for all v, and the
    distribution softmax(-E / T*), T* best on the tune slice. Its loss (against thinking's), its
    accuracy beside thinking's, and how often thinking's argmax is the energy's exact argmin.
    Returns the part and min_v E per token (N,) for the uncertainty part.
    """
    E, E_tune = report.onehot_energies(), tuner.onehot_energies()  # (N, V)
    t = best_temperature(-E_tune, tuner.targets)
    exact = report.losses(-E / t)
    argmin = E.argmin(-1)
    part = {"temperature": t, **summary(exact, s2),
            "accuracy": (argmin == report.targets).double().mean().item(),
            "think_accuracy": (thought.zk.argmax(-1) == report.targets).double().mean().item(),
            "argmax_is_argmin": (thought.zk.argmax(-1) == argmin).double().mean().item()}
    return part, E.amin(-1)


def uncertainty_part(report, thought, s2, K, min_energy):
    """How well each score ranks the tokens by loss and by whether the argmax is wrong. energy_gap
    is E(p_K) - min_v E(x, v): only differences of energy are trained, not its level at a
    position."""
    wrong = thought.zk.argmax(-1) != report.targets
    s2 = s2.flatten()
    return {"think_steps": K, "error_rate": wrong.double().mean().item(),
            "energy": as_uncertainty(thought.energy, s2, wrong),
            "energy_gap": as_uncertainty(thought.energy - min_energy, s2, wrong),
            "free_energy": as_uncertainty(thought.free, s2, wrong),
            "max_prob": as_uncertainty(-F.softmax(thought.zk, -1).amax(-1), s2,
                                       wrong)}  # the usual baseline


def adaptive_part(report, max_steps, epsilons, s1):
    """One row per epsilon: adaptive thinking beside fixed thinking with its mean number of
    steps."""
    rows = []
    for eps in epsilons:
        za, used = report.adaptive(max_steps, eps)
        fixed = round(used.mean().item())
        zf = report.logits(fixed).zk
        rows.append({"epsilon": eps, "mean_steps": used.mean().item(), "max_steps": max_steps,
                     **summary(report.losses(za), s1), "fixed_steps": fixed,
                     "fixed": summary(report.losses(zf), s1)})
    return rows


def chains_part(cfg, report):
    """Mean KL of the contrastive chains to the model's own distribution after each k of
    chain_steps, for each kind of start, with bootstrap standard errors over windows."""
    m = report.model.config
    # ckpt.pt of a fast_pcd run
    fast = load_checkpoint(cfg.checkpoint).get("chains", [{}])[0].get("fast_weight")
    kinds = {"cd": ("data", None), "pcd": ("noise", None)}
    if fast is not None and fast.abs().max() > 0:
        kinds["fast_pcd"] = ("noise", fast.to(report.device))
    step = m.langevin_step_size if cfg.chain_step_size is None else cfg.chain_step_size
    part = {"step_size": step,
            "temperature": chain_temperature(m), "noise": m.langevin_noise_scale, "rows": []}
    by_kind = report.chain_kl(cfg.chain_steps, kinds, part["step_size"])
    for k in cfg.chain_steps:
        part["rows"].append({"steps": k, **{kind: {"kl": kl[k].mean().item(),
                                                   "se": bootstrap_se(kl[k].mean(1))}
                                            for kind, kl in by_kind.items()}})
    return part


def ood_part(cfg, report, val_sweep, ood_path, vocab):
    """The think sweep on val, on ood_text and on corrupted val, with the gain of each one's best
    K."""
    model, bs, device = report.model, report.model.config.block_size, report.device
    ood = ood_path.read_text(encoding="utf-8", errors="replace")
    kept = [c for c in ood if c in vocab.stoi]
    ood_runner = Runner(model, *windows(torch.tensor(vocab.encode(kept), dtype=torch.long), bs),
                        cfg.batch_size,
                        device, cfg.seed)
    # corrupted val: the report windows with a fraction `corrupt` of their INPUT characters
    # substituted. The targets stay the clean text's next characters: scoring the prediction of a
    # random substitute would punish any sharpening, i.e. bias the verdict against thinking.
    x_corrupt = corrupt_ids(report.x, cfg.corrupt, len(vocab),
                            torch.Generator().manual_seed(cfg.seed))
    corrupt_runner = Runner(model, x_corrupt, report.y, cfg.batch_size, device, cfg.seed)
    sweeps = {"val": (val_sweep, report.tokens, 0),
              "ood_text": (ood_runner.sweep(cfg.sweep), ood_runner.tokens, len(ood) - len(kept)),
              "corrupted_val": (corrupt_runner.sweep(cfg.sweep), corrupt_runner.tokens, 0)}
    part = {"ood_path": str(cfg.ood_text), "corrupt": cfg.corrupt}
    for name, (rows, tokens, dropped) in sweeps.items():
        # gain: how much the best K beats K = 0 on this text
        best = min(rows, key=lambda r: r["loss"])
        part[name] = {"tokens": tokens, "dropped_chars": dropped, "sweep": rows,
                      "best_think_steps": best["think_steps"], "gain": 0.0 - best["delta"]}
    return part


@torch.no_grad()  # the transformer energy turns gradients on for dE/dp only
def evaluate_checkpoint(cfg: EvalConfig):
    if not cfg.sweep or min(cfg.sweep) < 0 or not cfg.samples or min(cfg.samples) < 1:
        raise UserError("sweep needs think_steps >= 0 and samples >= 1, e.g. sweep=[0,1,2,4] "
                        "samples=[1,2]")
    if (min(cfg.epsilons, default=1) <= 0 or not 0 <= cfg.corrupt < 1 or cfg.batch_size < 1
            or cfg.max_tokens < 0):
        raise UserError("epsilons must be > 0, corrupt in [0, 1), batch_size >= 1 and max_tokens "
                        ">= 0")
    if min(cfg.chain_steps, default=0) < 0 or (cfg.chain_step_size is not None
                                               and cfg.chain_step_size < 0):
        raise UserError("chain_steps need k >= 0 and chain_step_size >= 0, e.g. "
                        "'chain_steps=[0,1,4]'")
    ood_path = resolve_path(cfg.ood_text)
    if not ood_path.is_file():
        raise UserError(f"ood_text={cfg.ood_text} not found: pass a text file, e.g. "
                        f"ood_text=README.md")
    device = pick_device(cfg.device, key="device")
    model, vocab, ckpt_cfg = load_model(cfg.checkpoint, device)
    mcfg = model.config
    K = mcfg.think_steps if cfg.think_steps is None else cfg.think_steps
    if K < 0:
        raise UserError(f"think_steps={K} must be >= 0")
    x, y, tune = val_windows(ckpt_cfg, vocab, mcfg.block_size, cfg.max_tokens)
    report = Runner(model, x[~tune], y[~tune], cfg.batch_size, device, cfg.seed)
    tuner = Runner(model, x[tune], y[tune], cfg.batch_size, device, cfg.seed)
    result = {"checkpoint": str(cfg.checkpoint), "energy": mcfg.energy,
              "model_think_steps": mcfg.think_steps,
              "think_steps": K, "tokens": report.tokens, "tune_tokens": tuner.tokens,
              "device": device,
              "uniform_loss": math.log(len(vocab)), "report_windows": report.x.size(0),
              "bootstrap_resamples": BOOTSTRAP}
    result["think_sweep"] = report.sweep(cfg.sweep, tuner)
    result["temperature_control"], thought, s1, s2 = temperature_part(report, tuner, K)
    result["self_verification"] = self_verification_part(report, K, cfg.samples, cfg.seed, s2)
    result["exact_verifier"], min_energy = exact_verifier_part(report, tuner, thought, s2)
    result["uncertainty"] = uncertainty_part(report, thought, s2, K, min_energy)
    result["adaptive"] = adaptive_part(report, max(cfg.sweep), cfg.epsilons, s1)
    result["ood"] = ood_part(cfg, report, result["think_sweep"], ood_path, vocab)
    if cfg.chain_steps:
        result["chains"] = chains_part(cfg, report)
    return result


# --------------------------------------------------------------------------------------------------
# a product of experts (experts=[a.pt,b.pt] expert_weights=[1,0.5]): its val loss beside each
# expert's alone


def product_logits(models, weights, x, steps, batch_size, device):
    """System 1 and thinking logits (N, V) over windows x (n, T) of the product of models at weights
    (energies.Product); one model at weight 1 is that model alone."""
    z0s, zks = [], []
    for i in range(0, x.size(0), batch_size):
        # (h, e, caches) per expert
        seen = [observe(m, x[i : i + batch_size].to(device)) for m in models]
        e, energy = Product(models, weights)([h for h, _, _ in seen], [c for _, _, c in seen])
        zs = system2_logits(models[0], e, energy, steps)
        z0s.append(zs[0].flatten(0, 1).float().cpu())
        zks.append(zs[-1].flatten(0, 1).float().cpu())
    return torch.cat(z0s), torch.cat(zks)


def product_rows(cfg, members, x, y, tune, device):
    """One row per member (name, models, weights, K): System 1 and thinking losses on the report
    slice, and thinking at its best temperature (chosen on the tune slice). Differences are paired
    against the best expert alone (the lowest thinking loss among the members of one model, which
    come first)."""
    report = y[~tune]

    def losses(z):
        return ce(z, report.flatten()).view(report.shape)

    runs = []
    for name, models, weights, K in members:
        torch.manual_seed(cfg.seed)  # random starts (think_start=noise): the same for every member
        z0, zk = product_logits(models, weights, x[~tune], K, cfg.batch_size, device)
        t = best_temperature(product_logits(models, weights, x[tune], K, cfg.batch_size, device)[1],
                             y[tune].flatten())
        runs.append((name, K, losses(z0), losses(zk), t, losses(zk / t)))
    best = min(runs[:-1], key=lambda r: r[3].mean())  # the experts alone (the product is last)
    return [{"member": name, "think_steps": K, "s1": summary(l0), "s2": summary(lk, best[3]),
             "temperature": t,
             "at_temperature": summary(lt, best[5]), "vs": best[0]} for name, K, l0, lk, t,
            lt in runs]


@torch.no_grad()  # the transformer energy turns gradients on for dE/dp only
def evaluate_product(cfg: EvalConfig):
    if cfg.batch_size < 1 or cfg.max_tokens < 0:
        raise UserError("batch_size must be >= 1 and max_tokens >= 0")
    device = pick_device(cfg.device, key="device")
    models, weights, vocab, ckpt_cfg = load_experts(cfg.experts, cfg.expert_weights, device)
    steps = [m.config.think_steps if cfg.think_steps is None else cfg.think_steps for m in models]
    if min(steps) < 0:
        raise UserError(f"think_steps={cfg.think_steps} must be >= 0")
    bs = min(m.config.block_size for m in models)  # every expert sees each whole window
    x, y, tune = val_windows(ckpt_cfg, vocab, bs, cfg.max_tokens)
    members = [(f"{path} alone", [m], [1.0], k) for path, m, k in zip(cfg.experts, models, steps)]
    # the first one's options
    members.append((f"product at weights {weights}", models, weights, steps[0]))
    return {"experts": list(cfg.experts), "expert_weights": weights, "think_steps": steps[0],
            "block_size": bs,
            "tokens": y[~tune].numel(), "tune_tokens": y[tune].numel(), "device": device,
            "uniform_loss": math.log(len(vocab)), "report_windows": int((~tune).sum()),
            "bootstrap_resamples": BOOTSTRAP, "product": product_rows(cfg, members, x, y, tune,
                                                                      device)}


def product_markdown(r):
    out = [f"# eval of a product of experts: {', '.join(r['experts'])} at weights "
           f"{r['expert_weights']}",
           f"E(x, v) = sum_i w_i E_i(x, v); System 1 z_0 = -sum_i w_i e_i / T and thinking "
           f"(K={r['think_steps']}) "
           f"with the first expert's T and options; {r['tokens']} val tokens reported in windows "
           f"of "
           f"{r['block_size']} (the smallest block_size), {r['tune_tokens']} for tuning "
           f"temperatures; device "
           f"{r['device']}; losses in nats (uniform: {r['uniform_loss']:.4f}); ± is one bootstrap "
           f"standard error "
           f"({r['bootstrap_resamples']} resamples of {r['report_windows']} windows); only the "
           f"loss parts of "
           "eval.py are run for a product", "",
           f"| member | think_steps | System 1 | thinking | vs {r['product'][0]['vs']} | best T | "
           f"thinking at "
           f"best T | vs {r['product'][0]['vs']} at its best T |", "|---" * 8 + "|"]
    for row in r["product"]:
        out.append(f"| {row['member']} | {row['think_steps']} | {num(row['s1']['loss'])} ± "
                   f"{row['s1']['se']:.4f} | "
                   f"{num(row['s2']['loss'])} ± {row['s2']['se']:.4f} | {delta(row['s2'])} | "
                   f"{row['temperature']:.3f} | {num(row['at_temperature']['loss'])} | "
                   f"{delta(row['at_temperature'])} |")
    return "\n".join(out)


def num(x, nd=4):
    return f"{x:.{nd}f}"


def delta(s):
    return f"{s['delta']:+.4f} ± {s['delta_se']:.4f}"


def markdown(r):
    """The report as markdown tables, one section per part of eval.json."""
    out = [f"# eval of {r['checkpoint']}",
           f"energy {r['energy']}, trained with think_steps {r['model_think_steps']}; "
           f"{r['tokens']} val tokens "
           f"reported, {r['tune_tokens']} for tuning temperatures; device {r['device']}; losses in "
           f"nats "
           f"(uniform: {r['uniform_loss']:.4f}); ± is one standard error of the loss or of the "
           f"paired "
           f"difference, from {r['bootstrap_resamples']} bootstrap resamples of whole windows of "
           f"block_size "
           f"characters ({r['report_windows']} report windows), since neighbouring characters are "
           f"correlated", "",
           "## think sweep (each K also at its own best temperature, chosen on the tune slice)",
           f"| think_steps | val loss | bits/char | vs K=0 | µs/token | best T | val loss at best "
           f"T | "
           f"vs K={r['think_sweep'][0]['at_temperature']['vs_think_steps']} at its best T | all "
           f"windows |",
           "|---" * 9 + "|"]
    for row in r["think_sweep"]:
        tuned = row["at_temperature"]
        out.append(f"| {row['think_steps']} | {num(row['loss'])} ± {row['se']:.4f} | "
                   f"{num(row['bits_per_char'])} | "
                   f"{delta(row)} | {row['us_per_token']:.1f} | {row['temperature']:.3f} | "
                   f"{num(tuned['loss'])} | "
                   f"{delta(tuned)} | {num(row['loss_all_windows'])} |")
    t = r["temperature_control"]
    out += ["", f"## temperature-matched control (K={t['think_steps']}; temperatures chosen on the "
                f"tune slice)",
            "| prediction | temperature | val loss | vs raw System 1 |", "|---|---|---|---|",
            f"| System 1 | 1 | {num(t['s1']['loss'])} | |",
            f"| System 1 | {t['s1_temperature']:.3f} | {num(t['s1_at_temperature']['loss'])} | "
            f"{delta(t['s1_at_temperature'])} |",
            f"| thinking | 1 | {num(t['s2']['loss'])} | {delta(t['s2'])} |",
            f"| thinking | {t['s2_temperature']:.3f} | {num(t['s2_at_temperature']['loss'])} | "
            f"{delta(t['s2_at_temperature'])} vs System 1 at its temperature |"]
    return "\n".join(out + verification_markdown(r) + uncertainty_markdown(r) + ood_markdown(r)
                     + chains_markdown(r))


def verification_markdown(r):
    """Self-verification (both rankings) and the exact verifier."""
    own = r["self_verification"][0]["verify_by"]
    other = "energy" if own == "free_energy" else "free_energy"
    out = ["", f"## self-verification (K={r['think_steps']}; kept: lowest {own}, "
               f"or lowest {other})",
           f"| samples M | val loss | vs M=1 | random start chosen | by {other}: val loss | vs M=1 "
           f"| µs/token |",
           "|---|---|---|---|---|---|---|"]
    for row in r["self_verification"]:
        o = row[f"by_{other}"]
        out.append(f"| {row['samples']} | {num(row['loss'])} | {delta(row)} | "
                   f"{row['random_start_chosen']:.4f} | "
                   f"{num(o['loss'])} | {delta(o)} | {row['us_per_token']:.1f} |")
    x = r["exact_verifier"]
    return out + ["", f"## exact verifier (softmax(-E(x, v) / T) over every token v, T = "
                      f"{x['temperature']:.3f})",
                  "| val loss | vs thinking | accuracy | thinking's accuracy | thinking's argmax = "
                  "argmin E |",
                  "|---|---|---|---|---|",
                  f"| {num(x['loss'])} | {delta(x)} | {x['accuracy']:.4f} | "
                  f"{x['think_accuracy']:.4f} | "
                  f"{x['argmax_is_argmin']:.4f} |"]


def uncertainty_markdown(r):
    """Energy as uncertainty, and adaptive compute."""
    u = r["uncertainty"]
    out = ["", f"## energy as uncertainty (K={u['think_steps']}; argmax wrong on "
               f"{u['error_rate']:.1%} of tokens)",
           "| score | Pearson with loss | Spearman with loss | AUROC for argmax wrong |",
           "|---|---|---|---|"]
    labels = {"energy": "E(p_K)", "energy_gap": "E(p_K) - min_v E(x, v)", "free_energy": "F(z_K)",
              "max_prob": "1 - max p (baseline)"}
    for name, label in labels.items():
        s = u[name]
        out.append(f"| {label} | {num(s['pearson'], 3)} | {num(s['spearman'], 3)} | "
                   f"{num(s['auroc'], 3)} |")
    out += ["", "## adaptive compute (stop when the free energy changes by less than epsilon)",
            "| epsilon | mean steps | val loss | vs K=0 | fixed K | its val loss |",
            "|---|---|---|---|---|---|"]
    for row in r["adaptive"]:
        out.append(f"| {row['epsilon']:g} | {row['mean_steps']:.2f} / {row['max_steps']} | "
                   f"{num(row['loss'])} | "
                   f"{delta(row)} | {row['fixed_steps']} | {num(row['fixed']['loss'])} |")
    return out


def ood_markdown(r):
    """The think sweep on val, the out-of-distribution text and the corrupted val, side by side."""
    o = r["ood"]
    names = [n for n in ("val", "ood_text", "corrupted_val") if n in o]
    out = ["", f"## out of distribution (ood_text {o['ood_path']}; corrupted val: "
               f"{o['corrupt']:.0%} substituted)",
           "| think_steps | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, k in enumerate(row["think_steps"] for row in o["val"]["sweep"]):
        out.append(f"| {k} | "
                   + " | ".join(f"{num(o[n]['sweep'][i]['loss'])} ({delta(o[n]['sweep'][i])})"
                                             for n in names) + " |")
    out.append("| tokens | " + " | ".join(str(o[n]["tokens"]) for n in names) + " |")
    out.append("| gain of the best K | "
               + " | ".join(f"{o[n]['gain']:+.4f} (K={o[n]['best_think_steps']})"
                                                      for n in names) + " |")
    return out


def chains_markdown(r):
    """KL of the contrastive chains to the model, by step and kind."""
    if "chains" not in r:
        return []
    c = r["chains"]
    kinds = [k for k in ("cd", "pcd", "fast_pcd") if k in c["rows"][0]]
    out = ["", f"## contrastive chains: KL(chains after k steps || softmax(-E / T)) (step "
               f"{c['step_size']:g}, "
           f"tau {c['temperature']:g}, noise {c['noise']:g}; cd from the data, pcd from noise)",
           "| k | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for row in c["rows"]:
        out.append(f"| {row['steps']} | " + " | ".join(f"{row[k]['kl']:.4f} ± {row[k]['se']:.4f}"
                                                       for k in kinds) + " |")
    return out


def main_eval(cfg: EvalConfig):
    t0 = time.time()
    result = evaluate_product(cfg) if cfg.experts else evaluate_checkpoint(cfg)
    result["eval_seconds"] = time.time() - t0
    print(product_markdown(result) if cfg.experts else markdown(result))
    path = Path(cfg.experts[0]).parent / "eval_product.json" if cfg.experts else \
        Path(cfg.checkpoint).parent / "eval.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path} in {result['eval_seconds']:.0f}s")
    return result


@hydra.main(version_base="1.3", config_path="config", config_name="eval")
def main(cfg):
    run(main_eval, cfg)


if __name__ == "__main__":
    check_overrides("eval", sys.argv[1:])
    main()
