"""
Contrastive divergence (CD, PCD, fast PCD) and the training state that persists across steps: the
replay buffer that EBT's warm starts (model.replay_size) share with PCD's chains. `losses` wraps
ebm.losses with both; the training objective uses it when either is configured (engine.Objective).

L_cd = (E_pos - E_neg) + reg * (E_pos^2 + E_neg^2) pulls down the energy of the true next token and
pushes up that of negatives q sampled by chains: k natural-gradient steps on F (natural_step) in the
think loop (ebm.think). The langevin_* config keys drive these chains' steps, not the think loop's
noise (that is model.think_noise). CD, PCD and fast PCD differ only in where the chains start
(chain_start: the data, or the state a window's chains reached last time) and which weights sample
them (chain_energy: fast PCD adds fast weights to W_E).
"""

from functools import partial

import torch
import torch.nn as nn
from torch.nn import functional as F

import ebm
from ebm import make_energy, think

# --------------------------------------------------------------------------------------------------
# the chains


def natural_step(z, energy, k, lr, tau, noise=0.0):
    """
    One natural-gradient step on F (the chains' rule): z - lr * (s - mean(s)), s = dE/dp + tau
    log p. dF/dz = p * (s - <p, s>) carries a factor p that freezes unlikely tokens (a token at
    p = 1e-3 moves a thousandth as fast); dividing by the softmax's Fisher metric removes it. For a
    linear energy z_{k+1} = (1 - lr tau) z_k - lr e + const: with lr tau = 1 one step lands on
    softmax(-e / tau).
    """
    logp = F.log_softmax(z, dim=-1)
    _, dE_dp = energy(logp.exp(), k)
    s = dE_dp + tau * logp
    z = z - lr * (s - s.mean(-1, keepdim=True))  # centred: shifting every logit leaves p alone
    if noise > 0:
        z = z + (2 * lr) ** 0.5 * noise * torch.randn_like(z)
    return z


def chain_temperature(cfg):
    """The chains' tau: model.langevin_temperature, or the model's softmax temperature, at which
    their fixed point is softmax(-E / temperature), what System 1 predicts (linear: exactly)."""
    return cfg.softmax_temperature if cfg.langevin_temperature is None else cfg.langevin_temperature


DATA_SMOOTHING = 0.1  # CD chains start at the data: p_0 = 0.9 * onehot(y) + 0.1 / V


def chain_start(cfg, e, targets, start="data", stored=None):
    """
    The chains' first logits (B, T, V): at the data (start="data", cd) or from noise (pcd, fast_pcd)
    but for the first rows, which resume their stored chains (stored (n, T, V); each position
    restarts from noise with probability model.pcd_reinit_prob).
    """
    V = e.size(-1)
    if start == "data":
        return ((1 - DATA_SMOOTHING) * F.one_hot(targets, V).to(e.dtype) + DATA_SMOOTHING / V).log()
    z = torch.randn_like(e)
    if stored is not None:
        n = stored.size(0)
        keep = torch.rand(n, stored.size(1), 1, device=e.device) >= cfg.pcd_reinit_prob
        z = torch.cat([torch.where(keep, stored.to(e.dtype), z[:n]), z[n:]])
    return z


@torch.no_grad()
def chain_energy(model, h, e, caches=None, fast_weight=None):
    """The energy the chains sample: the model's (the one thinking uses), with fast PCD's fast
    weights fast_weight (V, d) added to W_E (only here)."""
    if fast_weight is not None:
        e = e + h @ fast_weight.t().to(h.dtype)
    return make_energy(model, h, e, caches)


@torch.no_grad()
def sample_chains(cfg, z, energy, steps=None, step_size=None):
    """The chains' logits [z_0, ..., z_k] (B, T, V) each, from z: k = model.contrastive_k
    natural-gradient steps on F, of size langevin_step_size, noise langevin_noise_scale and tau
    chain_temperature."""
    lr = cfg.langevin_step_size if step_size is None else step_size
    step = partial(natural_step, lr=lr, tau=chain_temperature(cfg), noise=cfg.langevin_noise_scale)
    return think(z, energy, cfg.contrastive_k if steps is None else steps, step)


