"""
Energy-based next-token prediction, read top to bottom (the README's math, a section each):

1. the energy:   the GPT gives h_t from x_1..x_t and e_t = W_E h_t; a relaxed candidate p for
                 x_{t+1} has the energy E(p) = <p, e_t> (or one that depends on p: energies.py).
2. free energy:  F(z) = E(p) - tau * H(p) of p = softmax(z), and its gradient in closed form.
3. thinking:     K steps of a step rule on the candidate's logits, per position (the think loop).
4. System 1, 2:  z_0 = -e_t / T in one pass, then thinking from there; self-verification.
5. losses:       cross-entropy on the thinking output (autograd runs through the K steps) and on
                 System 1.
6. generate:     next-token prediction with a KV cache, thinking at every new token.

Position t predicts x_{t+1} and never sees it: everything here is per position. This file imports
nothing of the project; the research extras import it and plug in where the model and its
objective are built: energies.py adds the mixture and transformer (EBT) energies to ENERGIES and a
product of experts to generate (energies.Product, an Experts); contrastive.losses wraps losses with
the replay buffer of EBT's warm starts and contrastive divergence (CD, PCD, fast PCD).
"""

import math
from contextlib import nullcontext
from functools import partial

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

# --------------------------------------------------------------------------------------------------
# 1. the energy of a candidate p (..., V): energy(p, step) -> (E (...), dE/dp (..., V))


def linear_energy(e):
    """The linear head's energy: its gradient dE/dp is e whatever the candidate (and step)."""
    return lambda p, step=None: ((p * e).sum(-1), e)  # E(p) = <p, e_t>


# model.energy -> make(model, h, e, caches) -> energy; energies.py adds the mixture and transformer
ENERGIES = {"linear": lambda model, h, e, caches: linear_energy(e)}


def make_energy(model, h, e, caches=None):
    """
    The configured energy (model.energy) at hidden states h (..., d), e = W_E h, from ENERGIES:
    linear here; energies.py adds the mixture and transformer (EBT) energies, which depend on the
    candidate. caches: the observed keys/values that the transformer energy's candidate slots read.
    """
    if model.config.energy not in ENERGIES:
        raise KeyError(f"model.energy={model.config.energy} is not in ebm.ENERGIES: import "
                       "energies (it adds mixture and transformer)")
    return ENERGIES[model.config.energy](model, h, e, caches)


# --------------------------------------------------------------------------------------------------
# 2. the free energy of a candidate and its gradient


def free_energy(z, energy, tau):
    """E(p) and the free energy F(z) of p = softmax(z), for any energy: (...) each."""
    logp = F.log_softmax(z, dim=-1)
    E = energy(logp.exp())[0]
    entropy = -(logp.exp() * logp).sum(-1)  # H(p)
    return E, E - tau * entropy  # F(z) = E(p) - tau * H(p)


def free_energy_grad(z, dE_dp, tau):
    """dF/dz in closed form, exact for any energy given its dE/dp: no autograd, per position."""
    logp = F.log_softmax(z, dim=-1)
    p = logp.exp()
    s = dE_dp + tau * logp  # s = dE/dp + tau * log p
    return p * (s - (p * s).sum(-1, keepdim=True))  # dF/dz = p * (s - <p, s>)  (..., V)


# --------------------------------------------------------------------------------------------------
# 3. the step rules and the think loop: one loop for training, eval, sampling and the CD chains


def smooth_clip(x, m):
    """m * tanh(x / m): ~x for small moves, never beyond +-m, and unlike a clamp never flat."""
    return m * torch.tanh(x / m)


CLIPS = {"hard": lambda x, m: x.clamp(-m, m), "smooth": smooth_clip}  # model.think_clip


def free_energy_step(z, energy, k, lr, tau, clip=None, noise=0.0):
    """One step of the free-energy rule; clip(move) bounds each logit's move (None: unbounded)."""
    _, dE_dp = energy(F.softmax(z, dim=-1), k)
    move = lr * free_energy_grad(z, dE_dp, tau)
    z = z - (move if clip is None else clip(move))  # z_{k+1} = z_k - clip(eta * dF/dz_k, -m, m)
    if noise > 0:
        z = z + (2 * lr) ** 0.5 * noise * torch.randn_like(z)  # [+ sqrt(2 eta) * sigma * noise]
    return z


