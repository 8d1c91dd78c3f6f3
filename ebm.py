"""
Energy-based next-token prediction, read top to bottom:

1. energies:  the GPT gives h_t from x_1..x_t; the energy of candidate token v for x_{t+1} is e_t[v].
              Thinking descends an energy E(x, p) of a relaxed candidate p: linear <p, e_t>, mixture, or
              transformer (EBT), each returning E and its energy vector dE/dp.
2. System 1:  one pass, logits z_0 = -e_t / T.
3. System 2:  "thinking" = K gradient steps on the free energy F of p = softmax(z); self-verification.
4. losses:    cross-entropy on the thinking output (autograd runs through the K steps), an auxiliary
              System 1 cross-entropy, and contrastive divergence (CD, PCD, fast PCD); the state that
              persists across steps (PCD chains, fast weights, replay buffer).
5. generate:  next-token prediction with a KV cache, thinking at every new token.

Position t predicts x_{t+1} and never sees it: everything here is per position.
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

# ---------------------------------------------------------------------------------------------------
# the gradient of the free energy of a relaxed candidate


def free_energy_grad(z, e, tau):
    """dF/dz = p * (s - <p, s>) with s = e + tau * log p. Closed form: no autograd, cheap, per position."""
    logp = F.log_softmax(z, dim=-1)
    p = logp.exp()
    s = e + tau * logp
    return p * (s - (p * s).sum(-1, keepdim=True))  # (..., V)


# ---------------------------------------------------------------------------------------------------
# energies of a candidate p: each returns (E (...), dE/dp (..., V)), the energy and its energy vector


def linear_energy(e):
    """E(p) = <p, e>: the linear head's energy vector e is the same whatever the candidate (and step)."""
    return lambda p, step=None: ((p * e).sum(-1), e)


def gelu_grad(x):
    """d/dx of the exact GELU x * Phi(x): Phi(x) + x * phi(x)."""
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def mixture_energy(model, h, e):
    """
    E(h, p) = <p, W_E h> + beta * g([h, ybar(p)]),  ybar(p) = sum_v p_v W_emb[v],  g = proj(gelu(fc(.))).
    dE/dp = e + beta * W_emb dg/dybar, in closed form. With model.mixture_stopgrad, p inside g is a constant
    for backprop: each step re-evaluates the energy vector at the current p and descends it as if linear.
    In float32 even under autocast, as the linear head's e (model.energies): the energy vector enters the think
    loop's small logit moves.
    """
    d = h.size(-1)
    W1, b1 = model.mix_fc.weight, model.mix_fc.bias  # (H, 2d), (H,)
    w2 = model.mix_proj.weight[0]  # (H,)
    with torch.autocast(h.device.type, enabled=False):
        pre_h = F.linear(h.to(W1.dtype), W1[:, :d], b1)  # (..., H): the context's part of fc, once per position
        M = model.transformer.wte.weight @ W1[:, d:].t()  # (V, H): fc of each token's embedding, once per batch
    beta = model.mix_beta

    def energy(p, step=None):
        with torch.autocast(p.device.type, enabled=False):
            q = p.detach() if model.config.mixture_stopgrad else p
            pre = pre_h + q @ M  # (..., H) = fc([h, ybar(q)])
            g = F.gelu(pre) @ w2  # (...)
            dg_dp = (w2 * gelu_grad(pre)) @ M.t()  # (..., V) = W_emb dg/dybar
            return (p * e).sum(-1) + beta * g, e + beta * dg_dp

    return energy


