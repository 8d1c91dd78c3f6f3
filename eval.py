"""
Does thinking help? `uv run eval.py checkpoint=out_ebt/final.pt` answers on the run's val text
(data.val_path, else the last 10% of data_path) with numbers: eval.json next to the checkpoint, one
key per part (docs/eval.md says what each holds), and its markdown report (viz.py renders it).

Every val character is scored once (non-overlapping windows of block_size; the tail shorter than a
window is left out), so two runs of the same checkpoint print the same figures. Every 5th window
goes to the tune slice, which only chooses temperatures; the rest, the report slice, gives every
figure. Standard errors come from a bootstrap over windows (BOOTSTRAP seeded resamples), since
neighbouring characters' losses are correlated and the per-character std / sqrt(N) would understate
them. Differences are paired: both members on the same windows, resampled together. A gain smaller
than two of its delta_se is noise.
"""

import hashlib
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

from checkpoints import load_checkpoint, load_experts, load_model
from contrastive import chain_energy, chain_start, chain_temperature, sample_chains
from data import resolve_path, val_text
from ebm import (free_energy, make_energy, observe, self_verify, step_rule, system1_logits,
                 think_start)
from energies import Product, onehot_energies
from stats import BOOTSTRAP, as_uncertainty, best_temperature, bootstrap_se, ce, summary
from util import UserError, check_overrides, pick_device, run, sync
from viz import eval_markdown


@dataclass
class EvalConfig:
    checkpoint: str = "out_ebt/final.pt"
    experts: List[str] = field(default_factory=list)  # a product of these checkpoints instead
    expert_weights: List[float] = field(default_factory=list)  # one per expert (empty: 1 each)
    think_steps: Optional[int] = None  # K for the parts that think once (default: the model's)
    sweep: List[int] = field(default_factory=lambda: [0, 1, 2, 4, 8, 16])
    samples: List[int] = field(default_factory=lambda: [1, 2, 4, 8])
    epsilons: List[float] = field(default_factory=lambda: [0.1, 0.03, 0.01, 0.003])
    # a fixed text (README.md as of commit 54194fb), so that README edits do not move the OOD
    # figures; relative paths: the working directory, else the repo root
    ood_text: str = "assets/ood.txt"
    corrupt: float = 0.05  # fraction of val characters substituted at random for the corrupted copy
    chain_steps: List[int] = field(default_factory=lambda: [0, 1, 2, 4, 8, 16])  # []: no chains
    # score the think sweep alone (what viz.py's trend reads): the other parts, the exact verifier
    # above all (V candidate slots per position), cost most of an evaluation's time
    sweep_only: bool = False
    chain_step_size: Optional[float] = None  # the chains' step (default: langevin_step_size)
    max_tokens: int = 0  # score at most this many val tokens (0 = the whole val split)
    batch_size: int = 64  # windows per forward pass
    seed: int = 1337  # self-verification's random starts and the corruption
    device: str = "auto"


ConfigStore.instance().store(name="eval_schema", node=EvalConfig)

OTHER = {"energy": "free_energy", "free_energy": "energy"}  # verify_by: the other ranking

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
    """The val windows x, y (N, T) of the text the run validated on (data.val_path, else the last
    10% of data_path; checkpoints from before val_path have no such key), and which of them form
    the tune slice (every 5th)."""
    d = ckpt_cfg["data"]
    ids = torch.tensor(vocab.encode(val_text(d["data_path"], d.get("val_path"))), dtype=torch.long)
    x, y = windows(ids, block_size, max_tokens)
    tune = torch.arange(x.size(0)) % 5 == 0
    if tune.all():
        raise UserError("the val split is too short for a tune and a report slice: "
                        "raise max_tokens")
    return x, y, tune


