"""
Energy-based next-token prediction, read top to bottom:

1. energies:  the GPT gives h_t from x_1..x_t; the energy of candidate token v for x_{t+1} is e_t[v].
2. System 1:  one pass, logits z_0 = -e_t / T.
3. System 2:  "thinking" = K gradient steps on the free energy F of a relaxed candidate p = softmax(z).
4. losses:    cross-entropy on the thinking output (autograd runs through the K steps), an auxiliary
              System 1 cross-entropy, and contrastive divergence (CD, PCD, fast PCD).
5. generate:  next-token prediction with a KV cache, thinking at every new token.

Position t predicts x_{t+1} and never sees it: everything here is per position.
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

# ---------------------------------------------------------------------------------------------------
# free energy of a relaxed candidate and its gradient


def free_energy(z, e, tau):
    """F(z) = <p, e> - tau * H(p), p = softmax(z); one value per position. z, e: (..., V) -> (...)."""
    logp = F.log_softmax(z, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)  # H(p)
    return (p * e).sum(-1) - tau * entropy


def free_energy_grad(z, e, tau):
    """dF/dz = p * (s - <p, s>) with s = e + tau * log p. Closed form: no autograd, cheap, per position."""
    logp = F.log_softmax(z, dim=-1)
    p = logp.exp()
    s = e + tau * logp
    return p * (s - (p * s).sum(-1, keepdim=True))  # (..., V)


# ---------------------------------------------------------------------------------------------------
# the think loop: one loop for training, eval, sampling and the contrastive chains


def think(z, energy, steps, lr, tau, max_move=math.inf, noise=0.0):
    """
    Descend F from logits z (..., V) for `steps` steps; return the list [z_0, z_1, ..., z_K].

        z_{k+1} = z_k - clip(lr * dF/dz(z_k), -max_move, max_move) + sqrt(2 lr) * noise * N(0, 1)

    energy(p) gives the energy vector e (..., V) at candidate p. A linear head ignores p (its e is fixed),
    so its fixed point is the Boltzmann distribution softmax(-e / tau); with tau = 0 and no noise every
    step raises the lowest-energy token's logit at least as much as any other's, so the argmax never
    changes: linear thinking only anneals the temperature.
    The step is per position: nothing is averaged over the batch or the sequence, so its size does not
    depend on B or T.
    """
    zs = [z]
    for _ in range(steps):
        e = energy(F.softmax(z, dim=-1))
        move = lr * free_energy_grad(z, e, tau)
        if math.isfinite(max_move):
            move = move.clamp(-max_move, max_move)
        z = z - move
        if noise > 0:
            z = z + math.sqrt(2 * lr) * noise * torch.randn_like(z)
        zs.append(z)
    return zs


def linear_energy(e):
    """The linear head's energy: the same vector e whatever the candidate."""
    return lambda p: e


def system2_logits(cfg, e, steps, noise=0.0):
    """System 1 logits z_0 = -e / T, then `steps` think steps; returns [z_0, ..., z_K]."""
    z0 = -e / cfg.softmax_temperature
    return think(z0, linear_energy(e), steps, cfg.think_lr, cfg.entropy_weight, cfg.think_max_move, noise)


# ---------------------------------------------------------------------------------------------------
# contrastive divergence: CD, PCD and fast PCD differ only in where the chains start and which weights
# sample them


class ChainState(nn.Module):
    """Training state of the persistent chains: the PCD replay buffer and the fast-PCD fast weights."""

    def __init__(self, cfg):
        super().__init__()
        self.register_buffer("chains", torch.randn(cfg.n_persistent, cfg.vocab_size))  # (N, V) logits
        self.register_buffer("fast_weight", torch.zeros(cfg.vocab_size, cfg.n_embd))  # (V, d), added to W_E


DATA_SMOOTHING = 0.1  # CD chains start at the data: p_0 = 0.9 * onehot(y) + 0.1 / V (one-hot has no gradient)