def transformer_energy(model, caches):
    """
    EBT: E(x_1..x_t, p) is a scalar read from the candidate slot of a transformer over [observed | candidates]
    (model.candidate_energy), fed the candidate's embedding (model.candidate_embedding) and, with
    model.think_step_embed, that of the step index. The observed stream's keys/values sit in caches,
    computed once; each step runs only the candidate slots. dE/dp by autograd: while training with
    gradients on, create_graph so that the loss backpropagates through the step (double backward).
    """

    def energy(p, step=None):
        create_graph = torch.is_grad_enabled()
        if create_graph and model.compiled_dE_dp is not None:  # train.compile=true: compile_dE_dp
            dE_dp, E = model.compiled_dE_dp(p, caches, step)
            return E, dE_dp
        with torch.enable_grad():
            if not p.requires_grad:
                p = p.detach().requires_grad_()
            # (..., T): slot t sees p_t only; float32 even under autocast (the readout is)
            E = model.candidate_energy(model.candidate_embedding(p), caches, step)
            (dE_dp,) = torch.autograd.grad(E.sum(), p, create_graph=create_graph)
        return E, dE_dp  # dE/dp has p's dtype: float32 under autocast too (p = softmax of float32 logits)

    return energy


def compile_dE_dp(model):
    """
    train.compile=true with the transformer energy: the training steps take E and dE/dp from one compiled
    function of (p, caches, step). torch.func.grad makes the inner gradient part of the traced graph, so its
    ordinary backward is the double backward (AOTAutograd cannot differentiate a compiled backward again),
    and inductor fuses the elementwise work of all three passes: EBT's training step runs 1.3x faster on
    CPU (docs/speed.md). Gradients equal the eager path's to float rounding (tests/test_ebt.py).
    """

    def E_sum(p, caches, step):
        E = model.candidate_energy(model.candidate_embedding(p), caches, step)  # (..., T)
        return E.sum(), E

    model.compiled_dE_dp = torch.compile(torch.func.grad(E_sum, has_aux=True))


def make_energy(model, h, e, caches=None):
    if model.config.energy == "mixture":
        return mixture_energy(model, h, e)
    if model.config.energy == "transformer":
        return transformer_energy(model, caches)
    return linear_energy(e)


def weighted_sum(weights, xs):
    """sum_i w_i x_i: the products of experts' energies, energy vectors and gradients."""
    return sum(w * x for w, x in zip(weights, xs))


def product_energy(models, weights, hs, caches):
    """
    A product of experts: E(x, p) = sum_i w_i E_i(x, p), so dE/dp = sum_i w_i dE_i/dp, where expert i is its
    own model with its own hidden states h_i and caches_i (None but for the transformer energy). Returns the
    summed energy vector e = sum_i w_i e_i (System 1: z_0 = -e / T) and the energy that thinking descends.
    The experts share the vocabulary, token by token (checkpoints.load_experts checks it).
    """
    es = [model.energies(h) for model, h in zip(models, hs)]
    parts = [make_energy(model, h, e, c) for model, h, e, c in zip(models, hs, es, caches)]
    if len(models) == 1 and weights[0] == 1:  # a single model: its own energy, no sums to take
        return es[0], parts[0]

    def energy(p, step=None):
        Es, grads = zip(*(part(p, step) for part in parts))
        return weighted_sum(weights, Es), weighted_sum(weights, grads)

    return weighted_sum(weights, es), energy


@torch.no_grad()
def onehot_energies(model, h, e, caches=None, chunk=8):
    """
    The exact verifier's energies E(x, onehot(v)) of every vocabulary token v as the candidate, (..., V), in
    the last step's landscape. linear: e itself; mixture: its closed form at each one-hot p; transformer:
    the V candidate slots against the cached observed stream, `chunk` tokens at a time (memory).
    """
    V = e.size(-1)
    eye = torch.eye(V, dtype=e.dtype, device=e.device)
    if model.config.energy == "linear":
        return e
    if model.config.energy == "mixture":
        return mixture_energy(model, h, e)(eye.view(V, *[1] * (e.dim() - 1), V))[0].movedim(0, -1)
    emb = model.candidate_embedding(eye)  # (V, d): the slot input of each one-hot candidate
    cand = emb.view(V, *[1] * (e.dim() - 1), -1).expand(V, *e.shape[:-1], emb.size(-1))  # (V, ..., T, d)
    return torch.cat([model.candidate_energy(c, caches) for c in cand.split(chunk)]).movedim(0, -1)  # (..., V)