@dataclass
class Pass:
    """One pass of a Runner: System 1 and thinking logits (N, V), the start that self-verification
    kept per token (N,) (0 = the System 1 start), optionally the energy E(p_K) and free energy
    F(z_K) (N,) of each thinking output, and the seconds per token of a timed pass."""
    z0: torch.Tensor
    zk: torch.Tensor
    chosen: torch.Tensor
    energy: Optional[torch.Tensor] = None
    free: Optional[torch.Tensor] = None
    seconds: float = 0.0


class Runner:
    """Forward passes over fixed windows x, y (n, T), in batches: what each think setting predicts
    and costs per token. With a product of experts (energies.Product), thinking descends the sum of
    the experts' energies with the options of `model`, the first expert."""

    def __init__(self, model, x, y, batch_size, device, seed=1337, product=None):
        self.model, self.x, self.y, self.bs = model, x, y, batch_size
        self.device, self.seed, self.product = device, seed, product
        self.targets, self.tokens = y.reshape(-1), y.numel()

    def on(self, x, y):
        """A Runner like this one (model, product, batch size, device, seed) on other windows."""
        return Runner(self.model, x, y, self.bs, self.device, self.seed, self.product)

    def losses(self, z):
        """Per-character cross-entropy of logits z (N, V) by window, (n_windows, T), for summary."""
        return ce(z, self.targets).view(self.y.shape)

    def batches(self):
        for i in range(0, self.x.size(0), self.bs):
            yield self.x[i : i + self.bs].to(self.device), self.y[i : i + self.bs].to(self.device)

    def gather(self, fn):
        """fn(x, y) on every batch, returning tensors (B, T, ...): each joined over the batches as
        (N, ...) on the CPU, one row per scored token, so that whole passes stay off the device."""
        parts = [[t.detach().flatten(0, 1).cpu() for t in fn(x, y)] for x, y in self.batches()]
        return [torch.cat(column) for column in zip(*parts)]

    def energy(self, x):
        """System 1's energy vector e and the energy that thinking descends, for the windows x: the
        model's, or the product's (each expert with its own pass and cache)."""
        if self.product is None:
            h, e, caches = observe(self.model, x)
            return e, make_energy(self.model, h, e, caches)
        seen = [observe(m, x) for m in self.product.models]
        return self.product([h for h, _, _ in seen], [c for _, _, c in seen])

    def think(self, steps, starts=1, verify_by=None, energies=False):
        """A Pass over every window with `steps` think steps and `starts` starts (self-verification,
        ranked by verify_by, default the model's); energies: with E and F. The caller seeds."""
        def one(x, _):
            e, energy = self.energy(x)
            zs, kept = self_verify(self.model, e, energy, steps, starts, verify_by)
            ef = free_energy(zs[-1], energy, self.model.config.entropy_weight) if energies else ()
            return zs[0].float(), zs[-1].float(), kept, *ef

        return Pass(*self.gather(one))

    def logits(self, steps, starts=1, energies=False, verify_by=None):
        """think, seeded (random starts are the same every run) and timed per token after one
        untimed batch, so that one-time costs (allocator, kernels) do not land in the timing."""
        x, _ = next(self.batches())
        self_verify(self.model, *self.energy(x), steps, starts)
        torch.manual_seed(self.seed)
        sync(self.device)
        t0 = time.perf_counter()
        run = self.think(steps, starts, verify_by, energies)
        sync(self.device)
        run.seconds = (time.perf_counter() - t0) / self.tokens
        return run

    def onehot_energies(self):
        """The exact verifier: E(x, onehot(v)) of every token v at every position, (N, V)."""
        def one(x, _):
            return [onehot_energies(self.model, *observe(self.model, x)).float()]

        return self.gather(one)[0]

    def sweep(self, steps_list, tuner=None):
        """Loss of the prediction after K think steps for each K, paired against K = 0. With a tuner
        (the tune slice), also at each K's own best temperature, paired against the model's trained
        K (else the first K) at its best temperature: more thinking must beat the trained thinking
        sharpened or softened the cheap way, not only raw."""
        rows, tuned = [], {}
        for k in steps_list:
            run = self.logits(k)
            if not rows:
                base = self.losses(run.z0)  # System 1 is the prediction at K = 0
            rows.append({"think_steps": k, **summary(self.losses(run.zk), base),
                         "us_per_token": 1e6 * run.seconds})
            if tuner is not None:
                tune_zk = tuner.logits(k).zk
                rows[-1]["temperature"] = best_temperature(tune_zk, tuner.targets)
                tuned[k] = self.losses(run.zk / rows[-1]["temperature"])
                # every window, both slices: what other code scoring the same characters gives
                both = torch.cat([self.losses(run.zk).flatten(), tuner.losses(tune_zk).flatten()])
                rows[-1]["loss_all_windows"] = both.mean().item()
        if tuned:
            trained = self.model.config.think_steps
            ref = trained if trained in tuned else steps_list[0]
            for row in rows:
                row["at_temperature"] = {"vs_think_steps": ref,
                                         **summary(tuned[row["think_steps"]], tuned[ref])}
        return rows

    def adaptive(self, max_steps, eps):
        """Think at most max_steps; a token stops once a step changes its free energy by less than
        eps. Returns its logits (N, V) and the steps each token used (N,). Stopped tokens are
        masked, not removed, so this measures steps, not wall time."""
        cfg = self.model.config

        def one(x, _):
            e, energy = self.energy(x)
            z = think_start(cfg, system1_logits(self.model, e))
            step = step_rule(self.model, z)
            f = free_energy(z, energy, cfg.entropy_weight)[1]
            steps = torch.zeros(z.shape[:-1], device=z.device)
            active = torch.ones(z.shape[:-1], dtype=torch.bool, device=z.device)
            for k in range(max_steps):
                z_next = step(z, energy, k)
                f_next = free_energy(z_next, energy, cfg.entropy_weight)[1]
                z = torch.where(active.unsqueeze(-1), z_next, z)
                steps += active
                active &= (f_next - f).abs() >= eps
                f = f_next
                if not active.any():
                    break
            return z.float(), steps

        torch.manual_seed(self.seed)
        return self.gather(one)