def ebt_step(z, energy, k, lr, noise=0.0):
    """One step of the EBT rule (official EBT_NLP.forward): Langevin noise on the logits, then the
    new logits are p = softmax(z) minus a step along dE/dp, the gradient with respect to p."""
    if noise > 0:
        z = z + noise * torch.randn_like(z)
    p = F.softmax(z, dim=-1)
    _, dE_dp = energy(p, k)
    return p - lr * dE_dp  # z_{k+1} = p_k - alpha * dE/dp(p_k)


def think(z, energy, steps, step, truncate=False, detach=False):
    """
    Think from logits z (..., V) for `steps` steps of the rule step(z, energy, k) -> z_{k+1}; return
    [z_0, z_1, ..., z_K]. The rules: free_energy_step, ebt_step and the contrastive chains'
    natural_step (contrastive.py), their fixed parameters bound once (step_rule); energy(p, k) gives
    (E, dE/dp) at candidate p in step k. A linear head's dE/dp = e does not depend on p, so the
    free-energy rule's fixed point is the Boltzmann distribution softmax(-e / tau); with tau = 0 and
    no noise every step raises the lowest-energy token's logit at least as much as any other's, so
    the argmax never changes: linear thinking only anneals the temperature. The step is per
    position, never averaged over the batch or the sequence, so its size does not depend on B or T.
    truncate: the steps before the last run without a graph (truncated backprop); detach: every step
    starts from a detached candidate, so the loss of step k + 1 trains step k only (EBT's S1).
    """
    zs = [z]
    for k in range(steps):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not (truncate and k < steps - 1)):
            if detach or (truncate and k == steps - 1):
                z = z.detach()
            z = step(z, energy, k)
        zs.append(z)
    return zs


# --------------------------------------------------------------------------------------------------
# 4. System 1, then thinking (System 2), with the model's thinking options


def think_start(cfg, z0):
    """Where thinking starts (model.think_start): System 1's logits z0, noise N(0, 1) or zeros."""
    if cfg.think_start == "noise":
        return torch.randn_like(z0)
    return torch.zeros_like(z0) if cfg.think_start == "zeros" else z0


def step_size(model, z):
    """eta for logits z (..., V), learned or fixed. While training: jittered per batch by
    think_lr_jitter, and per position from U(eta / s, eta * s), s = think_lr_spread (EBT's S2)."""
    cfg, lr = model.config, model.think_lr()
    if model.training and cfg.think_lr_jitter > 0:
        lr = lr * (1 + cfg.think_lr_jitter * (2 * torch.rand(()).item() - 1))
    if model.training and cfg.think_lr_spread > 1:
        s, shape = cfg.think_lr_spread, (*z.shape[:-1], 1)  # (..., 1)
        lr = lr / s + torch.rand(shape, dtype=z.dtype, device=z.device) * (lr * s - lr / s)
    return lr


def step_rule(model, z):
    """The think step, chosen once: model.think_rule's function with its parameters bound,
    (z, energy, k) -> z_{k+1}. m = model.think_max_move bounds each move; noise only in training."""
    cfg, m = model.config, model.config.think_max_move
    clip = partial(CLIPS[cfg.think_clip], m=m) if math.isfinite(m) else None
    rules = {"free_energy": partial(free_energy_step, tau=cfg.entropy_weight, clip=clip),
             "ebt": ebt_step}
    noise = cfg.think_noise if model.training else 0.0
    return partial(rules[cfg.think_rule], lr=step_size(model, z), noise=noise)


def system1_logits(model, e):
    """System 1: the logits of one pass, with T = model.softmax_temperature."""
    return -e / model.config.softmax_temperature  # z_0 = -e_t / T


def system2_logits(model, e, energy, steps, start=None):
    """
    System 1's logits z_0, then `steps` think steps on `energy` from `start` (default: where
    model.think_start says); returns [z_0, z_1, ..., z_K], z_0 System 1's prediction whatever the
    start. energy: the model's (make_energy) or another of its form, e.g. a product of experts
    (energies.Product; e is then its summed energy vector). While model.training: Langevin noise
    and, if configured, a random step size and truncated backprop.
    """
    cfg = model.config
    z0 = system1_logits(model, e)
    z = think_start(cfg, z0) if start is None else start
    truncate = model.training and cfg.think_truncate
    zs = think(z, energy, steps, step_rule(model, z), truncate, cfg.think_detach)
    return [z0] + zs[1:]