def free_energy(z, energy, tau):
    """E(p) and the free energy F(z) = E(p) - tau * H(p) of p = softmax(z), for any energy: (...) each."""
    logp = F.log_softmax(z, dim=-1)
    E = energy(logp.exp())[0]
    entropy = -(logp.exp() * logp).sum(-1)  # H(p)
    return E, E - tau * entropy


# ---------------------------------------------------------------------------------------------------
# the think loop: one loop for training, eval, sampling and the contrastive chains


def smooth_clip(x, m):
    """m * tanh(x / m): ~x for small moves, never beyond +-m, and (unlike a clamp) its gradient never vanishes."""
    return m * torch.tanh(x / m)


def free_energy_step(z, energy, k, lr, tau, max_move, clip, noise):
    """One step of the free-energy rule: z - clip(lr * dF/dz) [+ sqrt(2 lr) * noise * N(0, 1)]."""
    _, e = energy(F.softmax(z, dim=-1), k)
    move = lr * free_energy_grad(z, e, tau)
    if math.isfinite(max_move):
        move = smooth_clip(move, max_move) if clip == "smooth" else move.clamp(-max_move, max_move)
    z = z - move
    if noise > 0:
        z = z + (2 * lr) ** 0.5 * noise * torch.randn_like(z)
    return z


def ebt_step(z, energy, k, lr, noise):
    """One step of the EBT rule (official EBT_NLP.forward): Langevin noise on the logits, p = softmax(z), and
    the new logits are p minus a step along dE/dp, the gradient with respect to p (not z)."""
    if noise > 0:
        z = z + noise * torch.randn_like(z)
    p = F.softmax(z, dim=-1)
    _, dE_dp = energy(p, k)
    return p - lr * dE_dp  # z_{k+1} = p_k - alpha * dE/dp(p_k)


def natural_step(z, energy, k, lr, tau, noise):
    """
    One natural-gradient step on F (the contrastive chains' rule): z - lr * (s - mean(s)), s = dE/dp + tau log p.
    dF/dz = p * (s - <p, s>) carries a factor p that freezes unlikely tokens (a token at p = 1e-3 moves a
    thousandth as fast); dividing by the softmax's Fisher metric removes it. For a linear energy
    z_{k+1} = (1 - lr tau) z_k - lr e + const: with lr tau = 1 one step lands on softmax(-e / tau).
    """
    logp = F.log_softmax(z, dim=-1)
    _, e = energy(logp.exp(), k)
    s = e + tau * logp
    z = z - lr * (s - s.mean(-1, keepdim=True))  # centred: a shift of every logit leaves p unchanged
    if noise > 0:
        z = z + (2 * lr) ** 0.5 * noise * torch.randn_like(z)
    return z


def think(z, energy, steps, lr, tau, max_move=math.inf, noise=0.0, truncate=False, rule="free_energy",
          clip="hard", detach=False, first=0):
    """
    Think from logits z (..., V) for `steps` steps; return the list [z_0, z_1, ..., z_K]. Three rules:

      free_energy:  z_{k+1} = z_k - clip(lr * dF/dz(z_k), -max_move, max_move) + sqrt(2 lr) * noise * N(0, 1)
      ebt:          z_{k+1} = p_k - lr * dE/dp(p_k),  p_k = softmax(z_k + noise * N(0, 1))
      natural:      z_{k+1} = z_k - lr * (s - mean(s)) + sqrt(2 lr) * noise * N(0, 1),  s = dE/dp + tau log p_k
                    (the contrastive chains: natural_step)

    energy(p, k) gives (E, dE/dp) at candidate p in step k; dF/dz is free_energy_grad with e = dE/dp, exact
    for any E. A linear head's e does not depend on p, so the free-energy rule's fixed point is the Boltzmann
    distribution softmax(-e / tau); with tau = 0 and no noise every step raises the lowest-energy token's
    logit at least as much as any other's, so the argmax never changes: linear thinking only anneals the
    temperature. clip: hard (clamp) or smooth (m * tanh(x / m)). The step is per position: nothing is
    averaged over the batch or the sequence, so its size does not depend on B or T. truncate: the steps
    before the last run without a graph (truncated backprop); detach: every step starts from a detached
    candidate, so the loss of step k + 1 trains step k only (EBT's S1). first: the index of the first step.
    """
    zs = [z]
    for k in range(steps):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not (truncate and k < steps - 1)):
            if detach or (truncate and k == steps - 1):
                z = z.detach()
            if rule == "ebt":
                z = ebt_step(z, energy, first + k, lr, noise)
            elif rule == "natural":
                z = natural_step(z, energy, first + k, lr, tau, noise)
            else:
                z = free_energy_step(z, energy, first + k, lr, tau, max_move, clip, noise)
        zs.append(z)
    return zs