# --------------------------------------------------------------------------------------------------
# the parts of eval.json


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


def self_verification_part(report, K, samples, s2):
    """One row per M in samples, paired against plain thinking (s2), ranked by the model's verify_by
    and, in by_energy or by_free_energy, by the other (the same random starts); random_start_chosen
    is the share of tokens whose kept start is not start 0, the model's start (as self_verify
    reports it)."""
    rows, own = [], report.model.config.verify_by
    other = OTHER[own]
    for m in samples:
        parts = {}
        for by in (own, other) if m > 1 else (own,):  # one start: nothing to rank
            run = report.logits(K, starts=m, verify_by=by)  # seeded: the same random starts
            parts[by] = {**summary(report.losses(run.zk), s2), "us_per_token": 1e6 * run.seconds,
                         "random_start_chosen": (run.chosen != 0).double().mean().item()}
        rows.append({"samples": m, "verify_by": own, **parts[own],
                     f"by_{other}": parts.get(other, parts[own])})
    return rows


def exact_verifier_part(report, tuner, thought, s2):
    """The energy of every one-hot candidate, E(x, onehot(v)) for all v, as the distribution
    softmax(-E / T*), T* best on the tune slice: its loss against thinking's, its accuracy beside
    thinking's, and how often thinking's argmax is the energy's exact argmin. Returns the part and
    min_v E per token (N,) for the uncertainty part."""
    E = report.onehot_energies()  # (N, V)
    t = best_temperature(-tuner.onehot_energies(), tuner.targets)
    argmin, argmax = E.argmin(-1), thought.zk.argmax(-1)
    part = {"temperature": t, **summary(report.losses(-E / t), s2),
            "accuracy": (argmin == report.targets).double().mean().item(),
            "think_accuracy": (argmax == report.targets).double().mean().item(),
            "argmax_is_argmin": (argmax == argmin).double().mean().item()}
    return part, E.amin(-1)