def self_verify(model, e, energy, steps, starts, by=None):
    """
    Self-verification: think from M = `starts` starts per position, the model's own (start 0) and
    M - 1 random ones N(0, 1), and keep per position the candidate whose final energy E
    (by="energy", as EBT) or free energy F (by="free_energy") is lowest (default: model.verify_by).
    Returns [z_0, ..., z_K] of the kept candidates and which start was kept (...), in 0..M-1.
    """
    if starts == 1:
        zs = system2_logits(model, e, energy, steps)
        return zs, torch.zeros_like(zs[0][..., 0], dtype=torch.long)
    start = think_start(model.config, system1_logits(model, e))
    noise = torch.randn(starts - 1, *start.shape, dtype=start.dtype, device=start.device)
    start = torch.cat([start.unsqueeze(0), noise])  # (M, ..., V)
    zs = system2_logits(model, e, energy, steps, start)
    E, free = free_energy(zs[-1] if steps else start, energy, model.config.entropy_weight)
    kept = (E if (by or model.config.verify_by) == "energy" else free).argmin(0)  # (...)
    index = kept[None, ..., None].expand(1, *start.shape[1:])
    return zs[:1] + [z.gather(0, index).squeeze(0) for z in zs[1:]], kept


# --------------------------------------------------------------------------------------------------
# 5. the losses of one batch, from one transformer pass


def observe(model, idx):
    """
    The one pass over the tokens idx (B, T): hidden states h (B, T, d), energies e = W_E h
    (B, T, V), and for the transformer energy the KV cache that its candidate slots read.
    """
    caches = model.new_caches(idx.size(0)) if model.config.energy == "transformer" else None
    h = model(idx, caches)
    return h, model.energies(h), caches


def steps_for_batch(model, think_steps=None):
    """K for one batch: think_steps (default model.think_steps), and while training with
    model.think_steps_random a draw from think_steps_min..K (EBT's S2)."""
    cfg = model.config
    K = cfg.think_steps if think_steps is None else think_steps
    if model.training and cfg.think_steps_random and K > cfg.think_steps_min:
        K = int(torch.randint(cfg.think_steps_min, K + 1, ()))
    return K


def predict(model, e, energy, K, start=None):
    """[z_0, ..., z_K] of a batch: System 2 from `start` while training (with its noise and random
    step sizes), and in eval the best of model.think_samples starts (self_verify)."""
    if model.training:
        return system2_logits(model, e, energy, K, start)
    return self_verify(model, e, energy, K, model.config.think_samples)[0]


def cross_entropies(model, zs, targets):
    """The loss terms (B, T) each of logits zs = [z_0, ..., z_K] for the next tokens targets (B, T):
    ce of the prediction z_K, ce_s1 of System 1's z_0 and, while training with model.ce_all_steps,
    ce_steps, the mean over the steps (EBT)."""

    def ce(z):
        loss = F.cross_entropy(z.flatten(0, 1), targets.flatten(), reduction="none")
        return loss.view_as(targets)

    out = {"ce": ce(zs[-1]), "ce_s1": ce(zs[0])}
    if model.config.ce_all_steps and model.training and len(zs) > 2:
        out["ce_steps"] = torch.stack([ce(z) for z in zs[1:]]).mean(0)
    return out


def losses(model, idx, targets, think_steps=None):
    """
    Per-position loss terms (each (B, T)) for tokens idx (B, T) and their next tokens targets, from
    one transformer pass: ce (the prediction, after K think steps), ce_s1 (System 1) and ce_steps
    (model.ce_all_steps). EBT's replay buffer and contrastive divergence wrap this in
    contrastive.losses.
    """
    K = steps_for_batch(model, think_steps)
    h, e, caches = observe(model, idx)  # the only pass over the observed tokens
    energy = make_energy(model, h, e, caches)  # E(p), dE/dp of a candidate p at every position
    zs = predict(model, e, energy, K)  # [z_0, z_1, ..., z_K]
    return cross_entropies(model, zs, targets)  # CE(z_K), CE(z_0)


def total_loss(cfg, terms, think_steps=None):
    """The training loss from the per-position terms of losses:
    CE(z_K) (or its mean over the steps) + aux_ce_weight * CE(z_0) [+ contrastive_weight * L_cd]."""
    K = cfg.think_steps if think_steps is None else think_steps
    loss = terms["ce_steps"].mean() if "ce_steps" in terms else terms["ce"].mean()
    if K > 0:
        loss = loss + cfg.aux_ce_weight * terms["ce_s1"].mean()
    if "cd" in terms:
        loss = loss + cfg.contrastive_weight * terms["cd"].mean()
    return loss


# --------------------------------------------------------------------------------------------------
# 6. generation