def think_start(cfg, z0):
    """Where thinking starts (model.think_start): the System 1 logits z0, noise N(0, 1) or zeros (EBT)."""
    if cfg.think_start == "noise":
        return torch.randn_like(z0)
    return torch.zeros_like(z0) if cfg.think_start == "zeros" else z0


def step_size(model, z, training):
    """The step size for logits z (..., V): eta (learned or fixed); while training jittered per batch
    (think_lr_jitter) and drawn per position from U(eta / s, eta * s) (think_lr_spread = s, EBT's S2)."""
    cfg, lr = model.config, model.think_lr()
    if training and cfg.think_lr_jitter > 0:
        lr = lr * (1 + cfg.think_lr_jitter * (2 * torch.rand(()).item() - 1))
    if training and cfg.think_lr_spread > 1:
        s = cfg.think_lr_spread
        lr = lr / s + torch.rand(*z.shape[:-1], 1, dtype=z.dtype, device=z.device) * (lr * s - lr / s)  # (..., 1)
    return lr


def system2_logits(model, h, e, steps, caches=None, samples=1, training=False, topk=0, z_start=None,
                   return_chosen=False, verify_by=None, energy=None, banned=()):
    """
    System 1 logits z_0 = -e / T, then `steps` think steps on the model's energy from model.think_start;
    returns [z_0, ..., z_K] (z_0 is always System 1's prediction, whatever the start).
    training: Langevin noise, and (if configured) a random step size and truncated backprop.
    samples = M > 1 (self-verification): think from the start and M - 1 random starts, keep per position the
    candidate with the lowest free energy (or energy: model.verify_by). topk: think over the System 1 top-k
    candidates only. z_start (n, T, V): the first n rows start thinking there (replay buffer warm starts).
    return_chosen: also return which start was kept per position (...), 0 = the start, 1..M-1 random.
    verify_by: rank the M candidates by this instead of model.verify_by (eval.py reports both).
    energy: descend this energy (E, dE/dp) instead of the model's own, e.g. a product of experts
    (product_energy; e is then its summed energy vector, and model gives T and the thinking options).
    banned: token ids whose energy is infinite (a ban): System 1 gives them logit -inf and thinking runs
    over the other tokens only (p = 0 on the banned ones; <p, e> at p = 0, e = inf would be NaN).
    """
    cfg = model.config
    V = e.size(-1)
    z0 = -e / cfg.softmax_temperature  # System 1
    if banned:
        z0 = z0.index_fill(-1, torch.tensor(banned, device=z0.device), -math.inf)
    energy = make_energy(model, h, e, caches) if energy is None else energy
    start = think_start(cfg, z0)
    if z_start is not None:
        start = torch.cat([z_start.to(z0.dtype), start[z_start.size(0):]])
    lr = step_size(model, start, training)
    ix = None
    k = min(topk or V, V - len(banned))  # the System 1 top-k, or every token that is not banned
    if k < V:  # think over k candidates only: the rest are ruled out (-inf); p is zero there
        ix = z0.topk(k, dim=-1).indices  # (..., k)
        energy, start = topk_energy(energy, ix, V), start.gather(-1, ix)
    if samples > 1:  # candidate 0 starts at the start, the others from noise: (M, ..., V)
        start = torch.cat([start.unsqueeze(0), torch.randn(samples - 1, *start.shape, dtype=start.dtype,
                                                                  device=start.device)])
    zs = think(start, energy, steps, lr, cfg.entropy_weight, cfg.think_max_move,
               noise=cfg.think_noise if training else 0.0, truncate=training and cfg.think_truncate,
               rule=cfg.think_rule, clip=cfg.think_clip, detach=cfg.think_detach)
    chosen = None
    if samples > 1:
        zs, chosen = keep_lowest(zs, energy, cfg.entropy_weight, verify_by or cfg.verify_by)
    if ix is not None:
        zs = [torch.full_like(z0, -math.inf).scatter(-1, ix, z) for z in zs]
    if return_chosen:  # a single start is always start 0
        return [z0] + zs[1:], torch.zeros_like(z0[..., 0], dtype=torch.long) if chosen is None else chosen
    return [z0] + zs[1:]