def contrastive_loss(cfg, h, e, targets, state=None):
    """
    Per-position L_cd = (E_pos - E_neg) + reg * (E_pos^2 + E_neg^2), shape (B, T).

    E_pos = e_t[y_{t+1}], the energy of the true next token, with gradient (this is what pulls it down).
    E_neg = <stopgrad(q), e_t>, q a candidate from k Langevin steps on F under the sampling energy.
    With exact negatives q = softmax(-e/T) and T = 1 the gradient of mean(E_pos - E_neg) is exactly that
    of cross-entropy; with tau = T the chains' fixed point is that distribution, so CD-k approaches it.
    """
    B, T, V = e.shape
    kind = cfg.contrastive_type
    with torch.no_grad():
        e_sample = e.detach()
        if kind == "fast_pcd":  # fast weights are added to W_E only while sampling
            e_sample = e_sample + h.detach() @ state.fast_weight.t().to(h.dtype)
        if kind == "cd":  # chains start at the data
            p0 = (1 - DATA_SMOOTHING) * F.one_hot(targets, V).to(e.dtype) + DATA_SMOOTHING / V
            z = p0.log()
        else:  # chains continue from the replay buffer, a few restart from noise
            slot = torch.randint(cfg.n_persistent, (B, T), device=e.device)
            z = state.chains[slot].to(e.dtype)  # (B, T, V)
            restart = torch.rand(B, T, 1, device=e.device) < cfg.pcd_reinit_prob
            z = torch.where(restart, torch.randn_like(z), z)
        z = think(z, linear_energy(e_sample), cfg.contrastive_k, cfg.langevin_step_size,
                  cfg.entropy_weight, noise=cfg.langevin_noise_scale)[-1]
        q = F.softmax(z, dim=-1)
        if kind != "cd":
            state.chains[slot] = z.to(state.chains.dtype)
    e_pos = e.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    e_neg = (q * e).sum(-1)  # (B, T)
    if kind == "fast_pcd":
        with torch.no_grad():  # fast weights descend the same loss with a large step, then decay
            reg = cfg.contrastive_reg  # dL/de of (E_pos - E_neg) + reg * (E_pos^2 + E_neg^2):
            dl_de = F.one_hot(targets, V) * (1 + 2 * reg * e_pos.unsqueeze(-1)) - q * (1 - 2 * reg * e_neg.unsqueeze(-1))
            grad = dl_de.reshape(-1, V).t() @ h.detach().reshape(-1, h.size(-1)) / (B * T)  # (V, d)
            state.fast_weight.mul_(cfg.fast_weight_decay).sub_(cfg.fast_weight_lr * grad.to(state.fast_weight.dtype))
    return (e_pos - e_neg) + cfg.contrastive_reg * (e_pos**2 + e_neg**2)


# ---------------------------------------------------------------------------------------------------
# the losses of one batch, from one transformer pass


def losses(model, idx, targets, state=None, think_steps=None):
    """
    Per-position loss terms (each (B, T)) for tokens idx and next tokens targets:
    ce (the prediction: after thinking), ce_s1 (System 1), and cd when contrastive training is on.
    """
    cfg = model.config
    K = cfg.think_steps if think_steps is None else think_steps
    h = model(idx)  # (B, T, d): the only transformer pass
    e = model.energies(h)  # (B, T, V)
    zs = system2_logits(cfg, e, K, noise=cfg.think_noise if model.training else 0.0)
    out = {
        "ce": F.cross_entropy(zs[-1].flatten(0, 1), targets.flatten(), reduction="none").view_as(targets),
        "ce_s1": F.cross_entropy(zs[0].flatten(0, 1), targets.flatten(), reduction="none").view_as(targets),
    }
    if cfg.use_contrastive and model.training:
        out["cd"] = contrastive_loss(cfg, h, e, targets, state)
    return out


def total_loss(cfg, terms, think_steps=None):
    """CE(z_K) + aux_ce_weight * CE(z_0) [+ contrastive_weight * L_cd], each averaged over positions."""
    K = cfg.think_steps if think_steps is None else think_steps
    loss = terms["ce"].mean()
    if K > 0:
        loss = loss + cfg.aux_ce_weight * terms["ce_s1"].mean()
    if "cd" in terms:
        loss = loss + cfg.contrastive_weight * terms["cd"].mean()
    return loss


# ---------------------------------------------------------------------------------------------------
# generation


@torch.no_grad()
def next_logits(model, h, think_steps, topk=0):
    """Logits for the next token from hidden states h (B, d): System 1, then thinking over the top-k."""
    cfg = model.config
    e = model.energies(h)  # (B, V)
    if topk and topk < e.size(-1):
        # think over the System 1 top-k candidates only; the rest are ruled out
        e_top, ix = e.topk(topk, dim=-1, largest=False)  # lowest energies = highest S1 logits
        z_top = system2_logits(cfg, e_top, think_steps)[-1]
        return torch.full_like(e, -math.inf).scatter(-1, ix, z_top)
    return system2_logits(cfg, e, think_steps)[-1]


def pick(z, sample, temperature=1.0, top_p=1.0, generator=None):
    """Greedy argmax (sample=False) or a draw from softmax(z / temperature) cut to the top-p nucleus."""
    if not sample:
        return z.argmax(-1, keepdim=True)
    probs = F.softmax(z / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # keep the smallest set whose mass reaches top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model, idx, max_new_tokens, think_steps, topk=0, sample=False, temperature=1.0, top_p=1.0,
             generator=None, use_cache=True):
    """
    Continue idx (B, T) by max_new_tokens tokens. With the KV cache each new token costs one single-token
    pass. When the cache holds block_size tokens it is rebuilt from the most recent block_size // 2
    tokens, so each rebuild buys block_size // 2 cheap steps and the context never drops below half a
    window. Without the cache (use_cache=False) each step reruns the last block_size tokens.
    """
    bs = model.config.block_size
    caches = None
    for _ in range(max_new_tokens):
        if not use_cache:
            h = model(idx[:, -bs:])
        elif caches is None or caches[0].length == bs:
            ctx = idx[:, -bs:] if caches is None else idx[:, -max(1, bs // 2):]
            caches = model.new_caches(idx.size(0))
            h = model(ctx, caches)
        else:
            h = model(idx[:, -1:], caches)
        z = next_logits(model, h[:, -1], think_steps, topk)
        idx = torch.cat([idx, pick(z, sample, temperature, top_p, generator)], dim=1)
    return idx