def uncertainty_part(report, thought, s2, K, min_energy):
    """How well each score ranks the tokens by loss and by whether the argmax is wrong. energy_gap
    is E(p_K) - min_v E(x, v): only differences of energy are trained, not its level at a
    position. max_prob (1 - max p) is the usual baseline."""
    wrong, s2 = thought.zk.argmax(-1) != report.targets, s2.flatten()
    return {"think_steps": K, "error_rate": wrong.double().mean().item(),
            "energy": as_uncertainty(thought.energy, s2, wrong),
            "energy_gap": as_uncertainty(thought.energy - min_energy, s2, wrong),
            "free_energy": as_uncertainty(thought.free, s2, wrong),
            "max_prob": as_uncertainty(-F.softmax(thought.zk, -1).amax(-1), s2, wrong)}


def adaptive_part(report, max_steps, epsilons, s1):
    """One row per epsilon: adaptive thinking beside fixed thinking with its mean number of
    steps."""
    rows = []
    for eps in epsilons:
        za, used = report.adaptive(max_steps, eps)
        fixed = round(used.mean().item())
        rows.append({"epsilon": eps, "mean_steps": used.mean().item(), "max_steps": max_steps,
                     **summary(report.losses(za), s1), "fixed_steps": fixed,
                     "fixed": summary(report.losses(report.logits(fixed).zk), s1)})
    return rows


def chains_part(cfg, report):
    """KL(q_k || softmax(-E(x, v) / T)) of the contrastive chains after each k of chain_steps, T the
    model's softmax temperature, for each kind of start (cd: the data; pcd: noise; fast_pcd: noise,
    with the fast weights of a fast_pcd run's ckpt.pt): mean and bootstrap standard error over
    windows. The target is computed once per batch; every kind draws the same noise."""
    m = report.model.config
    fast = load_checkpoint(cfg.checkpoint).get("chains", [{}])[0].get("fast_weight")
    kinds = {"cd": ("data", None), "pcd": ("noise", None)}
    if fast is not None and fast.abs().max() > 0:
        kinds["fast_pcd"] = ("noise", fast.to(report.device))
    step = m.langevin_step_size if cfg.chain_step_size is None else cfg.chain_step_size
    kls = {kind: {k: [] for k in cfg.chain_steps} for kind in kinds}
    for i, (x, y) in enumerate(report.batches()):
        h, e, caches = observe(report.model, x)
        target = F.log_softmax(-onehot_energies(report.model, h, e, caches) / m.softmax_temperature,
                               -1)
        for kind, (start, fast_weight) in kinds.items():
            torch.manual_seed(cfg.seed + i)
            energy = chain_energy(report.model, h, e, caches, fast_weight)
            zs = sample_chains(m, chain_start(m, e, y, start), energy, max(cfg.chain_steps), step)
            for k in cfg.chain_steps:
                logq = F.log_softmax(zs[k], -1)
                kls[kind][k].append((logq.exp() * (logq - target)).sum(-1).double().cpu())
    rows = []
    for k in cfg.chain_steps:
        row = {"steps": k}
        for kind in kinds:
            kl = torch.cat(kls[kind][k])
            row[kind] = {"kl": kl.mean().item(), "se": bootstrap_se(kl.mean(1))}
        rows.append(row)
    return {"step_size": step, "temperature": chain_temperature(m),
            "noise": m.langevin_noise_scale, "rows": rows}


def text_part(rows, tokens, dropped):
    """One text's think sweep, with the gain of its best K over K = 0 (written 0.0, not -0.0)."""
    best = min(rows, key=lambda r: r["loss"])
    return {"tokens": tokens, "dropped_chars": dropped, "sweep": rows,
            "best_think_steps": best["think_steps"], "gain": 0.0 - best["delta"]}