def keep_lowest(zs, energy, tau, by="free_energy"):
    """Self-verification: of M thought candidates [z_0, ..., z_K] (M, ..., V) each, keep per position the one
    whose final free energy F (by="free_energy") or energy E (by="energy", as EBT) is lowest. Returns its
    trajectory (..., V) each and its index (...) in 0..M-1."""
    E, free = free_energy(zs[-1], energy, tau)
    best = (E if by == "energy" else free).argmin(0)  # (...): the lowest wins
    return [z.gather(0, best[None, ..., None].expand(1, *z.shape[1:])).squeeze(0) for z in zs], best


def topk_energy(energy, ix, V):
    """The energy of candidates p_k (..., k) over the vocabulary entries ix only (the rest get p = 0)."""
    def energy_k(pk, step=None):
        ixk = ix.expand(pk.shape)  # (M, ..., k) with self-verification's M starts
        E, dE_dp = energy(torch.zeros(*pk.shape[:-1], V, dtype=pk.dtype, device=pk.device).scatter(-1, ixk, pk), step)
        return E, dE_dp.gather(-1, ixk)
    return energy_k


# ---------------------------------------------------------------------------------------------------
# training state that persists across steps


def replay_windows(cfg):
    """Windows in the replay buffer: model.replay_size, or model.n_persistent when only PCD's chains use it."""
    if cfg.replay_size > 0:
        return cfg.replay_size
    return cfg.n_persistent if cfg.use_contrastive and cfg.contrastive_type != "cd" else 0


class ChainState(nn.Module):
    """
    Training state that persists across steps (saved in ckpt.pt): a replay buffer of windows that keeps, per
    window and position, the last thinking output (EBT's replay: warm starts) and the last state of the
    contrastive chain (PCD: a chain belongs to its context), and the fast-PCD fast weights.
    """

    def __init__(self, cfg):
        super().__init__()
        self.register_buffer("fast_weight", torch.zeros(cfg.vocab_size, cfg.n_embd))  # (V, d), added to W_E
        R, T, V = replay_windows(cfg), cfg.block_size, cfg.vocab_size
        self.register_buffer("replay_x", torch.zeros(R, T, dtype=torch.long))  # (R, T) windows
        self.register_buffer("replay_y", torch.zeros(R, T, dtype=torch.long))  # (R, T) their next tokens
        self.register_buffer("replay_z", torch.zeros(R, T, V))  # (R, T, V) last thinking output
        self.register_buffer("replay_chain", torch.zeros(R, T, V))  # (R, T, V) last PCD chain logits
        self.replay_count = 0  # windows stored so far (a Python int: reading it costs no device sync)

    def get_extra_state(self):
        return {"replay_count": self.replay_count}

    def set_extra_state(self, state):
        self.replay_count = state["replay_count"]

    def replay_draw(self, idx, targets, frac):
        """Put stored windows in the first rows of the batch; returns idx, targets and their slots (None: no
        window stored yet). The slots are distinct (drawn without replacement), so each is written once."""
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
        """Replayed windows keep their new thinking output z and chain (B, T, V) each, when given; the fresh
        windows enter the ring buffer (the last R of them when a batch has more)."""
        n, R = (0 if slots is None else slots.numel()), self.replay_x.size(0)
        rows = [(self.replay_z, z), (self.replay_chain, chain)]
        for buf, new in rows:
            if n and new is not None:
                buf[slots] = new[:n].to(buf.dtype)
        fresh = idx.size(0) - n
        keep = min(fresh, R)
        ring = (self.replay_count + fresh - keep + torch.arange(keep, device=idx.device)) % R  # distinct slots
        new_rows = slice(idx.size(0) - keep, None)
        self.replay_x[ring], self.replay_y[ring] = idx[new_rows], targets[new_rows]
        for buf, new in rows:
            if new is not None:
                buf[ring] = new[new_rows].to(buf.dtype)
        self.replay_count += fresh