# --------------------------------------------------------------------------------------------------
# the loss


def candidate_energies(model, h, e, p, caches=None):
    """E(x, p) (..., B, T) of candidates p (..., B, T, V) under the model's energy, with gradient to
    its parameters (and no dE/dp): the positive and negative phases."""
    if model.config.energy == "transformer":
        return model.candidate_energy(model.candidate_embedding(p), caches)
    return make_energy(model, h, e)(p)[0]


def contrastive_loss(model, h, e, targets, caches=None, state=None, stored=None):
    """
    Per-position L_cd (B, T); also the gap E_neg - E_pos (B, T, detached) and the chains' last
    logits (B, T, V), which PCD keeps (stored: the replayed windows' chains; state: fast weights).

    E_pos = E(x_1..x_t, onehot(y_{t+1})), the energy of the true next token, with gradient (pulled
    down). E_neg = E(x_1..x_t, stopgrad(q)), q = softmax of the chain's last logits (pushed up).
    Both under the energy thinking uses. With exact negatives q = softmax(-e / temperature),
    temperature 1, and a linear head the gradient of mean(E_pos - E_neg) is exactly that of
    cross-entropy; the chains' fixed point is that q.
    """
    cfg, V = model.config, e.size(-1)
    kind = cfg.contrastive_type
    z = chain_start(cfg, e, targets, "data" if kind == "cd" else "noise", stored)
    fast = state.fast_weight if kind == "fast_pcd" else None
    z = sample_chains(cfg, z, chain_energy(model, h, e, caches, fast))[-1]
    q = F.softmax(z, dim=-1)
    onehot = F.one_hot(targets, V)
    e_pos, e_neg = candidate_energies(model, h, e, torch.stack([onehot.to(q.dtype), q]), caches)
    if kind == "fast_pcd":
        with torch.no_grad():  # fast weights descend the same loss with a large step, then decay
            reg = cfg.contrastive_reg  # dL/de of (E_pos - E_neg) + reg (E_pos^2 + E_neg^2):
            pos, neg = 1 + 2 * reg * e_pos.unsqueeze(-1), 1 - 2 * reg * e_neg.unsqueeze(-1)
            dl_de = onehot * pos - q * neg  # E is linear in e
            h_flat = h.detach().reshape(-1, h.size(-1))
            grad = dl_de.reshape(-1, V).t() @ h_flat / targets.numel()  # (V, d)
            fast = state.fast_weight
            fast.mul_(cfg.fast_weight_decay).sub_(cfg.fast_weight_lr * grad.to(fast.dtype))
    loss = (e_pos - e_neg) + cfg.contrastive_reg * (e_pos**2 + e_neg**2)  # L_cd
    return loss, (e_neg - e_pos).detach(), z


# --------------------------------------------------------------------------------------------------
# ebm.losses with the replay buffer and the contrastive term


def losses(model, idx, targets, state=None, think_steps=None):
    """
    ebm.losses while training with what persists across steps, in state (a ReplayState): replayed
    windows in the first rows of the batch, whose thinking resumes where it stopped (EBT's warm
    starts, model.replay_size), and with model.use_contrastive the term cd and cd_gap (E_neg -
    E_pos, detached: logged, not trained), whose PCD chains persist with their windows. In eval:
    ebm.losses.
    """
    cfg = model.config
    if not model.training:
        return ebm.losses(model, idx, targets, think_steps)
    K = ebm.steps_for_batch(model, think_steps)
    warm = cfg.replay_size > 0 and K > 0  # EBT's replay: thinking resumes
    pcd = cfg.use_contrastive and cfg.contrastive_type != "cd"  # the chains resume
    slots = None
    if warm or pcd:  # some rows are windows seen before
        idx, targets, slots = state.replay_draw(idx, targets, cfg.replay_frac)
    h, e, caches = ebm.observe(model, idx)  # the only pass over the observed tokens
    energy = make_energy(model, h, e, caches)
    start = warm_start(model, e, state, slots) if warm and slots is not None else None
    zs = ebm.predict(model, e, energy, K, start)
    out, chain = ebm.cross_entropies(model, zs, targets), None
    if cfg.use_contrastive:
        stored = state.replay_chain[slots] if pcd and slots is not None else None
        cd = contrastive_loss(model, h, e, targets, caches, state, stored)
        out["cd"], out["cd_gap"], chain = cd
    if warm or pcd:
        state.replay_store(idx, targets, slots, z=zs[-1].detach() if warm else None,
                           chain=chain if pcd else None)
    return out