def ood_part(cfg, report, val_sweep, vocab):
    """The think sweep on val, on ood_text (characters outside the vocabulary dropped) and on val
    with a fraction `corrupt` of its INPUT characters substituted. The targets stay the clean text's
    next characters: scoring the prediction of a random substitute would punish any sharpening,
    i.e. bias the verdict against thinking."""
    ood_path = resolve_path(cfg.ood_text)
    text = ood_path.read_text(encoding="utf-8", errors="replace")
    sha256 = hashlib.sha256(ood_path.read_bytes()).hexdigest()  # of the file, as sha256sum gives it
    kept = [c for c in text if c in vocab.stoi]
    ids = torch.tensor(vocab.encode(kept), dtype=torch.long)
    ood = report.on(*windows(ids, report.model.config.block_size))
    x = corrupt_ids(report.x, cfg.corrupt, len(vocab), torch.Generator().manual_seed(cfg.seed))
    corrupted = report.on(x, report.y)
    return {"ood_path": str(cfg.ood_text), "ood_sha256": sha256, "corrupt": cfg.corrupt,
            "val": text_part(val_sweep, report.tokens, 0),
            "ood_text": text_part(ood.sweep(cfg.sweep), ood.tokens, len(text) - len(kept)),
            "corrupted_val": text_part(corrupted.sweep(cfg.sweep), corrupted.tokens, 0)}


def slices(y, tune, device, vocab):
    """What both reports say about the slices they score and their standard errors."""
    return {"tokens": y[~tune].numel(), "tune_tokens": y[tune].numel(), "device": device,
            "uniform_loss": math.log(len(vocab)), "report_windows": int((~tune).sum()),
            "bootstrap_resamples": BOOTSTRAP}


def check_options(cfg):
    """One-line errors for options out of range, before any checkpoint is loaded. A product of
    experts runs only the loss parts, so only their options are checked for it."""
    if cfg.batch_size < 1 or cfg.max_tokens < 0 or (cfg.think_steps or 0) < 0:
        raise UserError("batch_size must be >= 1, max_tokens >= 0 and think_steps >= 0")
    if cfg.experts:
        return
    if not cfg.sweep or min(cfg.sweep) < 0 or not cfg.samples or min(cfg.samples) < 1:
        raise UserError("sweep needs think_steps >= 0 and samples >= 1, e.g. sweep=[0,1,2,4] "
                        "samples=[1,2]")
    if min(cfg.epsilons, default=1) <= 0 or not 0 <= cfg.corrupt < 1:
        raise UserError("epsilons must be > 0 and corrupt in [0, 1)")
    if min(cfg.chain_steps, default=0) < 0 or (cfg.chain_step_size or 0) < 0:
        raise UserError("chain_steps need k >= 0 and chain_step_size >= 0, e.g. "
                        "'chain_steps=[0,1,4]'")
    if not resolve_path(cfg.ood_text).is_file():
        raise UserError(f"ood_text={cfg.ood_text} not found: pass a text file, e.g. "
                        "ood_text=assets/ood.txt")


@torch.no_grad()  # the transformer energy turns gradients on for dE/dp only
def evaluate_checkpoint(cfg: EvalConfig):
    check_options(cfg)
    device = pick_device(cfg.device, key="device")
    model, vocab, ckpt_cfg = load_model(cfg.checkpoint, device)
    K = model.config.think_steps if cfg.think_steps is None else cfg.think_steps
    x, y, tune = val_windows(ckpt_cfg, vocab, model.config.block_size, cfg.max_tokens)
    report = Runner(model, x[~tune], y[~tune], cfg.batch_size, device, cfg.seed)
    tuner = report.on(x[tune], y[tune])
    r = {"checkpoint": str(cfg.checkpoint), "energy": model.config.energy,
         "model_think_steps": model.config.think_steps, "think_steps": K,
         **slices(y, tune, device, vocab), "think_sweep": report.sweep(cfg.sweep, tuner)}
    if cfg.sweep_only:
        return r
    r["temperature_control"], thought, s1, s2 = temperature_part(report, tuner, K)
    r["self_verification"] = self_verification_part(report, K, cfg.samples, s2)
    r["exact_verifier"], min_energy = exact_verifier_part(report, tuner, thought, s2)
    r["uncertainty"] = uncertainty_part(report, thought, s2, K, min_energy)
    r["adaptive"] = adaptive_part(report, max(cfg.sweep), cfg.epsilons, s1)
    r["ood"] = ood_part(cfg, report, r["think_sweep"], vocab)
    if cfg.chain_steps:
        r["chains"] = chains_part(cfg, report)
    return r