# ---------------------------------------------------------------------------------------------------
# contrastive divergence: CD, PCD and fast PCD differ only in where the chains start and which weights
# sample them

DATA_SMOOTHING = 0.1  # CD chains start at the data: p_0 = 0.9 * onehot(y) + 0.1 / V (one-hot has no gradient)


def candidate_energies(model, h, e, p, caches=None):
    """E(x, p) (..., B, T) of candidates p (..., B, T, V) under the model's energy, with gradient to its
    parameters (and no dE/dp): the positive and negative phases. The transformer energy reads candidate slots."""
    if model.config.energy == "transformer":
        return model.candidate_energy(model.candidate_embedding(p), caches)
    return make_energy(model, h, e)(p)[0]


def chain_temperature(cfg):
    """The chains' tau: model.langevin_temperature, or the model's softmax temperature T, at which their fixed
    point is softmax(-E / T), the distribution System 1 predicts (for a linear head, exactly)."""
    return cfg.softmax_temperature if cfg.langevin_temperature is None else cfg.langevin_temperature


@torch.no_grad()
def sample_chains(model, h, e, targets, caches=None, stored=None, fast_weight=None, steps=None, step_size=None,
                  start="data"):
    """
    The chains' logits [z_0, ..., z_k] (B, T, V) each: k = model.contrastive_k natural-gradient steps on F
    (step langevin_step_size, noise langevin_noise_scale, tau chain_temperature) under the model's energy,
    from the data (start="data", cd) or from noise (pcd, fast_pcd) except for the first rows, which resume
    their stored chains (stored (n, T, V); each position restarts from noise with probability
    pcd_reinit_prob). fast_weight (V, d) (fast_pcd) is added to W_E while sampling, and only here.
    """
    cfg, V = model.config, e.size(-1)
    if fast_weight is not None:
        e = e + h @ fast_weight.t().to(h.dtype)
    if start == "data":
        z = ((1 - DATA_SMOOTHING) * F.one_hot(targets, V).to(e.dtype) + DATA_SMOOTHING / V).log()
    else:
        z = torch.randn_like(e)
        if stored is not None:
            n = stored.size(0)
            keep = torch.rand(n, stored.size(1), 1, device=e.device) >= cfg.pcd_reinit_prob
            z = torch.cat([torch.where(keep, stored.to(e.dtype), z[:n]), z[n:]])
    energy = make_energy(model, h, e, caches)
    return think(z, energy, cfg.contrastive_k if steps is None else steps,
                 cfg.langevin_step_size if step_size is None else step_size, chain_temperature(cfg),
                 noise=cfg.langevin_noise_scale, rule="natural")


