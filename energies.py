"""
Energies beyond the linear head, and what builds on an energy: the research extras of ebm.py's
first step. The core thinks on any energy(p, step) -> (E (...), dE/dp (..., V)) of a relaxed
candidate p; this module adds

- mixture_energy: E depends on the candidate through a small MLP g of its expected embedding (in
  closed form), so that thinking can change its mind (docs/energies.md);
- transformer_energy: EBT, a scalar read from candidate slots of a transformer (dE/dp by autograd),
  and compile_dE_dp, the same compiled for training (train.compile=true);
- Product: a product of experts, several models' energies added with weights (generate takes it);
- onehot_energies: the exact verifier, the energy of every vocabulary token as the candidate;
- restrict: thinking over the System 1 top-k candidates only, never on banned tokens (sample.py).
"""

import math
from functools import partial

import torch
from torch.nn import functional as F

import ebm
from ebm import Experts, make_energy, system1_logits

# --------------------------------------------------------------------------------------------------
# energies that depend on the candidate


def gelu_grad(x):
    """d/dx of the exact GELU x * Phi(x): Phi(x) + x * phi(x)."""
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x
                                                                   * x) / math.sqrt(2 * math.pi)


def mixture_energy(model, h, e):
    """
    E(h, p) = <p, W_E h> + beta * g([h, ybar(p)]), ybar(p) = sum_v p_v W_emb[v],
    g = proj(gelu(fc(.))); dE/dp = e + beta * W_emb dg/dybar, in closed form. With
    model.mixture_stopgrad, p inside g is a constant for backprop: each step re-evaluates dE/dp at
    the current p and descends it as if linear. In float32 even under autocast, as the linear head's
    e (model.energies): dE/dp enters the think loop's small logit moves.
    """
    d = h.size(-1)
    W1, b1 = model.mix_fc.weight, model.mix_fc.bias  # (H, 2d), (H,)
    w2 = model.mix_proj.weight[0]  # (H,)
    with torch.autocast(h.device.type, enabled=False):
        pre_h = F.linear(h.to(W1.dtype), W1[:, :d], b1)  # (..., H): the context's part of fc
        M = model.transformer.wte.weight @ W1[:, d:].t()  # (V, H): fc of each token's embedding
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
    EBT: E(x_1..x_t, p) is a scalar read from the candidate slot of a transformer over [observed |
    candidates] (model.candidate_energy), fed the candidate's embedding (model.candidate_embedding)
    and, with model.think_step_embed, that of the step index. The observed stream's keys/values sit
    in caches, computed once; each step runs only the candidate slots. dE/dp by autograd, with
    create_graph while gradients are on, so that the loss backpropagates through the step (the
    slots then keep only what their matmuls need, model.Recompute, unless model.recompute=false).
    While training with train.compile=true, every step's E and dE/dp come from compile_dE_dp, the
    steps without gradients (S2's truncated ones, contrastive chains) too. Traced by torch.compile
    (generate(compile=True)), dE/dp comes from torch.func.grad, which the graph can hold.
    """

    def energy(p, step=None):
        create_graph = torch.is_grad_enabled()
        if model.training and model.compiled_dE_dp is not None:  # compile_dE_dp
            dE_dp, E = model.compiled_dE_dp(p, caches, step)
            return E, dE_dp
        if torch.compiler.is_compiling():  # generate(compile=True): traced, where autograd.grad
            # would break the graph at every think step
            dE_dp, E = torch.func.grad(partial(energy_sum, model), has_aux=True)(p, caches, step)
            return E, dE_dp
        with torch.enable_grad():
            if not p.requires_grad:
                p = p.detach().requires_grad_()
            # (..., T): slot t sees p_t only; float32 even under autocast (the readout is)
            E = model.candidate_energy(model.candidate_embedding(p), caches, step,
                                       recompute=create_graph and model.config.recompute)
            (dE_dp,) = torch.autograd.grad(E.sum(), p, create_graph=create_graph)
        return E, dE_dp  # p's dtype: float32 under autocast too (p = softmax of float32 logits)

    return energy


def compile_dE_dp(model):
    """
    train.compile=true with the transformer energy: the training steps take E and dE/dp from one
    compiled function of (p, caches, step). torch.func.grad makes the inner gradient part of the
    traced graph, so its ordinary backward is the double backward (AOTAutograd cannot differentiate
    a compiled backward again), and inductor fuses the elementwise work of all three passes: EBT's
    training step runs 1.3x faster on CPU (docs/speed.md). Gradients equal the eager path's to
    float rounding (tests/test_ebt.py).
    """

    # no persistent reductions: Triton 3.6 (torch 2.11) fails to build the fused softmax of the
    # candidate attention as one under bfloat16 on an H200 (docs/gpu.md); CPU code is unaffected
    model.compiled_dE_dp = torch.compile(torch.func.grad(partial(energy_sum, model), has_aux=True),
                                         options={"triton.persistent_reductions": False})


def energy_sum(model, p, caches, step):
    """The summed energy of candidates p and the energies (..., T) themselves: what torch.func.grad
    differentiates for dE/dp (slot t's energy depends on p_t only)."""
    E = model.candidate_energy(model.candidate_embedding(p), caches, step)
    return E.sum(), E


# the energies that depend on the candidate, by model.energy: ebm.make_energy builds them
ebm.ENERGIES["mixture"] = lambda model, h, e, caches: mixture_energy(model, h, e)
ebm.ENERGIES["transformer"] = lambda model, h, e, caches: transformer_energy(model, caches)


# --------------------------------------------------------------------------------------------------
# products of experts


def weighted_sum(weights, xs):
    """sum_i w_i x_i: the products of experts' energies, energy vectors and gradients."""
    return sum(w * x for w, x in zip(weights, xs))


class Product(Experts):
    """
    A product of experts: E(x, p) = sum_i w_i E_i(x, p), so dE/dp = sum_i w_i dE_i/dp, where expert
    i is its own model (weights: 1 each unless given) with its own hidden states h_i and caches_i
    (None but for the transformer energy). The experts share the vocabulary, token by token
    (checkpoints.load_experts checks it). generate takes it in place of a model, and thinking on the
    product uses the first expert's temperature and thinking options.
    """

    def __init__(self, models, weights=None):
        super().__init__(models)
        self.weights = [1.0] * len(self.models) if weights is None else list(weights)

    def __call__(self, hs, caches):
        """The summed energy vector e = sum_i w_i e_i (System 1's) and the energy to descend."""
        if len(self.models) == 1 and self.weights[0] == 1:  # a single model: its own energy
            return super().__call__(hs, caches)
        es = [model.energies(h) for model, h in zip(self.models, hs)]
        parts = [make_energy(m, h, e, c) for m, h, e, c in zip(self.models, hs, es, caches)]

        def energy(p, step=None):
            Es, grads = zip(*(part(p, step) for part in parts))
            return weighted_sum(self.weights, Es), weighted_sum(self.weights, grads)

        return weighted_sum(self.weights, es), energy


# --------------------------------------------------------------------------------------------------
# the exact verifier


@torch.no_grad()
def onehot_energies(model, h, e, caches=None, chunk=8):
    """
    The exact verifier's energies E(x, onehot(v)) of every vocabulary token v as the candidate,
    (..., V), in the last step's landscape. linear: e itself; mixture: its closed form at each
    one-hot p; transformer: the V candidate slots against the cached observed stream, `chunk`
    tokens at a time (memory).
    """
    V = e.size(-1)
    eye = torch.eye(V, dtype=e.dtype, device=e.device)
    if model.config.energy == "linear":
        return e
    if model.config.energy == "mixture":
        return mixture_energy(model, h, e)(eye.view(V, *[1] * (e.dim() - 1), V))[0].movedim(0, -1)
    emb = model.candidate_embedding(eye)  # (V, d): the slot input of each one-hot candidate
    cand = emb.view(V, *[1] * (e.dim() - 1), -1).expand(V, *e.shape[:-1], -1)  # (V, ..., d)
    return torch.cat([model.candidate_energy(c, caches) for c in cand.split(chunk)]).movedim(0, -1)


# --------------------------------------------------------------------------------------------------
# thinking over a part of the vocabulary: the System 1 top-k, and bans


def topk_energy(energy, ix, V):
    """The energy of candidates p_k (..., n) over the vocabulary entries ix (..., n) only (the rest
    get p = 0), and its dE/dp over those entries."""

    def energy_k(pk, step=None):
        ixk = ix.expand(pk.shape)  # (M, ..., n) with self-verification's M starts
        p = torch.zeros(*pk.shape[:-1], V, dtype=pk.dtype, device=pk.device).scatter(-1, ixk, pk)
        E, dE_dp = energy(p, step)
        return E, dE_dp.gather(-1, ixk)

    return energy_k


def restrict(think, topk=0, banned=()):
    """
    A think function (model, e, energy) -> [z_0, ..., z_K] (ebm.generate's) that thinks over the
    System 1 top-`topk` candidates only (0: all) and never on the token ids `banned`, whose energy
    is infinite (a ban): System 1 gives them logit -inf and thinking runs over the other tokens only
    (p = 0 on the banned ones; <p, e> at p = 0, e = inf would be NaN). The thought logits are -inf
    outside the candidates; z_0 is System 1's over every token but the banned.
    """

    def restricted(model, e, energy):
        V = e.size(-1)
        z0 = system1_logits(model, e)
        if banned:
            z0 = z0.index_fill(-1, torch.tensor(banned, device=z0.device), -math.inf)
        n_cand = min(topk or V, V - len(banned))  # the System 1 top-k, or all that are not banned
        if n_cand == V:
            return think(model, e, energy)
        ix = z0.topk(n_cand, dim=-1).indices  # (..., n_cand): the rest are ruled out, p = 0 there
        zs = think(model, e.gather(-1, ix), topk_energy(energy, ix, V))
        return [z0] + [torch.full_like(z0, -math.inf).scatter(-1, ix, z) for z in zs[1:]]

    return restricted