# --------------------------------------------------------------------------------------------------
# a product of experts (experts=[a.pt,b.pt] expert_weights=[1,0.5]): its val loss beside each
# expert's alone


def product_rows(cfg, members, x, y, tune, device):
    """One row per member (name, models, weights, K): System 1 and thinking losses on the report
    slice, and thinking at its best temperature (chosen on the tune slice). Differences are paired
    against the best expert alone (the lowest thinking loss among the members of one model, which
    come first)."""
    runs = []
    for name, models, weights, K in members:
        product = Product(models, weights)  # one model at weight 1 is that model alone
        report = Runner(models[0], x[~tune], y[~tune], cfg.batch_size, device, cfg.seed, product)
        tuner = report.on(x[tune], y[tune])
        torch.manual_seed(cfg.seed)  # random starts (think_start=noise): the same for every member
        run = report.think(K)
        t = best_temperature(tuner.think(K).zk, tuner.targets)
        runs.append({"name": name, "K": K, "s1": report.losses(run.z0), "s2": report.losses(run.zk),
                     "t": t, "tuned": report.losses(run.zk / t)})
    best = min(runs[:-1], key=lambda r: r["s2"].mean())  # the experts alone (the product is last)
    return [{"member": r["name"], "think_steps": r["K"], "s1": summary(r["s1"]),
             "s2": summary(r["s2"], best["s2"]), "temperature": r["t"],
             "at_temperature": summary(r["tuned"], best["tuned"]), "vs": best["name"]}
            for r in runs]


@torch.no_grad()  # the transformer energy turns gradients on for dE/dp only
def evaluate_product(cfg: EvalConfig):
    check_options(cfg)
    device = pick_device(cfg.device, key="device")
    models, weights, vocab, ckpt_cfg = load_experts(cfg.experts, cfg.expert_weights, device)
    steps = [m.config.think_steps if cfg.think_steps is None else cfg.think_steps for m in models]
    bs = min(m.config.block_size for m in models)  # every expert sees each whole window
    x, y, tune = val_windows(ckpt_cfg, vocab, bs, cfg.max_tokens)
    members = [(f"{path} alone", [m], [1.0], k) for path, m, k in zip(cfg.experts, models, steps)]
    # the product thinks with the first expert's options
    members.append((f"product at weights {weights}", models, weights, steps[0]))
    return {"experts": list(cfg.experts), "expert_weights": weights, "think_steps": steps[0],
            "block_size": bs, **slices(y, tune, device, vocab),
            "product": product_rows(cfg, members, x, y, tune, device)}


def main_eval(cfg: EvalConfig):
    """Score, print the report (viz.py renders it) and write the figures as eval.json next to the
    checkpoint (a product: eval_product.json next to the first expert)."""
    t0 = time.time()
    if cfg.experts:
        result, path = evaluate_product(cfg), Path(cfg.experts[0]).parent / "eval_product.json"
    else:
        result, path = evaluate_checkpoint(cfg), Path(cfg.checkpoint).parent / "eval.json"
    result["eval_seconds"] = time.time() - t0
    print(eval_markdown(result))
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path} in {result['eval_seconds']:.0f}s")
    return result


@hydra.main(version_base="1.3", config_path="config", config_name="eval")
def main(cfg):
    run(main_eval, cfg)


if __name__ == "__main__":
    check_overrides("eval", sys.argv[1:])
    main()