def contrastive_loss(model, h, e, targets, caches=None, state=None, stored=None):
    """
    Per-position L_cd = (E_pos - E_neg) + reg * (E_pos^2 + E_neg^2) (B, T); also the gap E_neg - E_pos (B, T,
    detached) and the chains' last logits (B, T, V), which PCD keeps.

    E_pos = E(x_1..x_t, onehot(y_{t+1})), the energy of the true next token, with gradient (it is pulled down).
    E_neg = E(x_1..x_t, stopgrad(q)), q = softmax of the chain's last logits (it is pushed up). Both under the
    energy thinking uses. With exact negatives q = softmax(-e/T), T = 1, and a linear head the gradient of
    mean(E_pos - E_neg) is exactly that of cross-entropy; the chains' fixed point is that q.
    """
    cfg, V = model.config, e.size(-1)
    kind = cfg.contrastive_type
    fast = state.fast_weight if kind == "fast_pcd" else None
    z = sample_chains(model, h, e, targets, caches, stored, fast, start="data" if kind == "cd" else "noise")[-1]
    q = F.softmax(z, dim=-1)
    e_pos, e_neg = candidate_energies(model, h, e, torch.stack([F.one_hot(targets, V).to(q.dtype), q]), caches)
    if kind == "fast_pcd":
        with torch.no_grad():  # fast weights descend the same loss with a large step, then decay
            reg = cfg.contrastive_reg  # dL/de of (E_pos - E_neg) + reg * (E_pos^2 + E_neg^2), E linear in e:
            dl_de = F.one_hot(targets, V) * (1 + 2 * reg * e_pos.unsqueeze(-1)) - q * (1 - 2 * reg * e_neg.unsqueeze(-1))
            grad = dl_de.reshape(-1, V).t() @ h.detach().reshape(-1, h.size(-1)) / targets.numel()  # (V, d)
            state.fast_weight.mul_(cfg.fast_weight_decay).sub_(cfg.fast_weight_lr * grad.to(state.fast_weight.dtype))
    loss = (e_pos - e_neg) + cfg.contrastive_reg * (e_pos**2 + e_neg**2)
    return loss, (e_neg - e_pos).detach(), z


# ---------------------------------------------------------------------------------------------------
# the losses of one batch, from one transformer pass


def observe(model, idx):
    """
    The one pass over the tokens idx (B, T): hidden states h (B, T, d), energies e = W_E h (B, T, V), and for
    the transformer energy the per-layer KV cache that its candidate slots read while thinking (else None).
    """
    caches = model.new_caches(idx.size(0)) if model.config.energy == "transformer" else None
    h = model(idx, caches)
    return h, model.energies(h), caches


def losses(model, idx, targets, state=None, think_steps=None):
    """
    Per-position loss terms (each (B, T)) for tokens idx and next tokens targets:
    ce (the prediction: after thinking), ce_s1 (System 1), and while training with contrastive divergence cd
    and cd_gap (E_neg - E_pos, detached: logged, not trained).
    """
    cfg = model.config
    K = cfg.think_steps if think_steps is None else think_steps
    if model.training and cfg.think_steps_random and K > cfg.think_steps_min:
        K = int(torch.randint(cfg.think_steps_min, K + 1, ()))
    warm = model.training and cfg.replay_size > 0 and K > 0  # EBT's replay: thinking resumes where it stopped
    pcd = model.training and cfg.use_contrastive and cfg.contrastive_type != "cd"  # chains resume
    slots = None
    if warm or pcd:  # some rows are windows seen before
        idx, targets, slots = state.replay_draw(idx, targets, cfg.replay_frac)
    h, e, caches = observe(model, idx)  # the only pass over the observed tokens
    samples = 1 if model.training else cfg.think_samples
    z_start = state.replay_z[slots] if warm and slots is not None else None
    zs = system2_logits(model, h, e, K, caches, samples, training=model.training, z_start=z_start)

    def ce(z):
        return F.cross_entropy(z.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)

    out = {"ce": ce(zs[-1]), "ce_s1": ce(zs[0])}
    if cfg.ce_all_steps and model.training and K > 1:  # train every step's prediction, as EBT
        out["ce_steps"] = torch.stack([ce(z) for z in zs[1:]]).mean(0)
    chain = None
    if cfg.use_contrastive and model.training:
        stored = state.replay_chain[slots] if pcd and slots is not None else None
        out["cd"], out["cd_gap"], chain = contrastive_loss(model, h, e, targets, caches, state, stored)
    if warm or pcd:
        state.replay_store(idx, targets, slots, z=zs[-1].detach() if warm else None, chain=chain if pcd else None)
    return out