def warm_start(model, e, state, slots):
    """Where thinking starts: the replayed rows (the first slots.numel()) where their thinking
    stopped last time, the others where model.think_start says."""
    start = ebm.think_start(model.config, ebm.system1_logits(model, e))
    return torch.cat([state.replay_z[slots].to(start.dtype), start[slots.numel() :]])


# --------------------------------------------------------------------------------------------------
# the training state that persists across steps


def replay_windows(cfg):
    """Windows in the replay buffer: model.replay_size, or model.n_persistent for PCD's alone."""
    if cfg.replay_size > 0:
        return cfg.replay_size
    return cfg.n_persistent if cfg.use_contrastive and cfg.contrastive_type != "cd" else 0


class ReplayState(nn.Module):
    """
    Training state that persists across steps (ckpt.pt saves it under "chains"): a replay buffer of
    windows that keeps, per window and position, the last thinking output (EBT's replay: warm
    starts) and the last state of the contrastive chain (PCD: a chain belongs to its context), and
    the fast-PCD fast weights.
    """

    def __init__(self, cfg):
        super().__init__()
        V, d = cfg.vocab_size, cfg.n_embd
        self.register_buffer("fast_weight", torch.zeros(V, d))  # (V, d), added to W_E
        R, T = replay_windows(cfg), cfg.block_size
        self.register_buffer("replay_x", torch.zeros(R, T, dtype=torch.long))  # (R, T) windows
        self.register_buffer("replay_y", torch.zeros(R, T, dtype=torch.long))  # their next tokens
        self.register_buffer("replay_z", torch.zeros(R, T, V))  # (R, T, V) last thinking output
        self.register_buffer("replay_chain", torch.zeros(R, T, V))  # (R, T, V) last PCD chains
        self.replay_count = 0  # windows stored so far (an int: reading it costs no device sync)

    def get_extra_state(self):
        return {"replay_count": self.replay_count}

    def set_extra_state(self, state):
        self.replay_count = state["replay_count"]

    def replay_draw(self, idx, targets, frac):
        """Put stored windows in the first rows of the batch; returns idx, targets and their slots
        (None: no window stored yet), distinct (drawn without replacement): each is written once."""
        R = self.replay_x.size(0)
        n = min(int(frac * idx.size(0)), self.replay_count, R)
        if n == 0:
            return idx, targets, None
        slots = torch.randperm(min(self.replay_count, R), device=idx.device)[:n]
        idx = torch.cat([self.replay_x[slots], idx[n:]])
        targets = torch.cat([self.replay_y[slots], targets[n:]])
        return idx, targets, slots

    @torch.no_grad()
    def replay_store(self, idx, targets, slots, z=None, chain=None):
        """Replayed windows keep their new thinking output z and chain (B, T, V) each, when given;
        the fresh windows enter the ring buffer (the last R of them when a batch has more)."""
        n, R = (0 if slots is None else slots.numel()), self.replay_x.size(0)
        rows = [(self.replay_z, z), (self.replay_chain, chain)]
        for buf, new in rows:
            if n and new is not None:
                buf[slots] = new[:n].to(buf.dtype)
        fresh = idx.size(0) - n
        keep = min(fresh, R)
        ring = (self.replay_count + fresh - keep + torch.arange(keep, device=idx.device)) % R
        new_rows = slice(idx.size(0) - keep, None)
        self.replay_x[ring], self.replay_y[ring] = idx[new_rows], targets[new_rows]
        for buf, new in rows:
            if new is not None:
                buf[ring] = new[new_rows].to(buf.dtype)
        self.replay_count += fresh