def pick(z, sample=False, temperature=1.0, top_p=1.0, generator=None):
    """Greedy argmax (sample=False), or a draw from softmax(z / temperature) cut to top-p mass."""
    if not sample:
        return z.argmax(-1, keepdim=True)
    probs = F.softmax(z / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # keep the fewest that reach top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model, idx, max_new_tokens, think, choose=pick, use_cache=True, compile=False):
    """
    Continue idx (B, T) by max_new_tokens tokens, each choose(z) (default: greedy, pick) from the
    logits z that think(model, e, energy) -> [z_0, ..., z_K] gives at the last position: e.g.
    partial(system2_logits, steps=K), self-verification (self_verify), either restricted to the
    System 1 top-k or banning tokens (energies.restrict). model: a GPT, or Experts whose energies
    add (a product of experts: energies.Product), each expert with its own pass and KV cache.
    With the cache each new token costs one single-token pass; a full cache (block_size tokens) is
    rebuilt from the most recent block_size // 2 tokens, so each rebuild buys block_size // 2 cheap
    steps and the context never drops below half a window. use_cache=False: each step reruns the
    last block_size tokens. compile: torch.compile the passes and the thinking; a token's step is
    dozens of tiny kernels whose launch overhead dominates on CPU, and compiling fuses them. A few
    graphs compile once (the prompt's pass, single tokens, a full cache, a rebuilt one), none per
    token or length; the transformer energy's dE/dp inside the graph, random starts as eager's.
    """
    product = model if isinstance(model, Experts) else Experts([model])
    forwards, logits = product.models, next_logits
    if compile:
        forwards = [torch.compile(m, dynamic=True) for m in product.models]
        # random starts from eager's generator: the same seed gives the same text compiled or not
        logits = torch.compile(next_logits, options={"fallback_random": True})
    hs, caches = [None] * len(forwards), [None] * len(forwards)
    # inference mode skips autograd's bookkeeping of every small op (a tenth of a token's time); not
    # for the transformer energy, whose dE/dp needs autograd, which inference tensors (its caches)
    # cannot enter, nor under a dispatch mode such as bench.py's FLOP counter (it would see
    # nothing); there no_grad alone (torch.inference_mode(False) would turn grad mode back on)
    fast = all(m.config.energy != "transformer" for m in product.models)
    with torch.inference_mode() if fast and not is_in_torch_dispatch_mode() else nullcontext():
        for _ in range(max_new_tokens):
            for i, (m, forward) in enumerate(zip(product.models, forwards)):  # each its own cache
                hs[i], caches[i] = last_hidden(m, forward, idx, caches[i], use_cache)
            idx = torch.cat([idx, choose(logits(product, hs, caches, think))], dim=1)
    return idx.clone()  # a normal tensor (outside inference mode), whatever the caller does next


@torch.no_grad()
def next_logits(product, hs, caches, think):
    """The next token's logits (B, V): thinking on the product's energy from each expert's last
    hidden state h_i (B, 1, d), with the first expert's temperature and thinking options."""
    e, energy = product(hs, caches)
    return think(product.models[0], e, energy)[-1][:, -1]


def last_hidden(model, forward, idx, caches, use_cache):
    """One expert's hidden state (B, 1, d) of the last token of idx and its caches: a single-token
    pass while the cache has room, else a fresh cache over the recent tokens (see generate)."""
    bs = model.config.block_size
    # a copy with strides of its own: a slice's row stride is idx's length, which a compiled pass
    # would guard on, compiling again as idx grows (.contiguous() keeps a (B, 1) slice's)
    fresh = partial(torch.clone, memory_format=torch.contiguous_format)
    if use_cache and caches is not None and caches[0].length < bs:
        return forward(fresh(idx[:, -1:]), caches), caches
    ctx = idx[:, -max(1, bs // 2) :] if use_cache and caches is not None else idx[:, -bs:]
    caches = model.new_caches(idx.size(0))
    return forward(fresh(ctx), caches)[:, -1:], caches


class Experts:
    """
    What generate predicts with: its models, each with its own pass and KV cache, and how their
    energies combine. One GPT is itself: its energy vector and make_energy's energy. A product of
    experts adds several with weights (energies.Product).
    """

    def __init__(self, models):
        self.models = list(models)

    def __call__(self, hs, caches):
        """The energy vector e (System 1's) and the energy to descend, from each model's hidden
        states hs[i] and caches[i]."""
        model, h = self.models[0], hs[0]
        e = model.energies(h)
        return e, make_energy(model, h, e, caches[0])
