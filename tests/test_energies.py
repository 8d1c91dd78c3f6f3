"""Tests of the candidate-conditioned energies (mixture, transformer/EBT) and the EBT think
options."""

import math

import pytest
import torch
from torch.nn import functional as F

import contrastive
import ebm
import energies
import train as train_mod
from conftest import assert_no_leak, free_energy_rule, make_model, perturb
from helpers import TINY_MODEL, run_train, write_corpus
from model import rotary, rotate
from sample import thinking

pytestmark = pytest.mark.usefixtures("one_thread")

V = 11
D = torch.float64
N_EMBD = 32


def rand(*shape, scale=1.0, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return scale * torch.randn(*shape, dtype=D, generator=g)


def rand_p(*shape, seed=0):
    """A random point on the simplex (..., V), well inside it."""
    return F.softmax(rand(*shape, scale=1.5, seed=seed), -1)


def seq_batch(B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(V, (B, T + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def grads(loss, params, retain_graph=False):
    gs = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


def filled_caches(model, idx):
    caches = model.new_caches(idx.size(0))
    h = model(idx, caches)
    return h, caches


def free_energy_of(energy, z, tau):
    """F(z) = E(softmax z) - tau * H(softmax z) for any energy (E, dE/dp) = energy(p)."""
    logp = F.log_softmax(z, -1)
    p = logp.exp()
    return energy(p)[0] + tau * (p * logp).sum(-1)


def one_train_loss(model, idx, targets, state=None, seed=0):
    torch.manual_seed(seed)
    terms = contrastive.losses(model, idx, targets, state)
    return terms, ebm.total_loss(model.config, terms)


# --------------------------------------------------------------------------------------------------
# 1. mixture energy


def test_mixture_energy_gradient_matches_autograd():
    """mixture: the returned dE/dp equals autograd's dE/dp (float64, random p on the simplex), both
    stopgrad modes."""
    model = perturb(make_model(energy="mixture", mixture_hidden=16, mixture_stopgrad=False), 0.3)
    h = rand(2, 5, N_EMBD, seed=1)
    e = rand(2, 5, V, seed=2)
    p = rand_p(2, 5, V, seed=3).requires_grad_(True)
    E, dE_dp = energies.mixture_energy(model, h, e)(p)
    assert E.shape == (2, 5) and dE_dp.shape == (2, 5, V)
    (auto,) = torch.autograd.grad(E.sum(), p)
    assert torch.allclose(dE_dp, auto, rtol=1e-10, atol=1e-12)
    assert (auto - e).abs().max() > 1e-2  # g contributes: this is not the linear energy vector
    # stopgrad changes what backprop sees, not the values
    model.config.mixture_stopgrad = True
    E2, dE_dp2 = energies.mixture_energy(model, h, e)(p)
    assert torch.allclose(E2, E, rtol=0, atol=1e-14) and torch.allclose(dE_dp2, dE_dp, rtol=0,
                                                                        atol=1e-14)


@pytest.mark.parametrize("tau", [0.0, 0.3])
def test_mixture_think_step_is_exact_gradient_step(tau):
    """mixture, stopgrad off: one think step is z - lr * autograd dF/dz, F(z) = E(softmax z) - tau H
    (no clip)."""
    model = perturb(make_model(energy="mixture", mixture_hidden=16, mixture_stopgrad=False), 0.3)
    h = rand(3, 4, N_EMBD, seed=4)
    e = rand(3, 4, V, seed=5)
    z = rand(3, 4, V, scale=2.0, seed=6).requires_grad_(True)
    energy = energies.mixture_energy(model, h, e)
    (dF,) = torch.autograd.grad(free_energy_of(energy, z, tau).sum(), z)
    lr = 0.7
    zs = ebm.think(z.detach(), energy, 1, free_energy_rule(lr, tau))
    assert len(zs) == 2
    assert torch.allclose(zs[1], z.detach() - lr * dF, rtol=1e-10, atol=1e-12)
    # and g matters for the step: it differs from the linear energy's step
    lin = ebm.think(z.detach(), ebm.linear_energy(e), 1, free_energy_rule(lr, tau))[1]
    assert (lin - zs[1]).abs().max() > 1e-3


@pytest.mark.parametrize("stopgrad", [True, False])
def test_mixture_gets_gradients_from_first_step(stopgrad):
    """Fresh mixture model, one training backward (think_steps=2): mix_fc, mix_proj and mix_beta get
    non-zero grads."""
    model = make_model(energy="mixture", mixture_stopgrad=stopgrad, think_steps=2).train()
    idx, targets = seq_batch(3, 16)
    _, loss = one_train_loss(model, idx, targets)
    loss.backward()
    for name in ("mix_fc.weight", "mix_proj.weight", "mix_beta"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all(), name
        assert g.abs().max() > 1e-12, name


@pytest.mark.parametrize("scale,min_rel_diff", [(0.0, 1e-10), (0.3, 1e-3)])
def test_mixture_stopgrad_changes_the_gradient(scale, min_rel_diff):
    """stopgrad cuts the path through p inside g: same forward values, different mixture-parameter
    gradients."""
    idx, targets = seq_batch(3, 16)
    out = {}
    for stopgrad in (True, False):
        model = make_model(energy="mixture", mixture_stopgrad=stopgrad, think_steps=2).train()
        # fresh (0.0: the path through p is small but there) or with larger weights
        perturb(model, scale)
        terms, loss = one_train_loss(model, idx, targets)
        params = [model.mix_fc.weight, model.mix_proj.weight, model.mix_beta]
        out[stopgrad] = (terms["ce"].detach(), grads(loss, params))
    # same forward values: detach changes no op, no shape
    assert torch.equal(out[True][0], out[False][0])
    for g_sg, g_full in zip(out[True][1], out[False][1]):
        # float64 rounding is ~1e-16: a relative difference above min_rel_diff is a different
        # gradient
        assert (g_sg - g_full).abs().max() > min_rel_diff * g_full.abs().max()


def set_argmax_changing_mixture(model, favoured, beta=20.0):
    """Hand-set weights: g(ybar) ~ -<wte[favoured], ybar>, so dE/dp = e - beta * onehot(favoured)
    (context ignored)."""
    d = N_EMBD
    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte.zero_()
        wte[:, :V] = torch.eye(V, dtype=wte.dtype)  # orthonormal token embeddings
        model.mix_fc.weight.zero_()
        model.mix_fc.weight[0, d + favoured] = 1.0
        model.mix_fc.bias.zero_()
        model.mix_fc.bias[0] = 10.0  # deep in GELU's linear part: gelu'(pre) ~ 1
        model.mix_proj.weight.zero_()
        model.mix_proj.weight[0, 0] = -1.0
        model.mix_beta.fill_(beta)


def test_mixture_thinking_can_change_the_argmax():
    """A mixture energy whose g favours token 7 changes argmax z_K vs z_0; a linear energy with the
    same e cannot."""
    favoured = 7
    cfg = {"mixture_hidden": 4, "entropy_weight": 0.0, "think_lr": 0.5, "think_max_move": math.inf,
           "softmax_temperature": 1.0}
    mix = make_model(energy="mixture", **cfg).eval()
    set_argmax_changing_mixture(mix, favoured)
    lin = make_model(energy="linear", **cfg).eval()
    e = rand(2, 6, V, scale=0.3, seed=8)
    e[..., favoured] = e.max() + 0.1  # token 7 has the highest (worst) energy under the linear head
    h = rand(2, 6, N_EMBD, seed=9)
    # the hand-set energy vector really is e - beta * onehot(7)
    _, dE_dp = energies.mixture_energy(mix, h, e)(rand_p(2, 6, V, seed=10))
    assert torch.allclose(dE_dp, e - 20.0 * F.one_hot(torch.tensor(favoured), V), rtol=0, atol=1e-6)
    with torch.no_grad():
        zs_mix = ebm.system2_logits(mix, e, ebm.make_energy(mix, h, e), 20)
        zs_lin = ebm.system2_logits(lin, e, ebm.make_energy(lin, h, e), 20)
    s1 = e.argmin(-1)
    assert torch.equal(zs_mix[0].argmax(-1), s1) and (s1 != favoured).all()
    assert (zs_mix[-1].argmax(-1) == favoured).all()  # thinking changed its mind at every position
    for z in zs_lin:  # linear, tau = 0: the argmax never changes
        assert torch.equal(z.argmax(-1), s1)
    # thinking descended the true free energy
    energy = energies.mixture_energy(mix, h, e)
    assert (free_energy_of(energy, zs_mix[-1], 0.0) < free_energy_of(energy, zs_mix[0],
                                                                     0.0) - 1.0).all()


# --------------------------------------------------------------------------------------------------
# 2. transformer energy (EBT)


def reference_attention(attn, x, mask, pos):
    """Causal self-attention written out with an explicit boolean mask (S, S) (True = may attend)
    and the rotary position pos (S,) of each token: queries and keys turned by their own positions'
    angles."""
    B, S, C = x.shape
    nh, hs = attn.n_head, C // attn.n_head
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, S, nh, hs).transpose(1, 2) for t in (q, k, v))
    cos, sin = rotary(hs, int(pos.max()) + 1)
    q, k = rotate(q, cos[pos], sin[pos]), rotate(k, cos[pos], sin[pos])
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
    att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
    y = (att @ v).transpose(1, 2).reshape(B, S, C)
    return attn.c_proj(y)


def reference_transformer_energy(model, idx, p):
    """
    E (B, T) recomputed from scratch over the doubled sequence [observed | candidates] with a (2T x
    2T) mask: observed i sees observed 0..i; candidate slot t, at x_{t+1}'s rotary position, sees
    observed 0..t and itself.
    """
    T = idx.size(1)
    tr = model.transformer
    pos = torch.arange(T)
    obs = tr.wte(idx)
    first = len(tr.h) - (model.config.energy_layers or len(tr.h))
    for block in tr.h[:first]:  # energy_layers: the candidate slots join at the top blocks only
        obs = block(obs, model.rope(0, T))
    cand = p @ tr.wte.weight
    x = torch.cat([obs, cand], dim=1)  # (B, 2T, d)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = torch.zeros(2 * T, 2 * T, dtype=torch.bool)
    mask[:T, :T] = causal
    mask[T:, :T] = causal
    mask[T:, T:] = torch.eye(T, dtype=torch.bool)
    for block in tr.h[first:]:
        x = x + reference_attention(block.attn, block.ln_1(x), mask, torch.cat([pos, pos + 1]))
        x = x + block.mlp(block.ln_2(x))
    return model.energy_readout(tr.ln_f(x[:, T:])).squeeze(-1)


def transformer_model(seed=0, scale=0.15, **overrides):
    """A tiny float64 transformer-energy GPT with perturbed weights (non-uniform attention, non-zero
    marker)."""
    return perturb(make_model(seed=seed, energy="transformer", **overrides), scale, seed=seed)


@pytest.mark.parametrize("energy_layers", [0, 1])
def test_transformer_energy_reuse_equals_recompute(energy_layers):
    """E, dE/dp and parameter gradients from the reused observed keys/values equal a from-scratch
    [obs | cand] pass."""
    model = transformer_model(energy_layers=energy_layers)
    idx, _ = seq_batch(2, 16, seed=1)
    p = rand_p(2, 16, V, seed=2).requires_grad_(True)
    params = list(model.parameters())
    w_E, w_G = rand(2, 16, seed=3), rand(2, 16, V, seed=4)

    _, caches = filled_caches(model, idx)
    E, dE_dp = energies.transformer_energy(model, caches)(p)
    E_ref = reference_transformer_energy(model, idx, p)
    (dE_dp_ref,) = torch.autograd.grad(E_ref.sum(), p, create_graph=True)
    assert E.shape == (2, 16) and dE_dp.shape == (2, 16, V)
    assert torch.allclose(E, E_ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(dE_dp, dE_dp_ref, rtol=1e-10, atol=1e-12)
    assert E.std() > 1e-2 and dE_dp.std() > 1e-3  # non-trivial values
    # a loss on both (the thinking loss uses dE/dp: second order in the parameters)
    g = grads((E * w_E).sum() + (dE_dp * w_G).sum(), params)
    g_ref = grads((E_ref * w_E).sum() + (dE_dp_ref * w_G).sum(), params)
    names = [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, g, g_ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11), name
    nonzero = {n for n, a in zip(names, g) if a.abs().max() > 0}
    assert {"transformer.h.0.mlp.c_fc.weight", "energy_readout.weight", "transformer.wte.weight",
            "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"} <= nonzero


def test_transformer_energy_has_no_leak():
    """E_t and dE/dp_t ignore tokens after x_t and the candidates of other positions; they do see
    p_t and x_<=t."""
    model = transformer_model()
    B, T = 2, 16
    idx, _ = seq_batch(B, T, seed=5)
    p = rand_p(B, T, V, seed=6)
    _, caches = filled_caches(model, idx)
    E, G = energies.transformer_energy(model, caches)(p)
    g = torch.Generator().manual_seed(7)
    for t in (0, 6, 14):
        idx2 = idx.clone()
        idx2[:, t + 1:] = (idx[:, t + 1:] + 1 + torch.randint(V - 1, idx[:, t + 1:].shape,
                                                              generator=g)) % V
        _, caches2 = filled_caches(model, idx2)
        E2, G2 = energies.transformer_energy(model, caches2)(p)
        assert torch.allclose(E2[:, : t + 1], E[:, : t + 1], rtol=0, atol=1e-12)
        assert torch.allclose(G2[:, : t + 1], G[:, : t + 1], rtol=0, atol=1e-12)
        # later tokens do reach later positions
        assert (E2[:, t + 1:] - E[:, t + 1:]).abs().max() > 1e-6
        # other positions' candidates do not matter; the own candidate does
        p3 = p.clone()
        others = torch.arange(T) != t
        p3[:, others] = rand_p(B, T - 1, V, seed=10 + t)
        E3, G3 = energies.transformer_energy(model, caches)(p3)
        assert torch.allclose(E3[:, t], E[:, t], rtol=0, atol=1e-12)
        assert torch.allclose(G3[:, t], G[:, t], rtol=0, atol=1e-12)
        assert (E3[:, others] - E[:, others]).abs().min() > 1e-9
        p4 = p.clone()
        p4[:, t] = rand_p(B, V, seed=30 + t)
        E4, _ = energies.transformer_energy(model, caches)(p4)
        assert (E4[:, t] - E[:, t]).abs().min() > 1e-9
        assert torch.allclose(E4[:, others], E[:, others], rtol=0, atol=1e-12)
    # and an earlier token does reach position t
    idx5 = idx.clone()
    idx5[:, 3] = (idx[:, 3] + 1) % V
    _, caches5 = filled_caches(model, idx5)
    E5, _ = energies.transformer_energy(model, caches5)(p)
    assert torch.allclose(E5[:, :3], E[:, :3], rtol=0, atol=1e-12)
    assert (E5[:, 3:] - E[:, 3:]).abs().min() > 1e-9


def test_transformer_training_double_backward():
    """transformer, training, think_steps=2: the training loss backward gives finite non-zero grads
    where it should."""
    model = transformer_model(think_steps=2, think_max_move=math.inf).train()
    idx, targets = seq_batch(2, 16, seed=8)
    _, loss = one_train_loss(model, idx, targets)
    loss.backward()
    named = dict(model.named_parameters())
    for name in ("energy_readout.weight", "transformer.wte.weight",
                 "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                 "transformer.h.1.mlp.c_fc.weight", "transformer.ln_f.weight",
                 "energy_head.weight"):
        g = named[name].grad
        assert g is not None and torch.isfinite(g).all(), name
        assert g.abs().max() > 1e-8, name
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("param,index", [("energy_readout.weight", (0, 3)),
                                         ("transformer.wte.weight", (3, 5)),
                                         ("transformer.h.1.attn.c_attn.weight", (40, 7))])
def test_transformer_thinking_loss_gradient_matches_finite_difference(param, index):
    """d(thinking CE)/d(one scalar parameter) by double backward equals a central finite difference
    (float64)."""
    model = transformer_model(think_steps=2, think_max_move=math.inf, think_lr=2.0).train()
    idx, targets = seq_batch(2, 8, seed=9)
    w = dict(model.named_parameters())[param]

    def thinking_loss():
        return ebm.losses(model, idx, targets)["ce"].mean()

    (g,) = torch.autograd.grad(thinking_loss(), w)
    eps = 1e-5
    with torch.no_grad():
        w0 = w[index].item()
        w[index] = w0 + eps
        up = thinking_loss()
        w[index] = w0 - eps
        down = thinking_loss()
        w[index] = w0
    fd = (up - down).item() / (2 * eps)
    assert abs(g[index].item()) > 1e-4  # the parameter matters
    assert abs(g[index].item() - fd) <= 1e-6 * abs(fd) + 1e-9


def test_transformer_candidates_do_not_use_fused_sdpa(monkeypatch):
    """candidate_energy and its double backward never call scaled_dot_product_attention (no double
    backward on CUDA)."""
    model = transformer_model(think_steps=2).train()
    idx, targets = seq_batch(2, 16, seed=10)
    # the observed stream may use SDPA: it is differentiated once only
    h, caches = filled_caches(model, idx)
    e = model.energies(h)

    def forbidden(*args, **kwargs):
        raise AssertionError("scaled_dot_product_attention called in the candidate path")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", forbidden)
    with pytest.raises(AssertionError, match="candidate path"):  # the patch is live for model.py
        model(idx)
    # training: model.train()
    zs = ebm.system2_logits(model, e, ebm.make_energy(model, h, e, caches), 2)
    loss = F.cross_entropy(zs[-1].flatten(0, 1), targets.flatten())
    loss.backward()
    assert (model.energy_readout.weight.grad.abs().max() > 0
            and model.transformer.wte.weight.grad.abs().max() > 0)


@pytest.mark.parametrize("samples", [1, 3])
def test_transformer_generate_cache_equals_no_cache(samples):
    """energy=transformer: greedy generation with the KV cache gives the same tokens as without it
    (within a block)."""
    model = transformer_model(seed=3, scale=0.3, think_steps=3).eval()
    prompt = torch.tensor([[1, 4, 2], [7, 7, 0]])
    torch.manual_seed(0)  # self-verification draws its random starts in the same order either way
    a = ebm.generate(model, prompt, 12, thinking(3, samples), use_cache=True)
    torch.manual_seed(0)
    b = ebm.generate(model, prompt, 12, thinking(3, samples), use_cache=False)
    assert a.shape == (2, 15) and torch.equal(a[:, :3], prompt)
    # tokens: top-2 logit gaps (> 2e-4), F gaps of the starts (> 6e-4) dwarf float64 rounding
    assert torch.equal(a, b)
    # thinking matters here: System 1 alone picks other tokens somewhere, so the comparison covers
    # the energy path
    c = ebm.generate(model, prompt, 12, thinking(0), use_cache=True)
    assert not torch.equal(a, c)
    # and each token is the argmax of thinking over its full prefix, recomputed from scratch
    if samples == 1:
        for i in range(3, 15):
            with torch.no_grad():
                h, caches = filled_caches(model, a[:, :i])
                e = model.energies(h[:, -1:])
                z = ebm.system2_logits(model, e, ebm.make_energy(model, h[:, -1:], e, caches),
                                       3)[-1][:, -1]
            assert torch.equal(z.argmax(-1), a[:, i])


# --------------------------------------------------------------------------------------------------
# 3. EBT machinery: learnable step size, random steps, step-size jitter, noise, CE over all steps,
# truncation


@pytest.mark.parametrize("energy", ["linear", "mixture", "transformer"])
def test_learnable_think_lr_gets_a_gradient(energy):
    """think_lr_learnable: eta = exp(think_log_lr) is a parameter (initialised at think_lr) that
    gets a gradient."""
    model = make_model(energy=energy, think_lr_learnable=True, think_lr=0.3, think_steps=2,
                       think_max_move=math.inf).train()
    named = dict(model.named_parameters())
    assert "think_log_lr" in named and named["think_log_lr"].dim() == 0
    assert torch.is_tensor(model.think_lr()) and abs(model.think_lr().item() - 0.3) < 1e-7
    idx, targets = seq_batch(2, 16)
    _, loss = one_train_loss(model, idx, targets)
    loss.backward()
    g = model.think_log_lr.grad
    assert g is not None and torch.isfinite(g) and g.abs() > 1e-10
    # without the option there is no such parameter and eta is the configured constant
    plain = make_model(energy=energy, think_lr=0.3)
    assert "think_log_lr" not in dict(plain.named_parameters()) and plain.think_lr() == 0.3


def test_learnable_think_lr_has_its_own_optimizer_group():
    """configure_optimizers puts think_log_lr alone in a group with lr_mult = think_lr_lr_mult and
    no weight decay."""
    model = make_model(energy="mixture", think_lr_learnable=True)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu", 7.0)
    groups = opt.param_groups
    own = [g for g in groups if any(p is model.think_log_lr for p in g["params"])]
    assert len(own) == 1 and len(own[0]["params"]) == 1
    assert own[0]["lr_mult"] == 7.0 and own[0]["weight_decay"] == 0.0
    others = [g for g in groups if g is not own[0]]
    assert all(g.get("lr_mult", 1.0) == 1.0 for g in others)
    # every parameter sits in exactly one group
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    # without the option: no extra group, no lr_mult
    opt = make_model(energy="mixture").configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu", 7.0)
    assert all("lr_mult" not in g for g in opt.param_groups)


def test_train_scales_the_think_lr_group(tmp_path, monkeypatch):
    """train.train sets the think_log_lr group's lr to lr * train.think_lr_lr_mult at every step,
    and eta is learned."""
    corpus = write_corpus(tmp_path / "c.txt", n_chars=3000)
    seen = []
    real_step = train_mod.train_step

    def spy(model, optimizer, *args, **kwargs):
        seen.append([(g["lr"], g.get("lr_mult", 1.0),
                      len(g["params"])) for g in optimizer.param_groups])
        return real_step(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", spy)
    run_train(TINY_MODEL + ["data.block_size=16", "data.batch_size=4", "train.max_steps=4",
                            "train.eval_interval=4",
                            "train.eval_iters=1", "train.warmup_steps=2",
                            "model.think_lr_learnable=true",
                            "model.think_lr=0.5", "train.think_lr_lr_mult=7.0",
                            f"data.data_path={corpus}",
                            f"out_dir={tmp_path / 'out'}"])
    assert len(seen) == 4
    for groups in seen:
        base = [lr for lr, mult, _ in groups if mult == 1.0]
        mine = [lr for lr, mult, n in groups if mult == 7.0 and n == 1]
        assert len(mine) == 1 and len(set(base)) == 1 and base[0] > 0
        assert mine[0] == pytest.approx(7.0 * base[0], rel=1e-12)
    ckpt = torch.load(tmp_path / "out" / "final.pt", map_location="cpu", weights_only=True)
    assert abs(ckpt["model"]["think_log_lr"].item() - math.log(0.5)) > 1e-6  # it was trained


def record_think_calls(monkeypatch):
    calls = []
    real_think = ebm.think

    def spy(z, energy, steps, step, *args, **kwargs):
        calls.append((steps, float(step.keywords["lr"])))
        return real_think(z, energy, steps, step, *args, **kwargs)

    monkeypatch.setattr(ebm, "think", spy)
    return calls


def repeat_losses(model, idx, targets, n):
    """Run ebm.losses n times on one batch (no gradients): what the spies record is the point."""
    with torch.no_grad():
        for _ in range(n):
            ebm.losses(model, idx, targets)


def test_think_steps_random_draws_k_in_range(monkeypatch):
    """think_steps_random: in training K is drawn from 1..think_steps (several values seen); eval
    uses think_steps."""
    model = make_model(think_steps=4, think_steps_random=True).train()
    idx, targets = seq_batch(2, 4)
    calls = record_think_calls(monkeypatch)
    torch.manual_seed(0)
    repeat_losses(model, idx, targets, 60)
    ks = [k for k, _ in calls]
    assert len(ks) == 60 and set(ks) == {1, 2, 3, 4}
    calls.clear()
    model.eval()
    repeat_losses(model, idx, targets, 5)
    assert [k for k, _ in calls] == [4] * 5
    # off: always think_steps in training too
    calls.clear()
    model.config.think_steps_random = False
    model.train()
    repeat_losses(model, idx, targets, 5)
    assert [k for k, _ in calls] == [4] * 5


def test_think_steps_random_changes_the_number_of_outputs(monkeypatch):
    """think_steps_random: the zs that system2_logits returns have len K + 1 for the drawn K, K
    varies."""
    model = make_model(energy="mixture", think_steps=3, think_steps_random=True,
                       ce_all_steps=True).train()
    lens = []
    real = ebm.system2_logits

    def spy(*args, **kwargs):
        zs = real(*args, **kwargs)
        lens.append(len(zs))
        return zs

    monkeypatch.setattr(ebm, "system2_logits", spy)
    idx, targets = seq_batch(2, 4)
    torch.manual_seed(1)
    repeat_losses(model, idx, targets, 30)
    assert set(lens) == {2, 3, 4}


@pytest.mark.parametrize("learnable", [False, True])
def test_think_lr_jitter_varies_the_step_size(monkeypatch, learnable):
    """think_lr_jitter = j: in training the step size passed to think varies in [lr (1-j), lr
    (1+j)]; eval uses lr."""
    lr, j = 0.5, 0.3
    model = make_model(think_lr=lr, think_lr_jitter=j, think_lr_learnable=learnable).train()
    idx, targets = seq_batch(2, 4)
    calls = record_think_calls(monkeypatch)
    torch.manual_seed(0)
    repeat_losses(model, idx, targets, 40)
    lrs = [x for _, x in calls]
    assert all(lr * (1 - j) - 1e-12 <= x <= lr * (1 + j) + 1e-12 for x in lrs)
    assert len(set(lrs)) == 40
    assert min(lrs) < lr * (1 - j / 2) and max(lrs) > lr * (1 + j / 2)  # it spans the range
    calls.clear()
    model.eval()
    with torch.no_grad():
        ebm.losses(model, idx, targets)
    assert [x for _, x in calls] == [pytest.approx(lr, rel=1e-7)]


@pytest.mark.parametrize("energy", ["linear", "mixture", "transformer"])
def test_think_noise_random_in_training_deterministic_in_eval(energy):
    """think_noise > 0: training outputs differ between calls, eval outputs do not (and noise 0 is
    deterministic)."""
    idx, targets = seq_batch(2, 8)
    model = make_model(energy=energy, think_noise=0.1, think_steps=2)
    with torch.no_grad():
        model.train()
        a, b = ebm.losses(model, idx, targets)["ce"], ebm.losses(model, idx, targets)["ce"]
        assert (a - b).abs().min() > 0  # every position gets its own noise
        model.eval()
        a, b = ebm.losses(model, idx, targets)["ce"], ebm.losses(model, idx, targets)["ce"]
        assert torch.equal(a, b)
        model.train()
        model.config.think_noise = 0.0
        a, b = ebm.losses(model, idx, targets)["ce"], ebm.losses(model, idx, targets)["ce"]
        assert torch.equal(a, b)


@pytest.mark.parametrize("energy", ["linear", "mixture", "transformer"])
def test_ce_all_steps_is_mean_of_step_ces(energy, monkeypatch):
    """ce_all_steps: terms['ce_steps'] is the per-position mean of CE(z_1..z_K); total_loss uses it
    instead of ce."""
    model = perturb(make_model(energy=energy, think_steps=3, ce_all_steps=True, think_lr=2.0),
                    0.1).train()
    idx, targets = seq_batch(2, 8)
    recorded = []
    real = ebm.system2_logits

    def spy(*args, **kwargs):
        zs = real(*args, **kwargs)
        recorded.append(zs)
        return zs

    monkeypatch.setattr(ebm, "system2_logits", spy)
    terms = ebm.losses(model, idx, targets)
    (zs,) = recorded
    assert len(zs) == 4
    step_ces = [F.cross_entropy(z.flatten(0, 1), targets.flatten(),
                                reduction="none").view(2, 8) for z in zs[1:]]
    assert torch.allclose(terms["ce_steps"], torch.stack(step_ces).mean(0), rtol=1e-12, atol=1e-14)
    assert torch.allclose(terms["ce"], step_ces[-1], rtol=1e-12, atol=1e-14)
    assert (terms["ce_steps"].mean() - terms["ce"].mean()).abs() > 1e-6  # the steps really differ
    cfg = model.config
    expected = terms["ce_steps"].mean() + cfg.aux_ce_weight * terms["ce_s1"].mean()
    assert torch.allclose(ebm.total_loss(cfg, terms), expected, rtol=1e-14, atol=0)
    # off, or in eval mode: no ce_steps, total_loss uses ce
    cfg.ce_all_steps = False
    terms = ebm.losses(model, idx, targets)
    assert "ce_steps" not in terms
    cfg.ce_all_steps = True
    model.eval()
    assert "ce_steps" not in ebm.losses(model, idx, targets)


@pytest.mark.parametrize("energy", ["linear", "mixture", "transformer"])
def test_think_truncate_equals_manual_detach(energy):
    """think_truncate: the gradient equals that of detaching z before the last step, and differs
    from full backprop."""
    K = 3
    kw = {"energy": energy, "think_steps": K, "think_max_move": math.inf, "think_lr": 2.0,
          "mixture_stopgrad": False}
    model = perturb(make_model(think_truncate=True, **kw), 0.1).train()
    params = list(model.parameters())
    idx, targets = seq_batch(2, 8)
    cfg = model.config

    def ce(z):
        return F.cross_entropy(z.flatten(0, 1), targets.flatten())

    g_trunc = grads(one_train_loss(model, idx, targets)[1], params)

    # by hand: K - 1 steps without a graph, then one step with it
    caches = model.new_caches(2) if energy == "transformer" else None
    h = model(idx, caches)
    e = model.energies(h)
    z0 = -e / cfg.softmax_temperature
    energy_fn = ebm.make_energy(model, h, e, caches)
    with torch.no_grad():
        z = ebm.think(z0, energy_fn, K - 1, free_energy_rule(cfg.think_lr, cfg.entropy_weight))[-1]
    zK = ebm.think(z.detach(), energy_fn, 1, free_energy_rule(cfg.think_lr, cfg.entropy_weight))[-1]
    g_manual = grads(ce(zK) + cfg.aux_ce_weight * ce(z0), params)

    cfg.think_truncate = False
    g_full = grads(one_train_loss(model, idx, targets)[1], params)
    names = [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, g_trunc, g_manual):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13), name
    diff = max((a - b).abs().max().item() for a, b in zip(g_trunc, g_full))
    assert diff > 1e-6


# --------------------------------------------------------------------------------------------------
# 4. self-verification: M candidates per position, keep the lowest free energy


def test_self_verification_linear_all_candidates_converge_alike(monkeypatch):
    """Linear energy, tau > 0, long thinking: all M starts reach softmax(-e/tau); samples=M equals
    samples=1."""
    tau, M = 2.0, 5
    model = make_model(entropy_weight=tau, think_lr=0.5, think_max_move=math.inf,
                       softmax_temperature=0.7).eval()
    e = rand(2, 4, V, seed=1)
    target = F.softmax(-e / tau, -1)
    torch.manual_seed(0)
    one = ebm.system2_logits(model, e, ebm.linear_energy(e), 1000)
    calls = []
    real_think = ebm.think
    monkeypatch.setattr(ebm, "think", lambda *a,
                        **k: calls.append(real_think(*a, **k)) or calls[-1])
    many = ebm.self_verify(model, e, ebm.linear_energy(e), 1000, M)[0]
    (zs,) = calls
    assert zs[0].shape == (M, 2, 4, V)
    assert (F.softmax(zs[0][1:], -1) - target).abs().max() > 0.1  # the random starts start far away
    # and all M arrive at the unique fixed point
    assert (F.softmax(zs[-1], -1) - target).abs().max() < 1e-6
    assert torch.allclose(F.softmax(many[-1], -1), F.softmax(one[-1], -1), rtol=0, atol=1e-6)
    # z_0 = -e / T either way: same op, same e
    assert torch.equal(many[0], one[0]) and len(many) == len(one) == 1001


@pytest.mark.parametrize("energy", ["mixture", "transformer"])
def test_self_verification_never_worse_than_system1_start(energy, monkeypatch):
    """samples=M with verify_by=free_energy keeps per position the lowest free energy of M
    candidates, so it is <= the z_0 start's (samples=1)."""
    tau, K, M = 0.1, 3, 6
    model = perturb(make_model(energy=energy, entropy_weight=tau, think_steps=K, think_lr=1.0,
                               think_samples=M,
                               mixture_stopgrad=False, verify_by="free_energy"), 0.1).eval()
    idx, targets = seq_batch(2, 16)
    with torch.no_grad():
        caches = model.new_caches(2) if energy == "transformer" else None
        h = model(idx, caches)
        e = model.energies(h)
        energy_fn = ebm.make_energy(model, h, e, caches)
        torch.manual_seed(0)
        one = ebm.system2_logits(model, e, energy_fn, K)[-1]
        calls = []
        real_think = ebm.think
        monkeypatch.setattr(ebm, "think", lambda *a,
                            **k: calls.append(real_think(*a, **k)) or calls[-1])
        zs_many, chosen = ebm.self_verify(model, e, energy_fn, K, M)
        many = zs_many[-1]
        f_one, f_many = free_energy_of(energy_fn, one, tau), free_energy_of(energy_fn, many, tau)
        z_all = calls[0][-1]  # (M, B, T, V): every candidate after K steps
        f_all = free_energy_of(energy_fn, z_all, tau)  # (M, B, T)
    # inside a batch of M a candidate rounds differently than alone (BLAS paths differ by shape,
    # alignment and CPU): floats are compared with float64 tolerances, and the candidate kept is
    # read as an index
    # candidate 0: the System 1 start, thought as alone
    assert torch.allclose(z_all[0], one, rtol=1e-10, atol=1e-10)
    kept = z_all.gather(0, chosen[None, ..., None].expand(1, *many.shape))[0]
    assert torch.allclose(many, kept, rtol=1e-10, atol=1e-10)  # the output is the chosen candidate
    # lowest F
    assert torch.allclose(f_all.gather(0, chosen[None])[0], f_all.min(0).values, rtol=1e-10,
                          atol=1e-12)
    assert (f_many <= f_one + 1e-9).all()
    assert ((chosen != 0) & (f_many < f_one - 1e-6)).any()  # the random starts do win somewhere
    assert torch.allclose(many[chosen == 0], one[chosen == 0], rtol=1e-10, atol=1e-10)
    # the loss in eval mode uses think_samples
    torch.manual_seed(0)
    with torch.no_grad():
        terms = ebm.losses(model, idx, targets)
    ref = F.cross_entropy(many.flatten(0, 1), targets.flatten(), reduction="none").view(2, 16)
    assert torch.allclose(terms["ce"], ref, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# 5. no leak from future tokens in every mode


LEAK_MODES = {"plain": {"use_contrastive": False}, "cd": {"use_contrastive": True,
                                                          "contrastive_type": "cd"},
              "pcd": {"use_contrastive": True, "contrastive_type": "pcd"}}


@pytest.mark.parametrize("mode", list(LEAK_MODES))
@pytest.mark.parametrize("energy", ["mixture", "transformer"])
def test_no_leak_from_future_tokens(energy, mode):
    """Per-position loss terms at positions <= t do not change when tokens after x_{t+1} change
    (train and eval)."""
    B, T = 2, 16  # whole windows (block_size 16): PCD's replay buffer stores windows of block_size
    model = perturb(make_model(
        energy=energy, think_steps=2, think_noise=0.1, think_lr_jitter=0.2, ce_all_steps=True,
                               contrastive_k=2,
        langevin_step_size=0.3, langevin_noise_scale=0.05, n_persistent=7, pcd_reinit_prob=0.3,
                               entropy_weight=0.2,
        think_samples=3, mixture_stopgrad=False, **LEAK_MODES[mode]), 0.1).train()
    seq = torch.randint(V, (B, T + 1), generator=torch.Generator().manual_seed(7))
    expected = {"ce", "ce_s1",
                "ce_steps"} | ({"cd", "cd_gap"} if LEAK_MODES[mode]["use_contrastive"] else set())
    assert_no_leak(model, seq, (0, 4, 9), expected)


# 6. random text for these energies: tests/test_train.py::test_no_leak_on_random_text covers them
# too


def test_replay_buffer_warm_starts_the_same_windows(monkeypatch):
    """model.replay_size: stored windows come back with their targets, and thinking resumes from
    their stored z_K."""
    model = make_model(think_steps=2, replay_size=4, replay_frac=0.5).train()
    state = contrastive.ReplayState(model.config).to(torch.float64)
    starts, draws = [], []
    real_think, real_draw = ebm.think, state.replay_draw
    monkeypatch.setattr(ebm, "think", lambda z, *a,
                        **k: starts.append(z.detach().clone()) or real_think(z, *a, **k))
    monkeypatch.setattr(state, "replay_draw", lambda *a: draws.append(real_draw(*a)) or draws[-1])
    idx1, tgt1 = seq_batch(4, 16, seed=20)
    contrastive.losses(model, idx1, tgt1, state)  # empty buffer: nothing replayed, all 4 windows stored
    assert draws[-1][2] is None
    assert state.replay_count == 4 and torch.equal(state.replay_x,
                                                   idx1) and torch.equal(state.replay_y, tgt1)
    stored = state.replay_z.clone()
    assert stored.abs().sum() > 0

    idx2, tgt2 = seq_batch(4, 16, seed=21)
    contrastive.losses(model, idx2, tgt2, state)  # half the batch (2 rows) is replayed
    idx_used, tgt_used, slots = draws[-1]
    assert slots.numel() == 2
    assert torch.equal(idx_used[:2], idx1[slots]) and torch.equal(tgt_used[:2], tgt1[slots])
    assert torch.equal(idx_used[2:], idx2[2:])
    assert torch.equal(starts[-1][:2], stored[slots])  # warm start: where their thinking stopped
    with torch.no_grad():
        e2 = model.energies(model(idx2))
    # fresh rows: System 1
    assert torch.allclose(starts[-1][2:], -e2[2:] / model.config.softmax_temperature)
    assert state.replay_count == 6