def total_loss(cfg, terms, think_steps=None):
    """CE(z_K) (or its mean over steps) + aux_ce_weight * CE(z_0) [+ contrastive_weight * L_cd]."""
    K = cfg.think_steps if think_steps is None else think_steps
    loss = terms["ce_steps"].mean() if "ce_steps" in terms else terms["ce"].mean()
    if K > 0:
        loss = loss + cfg.aux_ce_weight * terms["ce_s1"].mean()
    if "cd" in terms:
        loss = loss + cfg.contrastive_weight * terms["cd"].mean()
    return loss


# ---------------------------------------------------------------------------------------------------
# generation


@torch.no_grad()
def next_logits(models, weights, hs, think_steps, topk=0, caches=None, samples=1, banned=()):
    """
    Logits (B, V) for the next token from each expert's last hidden state h_i (B, 1, d): System 1 of the
    product's energy, then thinking on it, with the first expert's temperature T and thinking options. A
    single model is the product of one expert at weight 1.
    """
    e, energy = product_energy(models, weights, hs, caches or [None] * len(models))
    return system2_logits(models[0], None, e, think_steps, samples=samples, topk=topk, energy=energy,
                          banned=banned)[-1][:, -1]


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
             generator=None, use_cache=True, samples=1, compile=False, weights=None, banned=()):
    """
    Continue idx (B, T) by max_new_tokens tokens. With the KV cache each new token costs one single-token
    pass. When the cache holds block_size tokens it is rebuilt from the most recent block_size // 2
    tokens, so each rebuild buys block_size // 2 cheap steps and the context never drops below half a
    window. Without the cache (use_cache=False) each step reruns the last block_size tokens.
    The transformer energy reads the observed keys/values from the same cache while thinking.
    model: a GPT, or a list of GPTs whose energies add with `weights` (default 1 each), a product of
    experts: each keeps its own cache and block_size. banned: token ids never generated (infinite energy).
    compile: torch.compile the forward pass and the think steps. A single token's step is dozens of tiny
    kernels whose launch overhead dominates on CPU; compiling fuses them (after ~15 s of compiling).
    """
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    weights = [1.0] * len(models) if weights is None else list(weights)
    forwards, think_next = models, next_logits
    if compile:
        forwards, think_next = [torch.compile(m, dynamic=True) for m in models], torch.compile(next_logits)
    caches, hs = [None] * len(models), [None] * len(models)
    # inference mode skips autograd's bookkeeping of every small op (about a tenth of a token's time). Not
    # for the transformer energy, whose dE/dp needs autograd, which inference tensors (its caches) cannot
    # enter, nor under a dispatch mode such as bench.py's FLOP counter, which sees nothing in inference mode
    fast = all(m.config.energy != "transformer" for m in models) and not is_in_torch_dispatch_mode()
    with torch.inference_mode(fast):
        for _ in range(max_new_tokens):
            for i, (m, forward) in enumerate(zip(models, forwards)):  # each expert: its own pass and cache
                hs[i], caches[i] = last_hidden(m, forward, idx, caches[i], use_cache)
            z = think_next(models, weights, hs, think_steps, topk, caches, samples, banned)
            idx = torch.cat([idx, pick(z, sample, temperature, top_p, generator)], dim=1)
    return idx.clone()  # a normal tensor (outside inference mode), whatever the caller does with it next


def last_hidden(model, forward, idx, caches, use_cache):
    """One expert's hidden state (B, 1, d) of the last token of idx and its caches: a single-token pass
    while the cache has room, else a fresh cache over the recent tokens (see generate)."""
    bs = model.config.block_size
    if use_cache and caches is not None and caches[0].length < bs:
        return forward(idx[:, -1:], caches), caches
    ctx = idx[:, -max(1, bs // 2):] if use_cache and caches is not None else idx[:, -bs:]
    caches = model.new_caches(idx.size(0))
    return forward(ctx, caches)[:, -1:], caches
