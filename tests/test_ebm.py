"""Tests of ebm.py: the free energy, the think loop, the losses (no leaks), and contrastive
divergence."""

import copy
import math
from functools import partial

import pytest
import torch
from torch.nn import functional as F

import contrastive
import ebm
import energies
from conftest import free_energy_rule, linear_logits, make_model, perturb

pytestmark = pytest.mark.usefixtures("one_thread")

V = 11
D = torch.float64


def rand(*shape, scale=1.0, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return scale * torch.randn(*shape, dtype=D, generator=g)


def flat_grad(loss, params, retain_graph=True):
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g,
                      p in zip(grads, params)])


def train_model(seed=0, **overrides):
    """A tiny float64 GPT in training mode (dropout 0) with the given config overrides."""
    return make_model(seed=seed, **overrides).train()


def new_state(cfg):
    """A float64 ReplayState (the PCD buffer and fast weights) for cfg."""
    return contrastive.ReplayState(cfg).to(D)


def seq_batch(B=3, T=16, seed=0):
    """idx (B, T) and targets (B, T) cut from one token sequence, as data.py does."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(V, (B, T + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


# --------------------------------------------------------------------------------------------------
# 1. the free energy and its closed-form gradient


@pytest.mark.parametrize("tau", [0.0, 0.1, 1.0])
def test_free_energy_grad_matches_autograd(tau):
    """free_energy_grad equals torch.autograd.grad of free_energy (float64, random z and e)."""
    torch.manual_seed(0)
    z = rand(4, 5, V, scale=3.0).requires_grad_(True)
    e = rand(4, 5, V, scale=2.0)
    (auto,) = torch.autograd.grad(ebm.free_energy(z, ebm.linear_energy(e), tau)[1].sum(), z)
    closed = ebm.free_energy_grad(z.detach(), e, tau)
    assert closed.shape == z.shape
    assert torch.allclose(closed, auto, rtol=1e-10, atol=1e-13)
    assert auto.abs().max() > 1e-3  # the comparison is not between two zeros


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0, 3.0])
def test_free_energy_minimum_is_boltzmann(tau):
    """F is minimised at softmax(-e/tau) with value -tau * logsumexp(-e/tau), and the gradient is
    zero there."""
    torch.manual_seed(1)
    e = rand(6, V)
    z_star = -e / tau
    f_star = ebm.free_energy(z_star, ebm.linear_energy(e), tau)[1]
    assert torch.allclose(f_star, -tau * torch.logsumexp(-e / tau, -1), rtol=0, atol=1e-12)
    assert ebm.free_energy_grad(z_star, e, tau).abs().max() < 1e-14
    for _ in range(5):  # any other candidate has a higher free energy
        assert (ebm.free_energy(z_star + rand(6, V), ebm.linear_energy(e), tau)[1] > f_star).all()


# --------------------------------------------------------------------------------------------------
# 2, 3, 4, 10. the think loop with a linear energy


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_think_converges_to_boltzmann(tau):
    """With a linear energy and tau > 0, long thinking (no clip, no noise) converges to
    softmax(-e/tau)."""
    torch.manual_seed(2)
    e = rand(4, 5, V)
    z = rand(4, 5, V)
    target = F.softmax(-e / tau, -1)
    zs = ebm.think(z, ebm.linear_energy(e), 3000, free_energy_rule(1.0 / tau, tau))
    assert len(zs) == 3001 and zs[0] is z
    err0 = (F.softmax(zs[0], -1) - target).abs().max()
    err = (F.softmax(zs[-1], -1) - target).abs().max()
    assert err0 > 0.1
    assert err < 1e-3
    # and thinking is a descent on F: the free energy never rises along the way (small steps)
    fs = torch.stack([ebm.free_energy(zk, ebm.linear_energy(e), tau)[1] for zk in zs[::50]])
    assert (fs[1:] <= fs[:-1] + 1e-12).all()


@pytest.mark.parametrize("lr", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("max_move", [math.inf, 0.25, 0.01])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_tau0_thinking_keeps_argmax_and_sharpens(lr, max_move, temperature):
    """tau = 0, no noise: at every step the argmax stays argmin e and the max probability never
    decreases."""
    torch.manual_seed(3)
    e = rand(8, 16, V, scale=2.0)
    z0 = -e / temperature
    zs = ebm.think(z0, ebm.linear_energy(e), 200, free_energy_rule(lr, 0.0, max_move))
    best = e.argmin(-1)
    prev = F.softmax(z0, -1).max(-1).values
    for z in zs:
        assert torch.equal(z.argmax(-1), best)
        pmax = F.softmax(z, -1).max(-1).values
        assert (pmax >= prev - 1e-12).all()
        prev = pmax
    p0 = F.softmax(z0, -1).max(-1).values
    assert (prev > p0).all() and (prev - p0).mean() > 1e-2  # it really did sharpen
    if math.isfinite(max_move):  # the clip is honoured
        moves = torch.stack([(b - a).abs().max() for a, b in zip(zs[:-1], zs[1:])])
        assert moves.max() <= max_move + 1e-12


@pytest.mark.parametrize("max_move", [math.inf, 0.05])
def test_think_step_does_not_depend_on_batch_or_length(max_move):
    """Thinking on one row (1, 1, V) gives the same result as that row inside an (8, 16, V)
    batch."""
    torch.manual_seed(4)
    e_big = rand(8, 16, V, scale=3.0)
    z_big = rand(8, 16, V)
    e_one, z_one = e_big[5:6, 9:10].clone(), z_big[5:6, 9:10].clone()
    for tau in (0.0, 0.3):
        one = ebm.think(z_one, ebm.linear_energy(e_one), 10, free_energy_rule(0.7, tau,
                                                                              max_move))[-1]
        big = ebm.think(z_big, ebm.linear_energy(e_big), 10, free_energy_rule(0.7, tau,
                                                                              max_move))[-1]
        # one row alone vs inside a batch: float64 tolerance, not bit equality (kernels may split
        # shapes differently)
        assert torch.allclose(one[0, 0], big[5, 9], rtol=1e-10, atol=1e-12)
        # thinking moved the row by a step that is not divided by B*T
        assert (one - z_one).abs().max() > 1e-2
    # the same through system2_logits with a model config
    model = make_model(think_lr=0.7, think_max_move=max_move, entropy_weight=0.3)
    one = linear_logits(model, e_one, 5)[-1]
    big = linear_logits(model, e_big, 5)[-1]
    assert torch.allclose(one[0, 0], big[5, 9], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_thinking_at_tau_equal_temperature_is_a_no_op(temperature):
    """Linear energy, tau == softmax_temperature: z_0 is already the fixed point, softmax(z_K) ==
    softmax(z_0)."""
    torch.manual_seed(5)
    e = rand(4, 8, V, scale=2.0)
    model = make_model(softmax_temperature=temperature, entropy_weight=temperature, think_lr=2.0,
                       think_max_move=math.inf)
    zs = linear_logits(model, e, 20)
    assert torch.allclose(F.softmax(zs[-1], -1), F.softmax(zs[0], -1), rtol=0, atol=1e-12)
    assert torch.allclose(zs[0], -e / temperature)
    # control: with tau != T the same loop does change the distribution
    model.config.entropy_weight = temperature / 2
    zs = linear_logits(model, e, 20)
    assert (F.softmax(zs[-1], -1) - F.softmax(zs[0], -1)).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------
# 5. nothing at position t sees x_{t+1} (or anything later)


def run_losses(model, idx, targets, state, seed=123):
    torch.manual_seed(seed)
    terms = contrastive.losses(model, idx, targets, state)
    e = model.energies(model(idx))
    return terms, e


@pytest.mark.parametrize("think_steps", [0, 2])
@pytest.mark.parametrize("kind", ["cd", "pcd", "fast_pcd"])
def test_no_leak_from_future_tokens(think_steps, kind):
    """Per-position ce, ce_s1, cd and the energies at positions <= t do not change when tokens after
    x_{t+1} change."""
    B, T = 3, 16
    model = train_model(
        think_steps=think_steps, use_contrastive=True, contrastive_type=kind, contrastive_k=3,
        langevin_step_size=0.3, langevin_noise_scale=0.05, think_noise=0.1 if think_steps else 0.0,
        n_persistent=7, pcd_reinit_prob=0.3, entropy_weight=0.2)
    state0 = new_state(model.config)
    if kind == "fast_pcd":  # non-zero fast weights, so the sampling energy really uses them
        state0.fast_weight.copy_(rand(V, 32, scale=0.5, seed=9))
    g = torch.Generator().manual_seed(7)
    seq = torch.randint(V, (B, T + 1), generator=g)
    for t in (0, 5, 13):
        seq2 = seq.clone()
        seq2[:, t + 2:] = (seq[:, t + 2:] + 1 + torch.randint(V - 1, seq[:, t + 2:].shape,
                                                              generator=g)) % V
        assert (seq2[:, t + 2:] != seq[:, t + 2:]).all()
        terms_a, e_a = run_losses(model, seq[:, :-1], seq[:, 1:], copy.deepcopy(state0))
        terms_b, e_b = run_losses(model, seq2[:, :-1], seq2[:, 1:], copy.deepcopy(state0))
        assert set(terms_a) == {"ce", "ce_s1", "cd", "cd_gap"}
        for name in terms_a:
            assert torch.allclose(terms_a[name][:, : t + 1], terms_b[name][:, : t + 1], rtol=0,
                                  atol=1e-12), name
            # the changed tokens do matter later on: the test can see a change when there is one
            assert not torch.allclose(terms_a[name][:, t + 2:], terms_b[name][:, t + 2:]), name
        assert torch.allclose(e_a[:, : t + 1], e_b[:, : t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(e_a[:, t + 2:], e_b[:, t + 2:])


def test_hidden_states_ignore_later_tokens(tiny_model):
    """h_t and e_t at positions <= t are unchanged when idx[:, t+1:] changes (causal attention)."""
    g = torch.Generator().manual_seed(8)
    idx = torch.randint(V, (4, 16), generator=g)
    h = tiny_model(idx)
    for t in range(15):
        idx2 = idx.clone()
        idx2[:, t + 1:] = (idx[:, t + 1:] + 1) % V
        h2 = tiny_model(idx2)
        assert torch.allclose(h[:, : t + 1], h2[:, : t + 1], rtol=0, atol=1e-12)
        assert torch.allclose(tiny_model.energies(h)[:, : t + 1],
                              tiny_model.energies(h2)[:, : t + 1], rtol=0,
                              atol=1e-12)
        assert not torch.allclose(h[:, t + 1], h2[:, t + 1])


# --------------------------------------------------------------------------------------------------
# 6. contrastive divergence approaches cross-entropy


def test_exact_negatives_give_the_cross_entropy_gradient():
    """With q = softmax(-e) (T = 1), grad of mean(E_pos - <stopgrad q, e>) equals grad of mean
    CE(z_0 = -e)."""
    model = train_model(seed=1)
    with torch.no_grad():  # sharper energies than at init, so the identity is not about uniform q
        model.energy_head.weight.mul_(20)
    idx, targets = seq_batch(B=4, seed=1)
    params = list(model.parameters())
    e = model.energies(model(idx))
    q = F.softmax(-e, -1).detach()
    l_cd = (e.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - (q * e).sum(-1)).mean()
    ce = F.cross_entropy((-e).flatten(0, 1), targets.flatten())
    g_cd, g_ce = flat_grad(l_cd, params), flat_grad(ce, params)
    assert g_ce.norm() > 1e-2
    assert torch.allclose(g_cd, g_ce, rtol=1e-9, atol=1e-12)
    # the identity needs the exact negatives: uniform negatives give another gradient
    l_bad = (e.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - e.mean(-1)).mean()
    assert (flat_grad(l_bad, params) - g_ce).norm() > 0.1 * g_ce.norm()


def cd_vs_ce_gradients(ks, tau, lr=0.1):
    """(cosine, relative error) between the parameter gradients of mean(contrastive_loss) and mean
    CE(z_0)."""
    model = train_model(seed=0, use_contrastive=True, contrastive_type="cd",
                        langevin_temperature=tau,
                        softmax_temperature=1.0, langevin_noise_scale=0.0, contrastive_reg=0.0,
                        langevin_step_size=lr)
    with torch.no_grad():
        # peaked softmax(-e): the CD
        model.energy_head.weight.mul_(0.6 / model.energy_head.weight.std())
        # start (the data) is far from it
    idx, targets = seq_batch(B=4, seed=1)
    params = list(model.parameters())
    h = model(idx)
    e = model.energies(h)
    g_ce = flat_grad(F.cross_entropy((-e).flatten(0, 1), targets.flatten()), params)
    out = []
    for k in ks:
        model.config.contrastive_k = k
        g = flat_grad(contrastive.contrastive_loss(model, h, e, targets)[0].mean(), params)
        out.append((F.cosine_similarity(g, g_ce, dim=0).item(),
                    ((g - g_ce).norm() / g_ce.norm()).item()))
    return out


def test_cd_k_approaches_cross_entropy_gradient_as_k_grows():
    """Chains at tau = T = 1, no noise, no reg: CD-k's gradient turns toward the CE gradient as k
    grows (cd)."""
    ks = [1, 4, 16, 64]
    res = cd_vs_ce_gradients(ks, tau=1.0)
    cos = [c for c, _ in res]
    rel = [r for _, r in res]
    assert all(a < b for a, b in zip(cos, cos[1:])), cos
    assert all(a > b for a, b in zip(rel, rel[1:])), rel
    assert cos[-1] > 0.999 and rel[-1] < 0.01, res


def test_cd_k_with_tau0_collapses_to_the_mode():
    """Chains at tau = 0 collapse to the mode, so CD-k does not approach the CE gradient however
    large k is."""
    (_, rel_tau1), = cd_vs_ce_gradients([256], tau=1.0)
    (_, rel_tau0), = cd_vs_ce_gradients([256], tau=0.0)
    assert rel_tau1 < 1e-6
    assert rel_tau0 > 0.2


def natural_rule(lr, tau):
    """The contrastive chains' natural-gradient step rule with these parameters bound, for
    ebm.think."""
    return partial(contrastive.natural_step, lr=lr, tau=tau)


def test_natural_step_lands_on_the_boltzmann_distribution():
    """Linear energy, lr * tau = 1: one natural-gradient step from any start gives softmax(-e / tau)
    exactly."""
    e, z = rand(3, 5, V, scale=2.0, seed=1), rand(3, 5, V, scale=3.0, seed=2)
    for tau in (0.5, 1.0, 2.0):
        z1 = ebm.think(z, ebm.linear_energy(e), 1, natural_rule(1 / tau, tau))[-1]
        assert torch.allclose(F.softmax(z1, -1), F.softmax(-e / tau, -1), rtol=0, atol=1e-12)
    # smaller steps close the gap geometrically: the centred logits' distance to -e shrinks by (1 -
    # lr tau)
    zs = ebm.think(z, ebm.linear_energy(e), 3, natural_rule(0.25, 1.0))
    gap = [(zk + e - (zk + e).mean(-1, keepdim=True)).norm() for zk in zs]
    assert all(torch.isclose(b, 0.75 * a, rtol=1e-10) for a, b in zip(gap, gap[1:])), gap


def test_natural_step_is_dF_dz_divided_by_the_fisher_metric():
    """The natural step's direction d solves J d = dF/dz, J = diag(p) - p p^T (the softmax's Fisher
    metric)."""
    z, e = rand(4, V, scale=2.0, seed=3), rand(4, V, scale=2.0, seed=4)
    tau, lr = 0.3, 0.1
    d = (z - ebm.think(z, ebm.linear_energy(e), 1, natural_rule(lr, tau))[-1]) / lr
    p = F.softmax(z, -1)
    J = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    assert torch.allclose((J @ d.unsqueeze(-1)).squeeze(-1), ebm.free_energy_grad(z, e, tau),
                          rtol=1e-10, atol=1e-13)


def test_chain_temperature_defaults_to_the_softmax_temperature():
    """langevin_temperature = None: the chains' tau is model.softmax_temperature (not the think
    loop's tau)."""
    cfg = make_model(softmax_temperature=0.7, entropy_weight=0.1).config
    assert contrastive.chain_temperature(cfg) == 0.7
    cfg.langevin_temperature = 0.2
    assert contrastive.chain_temperature(cfg) == 0.2


# --------------------------------------------------------------------------------------------------
# 7. the positive phase


def test_positive_phase_has_gradient_and_scores_the_next_token():
    """The cd term sends gradient to the energy head and the transformer, and E_pos scores targets
    (x_{t+1})."""
    model = train_model(use_contrastive=True, contrastive_type="cd", contrastive_k=2,
                        langevin_noise_scale=0.0)
    idx, targets = seq_batch(seed=2)
    terms = contrastive.losses(model, idx, targets)
    cd = terms["cd"].mean()
    for name in ("energy_head.weight", "transformer.wte.weight",
                 "transformer.h.0.attn.c_attn.weight",
                 "transformer.h.1.mlp.c_fc.weight"):
        p = dict(model.named_parameters())[name]
        (g,) = torch.autograd.grad(cd, p, retain_graph=True)
        assert g.abs().max() > 1e-8, name

    # d cd / d e_t (reg = 0) is onehot(y_{t+1}) - q: the positive phase adds +1 at the target, so
    # every position's gradient sums to zero over V and is positive at the target token
    model.config.contrastive_reg = 0.0
    e_leaf = model.energies(model(idx)).detach().requires_grad_(True)
    (g_e,) = torch.autograd.grad(contrastive.contrastive_loss(model, None, e_leaf,
                                                              targets)[0].sum(), e_leaf)
    assert torch.allclose(g_e.sum(-1), torch.zeros_like(g_e[..., 0]), atol=1e-12)
    assert (g_e.gather(-1, targets.unsqueeze(-1)) > 0).all()

    # PCD with k = 0: the negative phase is the chains' noise start, the same under the same seed,
    # so the difference of two cd terms is exactly the difference of E_pos = e_t[targets_t]
    model = train_model(use_contrastive=True, contrastive_type="pcd", contrastive_k=0,
                        contrastive_reg=0.0)
    state0 = new_state(model.config)
    targets2 = (targets + 1 + torch.randint(V - 1, targets.shape,
                                            generator=torch.Generator().manual_seed(3))) % V
    cd1, e = run_losses(model, idx, targets, copy.deepcopy(state0))
    cd2, _ = run_losses(model, idx, targets2, copy.deepcopy(state0))
    diff = cd1["cd"] - cd2["cd"]
    expected = (e.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                - e.gather(-1, targets2.unsqueeze(-1)).squeeze(-1))
    assert torch.allclose(diff, expected, rtol=0, atol=1e-12)
    assert expected.abs().max() > 1e-3
    # and not the token the hidden state has already seen (idx)
    wrong = (e.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
             - e.gather(-1, targets2.unsqueeze(-1)).squeeze(-1))
    assert not torch.allclose(diff, wrong)


def test_cd_term_matches_its_definition():
    """cd = E_pos - <q, e> + reg (E_pos^2 + E_neg^2), q from k natural steps at the chains' tau from
    the data."""
    model = train_model(use_contrastive=True, contrastive_type="cd", contrastive_k=3,
                        langevin_step_size=0.4,
                        langevin_noise_scale=0.0, contrastive_reg=0.05, langevin_temperature=0.3)
    idx, targets = seq_batch(seed=4)
    h = model(idx)
    e = model.energies(h)
    got, gap, _ = contrastive.contrastive_loss(model, h, e, targets)
    p0 = 0.9 * F.one_hot(targets, V).to(D) + 0.1 / V
    z = ebm.think(p0.log(), ebm.linear_energy(e.detach()), 3, natural_rule(0.4, 0.3))[-1]
    q = F.softmax(z, -1)
    e_pos = e.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    e_neg = (q * e).sum(-1)
    assert torch.allclose(got, e_pos - e_neg + 0.05 * (e_pos**2 + e_neg**2), rtol=0, atol=1e-10)
    assert torch.allclose(gap, e_neg - e_pos, rtol=0, atol=1e-10)


@pytest.mark.parametrize("energy", ["mixture", "transformer"])
def test_contrastive_phases_use_the_energy_thinking_uses(energy):
    """mixture / transformer: E_pos and E_neg are that energy's E(x, p) (one-hot target, the chain's
    q), and its own parameters (g; the candidate slots and readout) get a contrastive gradient."""
    model = perturb(train_model(energy=energy, use_contrastive=True, contrastive_k=2,
                                langevin_noise_scale=0.0,
                                contrastive_reg=0.0, mixture_hidden=16), 0.1)
    idx, targets = seq_batch(seed=5)
    h, e, caches = ebm.observe(model, idx)
    cd, gap, z = contrastive.contrastive_loss(model, h, e, targets, caches)
    q, y = F.softmax(z, -1), F.one_hot(targets, V).to(D)
    if energy == "mixture":
        E = energies.mixture_energy(model, h, e)
        e_pos, e_neg = E(y)[0], E(q)[0]
    else:
        e_pos = model.candidate_energy(model.candidate_embedding(y), caches)
        e_neg = model.candidate_energy(model.candidate_embedding(q), caches)
    assert torch.allclose(cd, e_pos - e_neg, rtol=0, atol=1e-10)
    linear = e.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - (q * e).sum(-1)
    assert (cd - linear).abs().max() > 1e-4  # not the linear head's energies
    own = ["mix_fc.weight", "mix_proj.weight", "mix_beta"] if energy == "mixture" else \
          ["energy_readout.weight", "transformer.h.0.mlp.c_fc.weight",
           "transformer.h.1.attn.c_attn.weight"]
    named = dict(model.named_parameters())
    grads = torch.autograd.grad(cd.mean(), [named[n] for n in own])
    for name, g in zip(own, grads):
        assert g.abs().max() > 1e-8, name


# --------------------------------------------------------------------------------------------------
# 8. PCD chains live with their windows; fast PCD


def pcd_model(kind="pcd", **kw):
    base = dict(use_contrastive=True, contrastive_type=kind, contrastive_k=3,
                langevin_step_size=0.5,
                langevin_noise_scale=0.0, pcd_reinit_prob=0.0, contrastive_reg=0.0, n_persistent=4,
                replay_frac=0.5)
    return train_model(**{**base, **kw})


def test_pcd_chains_persist_with_their_windows(monkeypatch):
    """A PCD step stores each window with its chains; a later step replays windows whose chains
    resume exactly where they stopped, position by position (k = 0: the negative is the stored
    chain)."""
    model = pcd_model()
    state = new_state(model.config)
    runs = []
    real = contrastive.sample_chains
    monkeypatch.setattr(contrastive, "sample_chains", lambda *a,
                        **k: runs.append(real(*a, **k)) or runs[-1])
    idx1, tgt1 = seq_batch(B=4, seed=5)
    contrastive.losses(model, idx1, tgt1, state)
    assert state.replay_count == 4 and torch.equal(state.replay_x,
                                                   idx1) and torch.equal(state.replay_y, tgt1)
    assert torch.equal(state.replay_chain, runs[-1][-1])  # every window's chains, as they ended
    stored = state.replay_chain.clone()
    windows, nexts = state.replay_x.clone(), state.replay_y.clone()
    model.config.contrastive_k = 0
    torch.manual_seed(1)
    terms = contrastive.losses(model, *seq_batch(B=4, seed=6), state)  # 2 rows replayed (replay_frac 0.5)
    start = runs[-1][0]
    slots = [int(((start[i] - stored).abs().amax((-1, -2)) == 0).nonzero()[0]) for i in range(2)]
    assert len(set(slots)) == 2  # two distinct stored windows, each with all its positions' chains
    with torch.no_grad():
        e = model.energies(model(windows[slots]))
    e_neg = (F.softmax(stored[slots], -1) * e).sum(-1)
    e_pos = e.gather(-1, nexts[slots].unsqueeze(-1)).squeeze(-1)
    # of their own windows
    assert torch.allclose(terms["cd"][:2], e_pos - e_neg, rtol=0, atol=1e-12)
    # fresh rows start from noise
    assert not (start[2:].unsqueeze(1) == stored).all(-1).all(-1).any()


def test_pcd_restarts_from_noise():
    """pcd_reinit_prob = 1: replayed windows' chains restart from noise, so the stored chains are
    not read."""
    model = pcd_model(contrastive_k=0, pcd_reinit_prob=1.0)
    idx, targets = seq_batch(B=4, seed=6)
    stored = torch.zeros(2, 16, V, dtype=D)
    stored[..., 0] = 40.0  # every stored chain is token 0
    h, e, _ = ebm.observe(model, idx)
    cfg, energy = model.config, contrastive.chain_energy(model, h, e)
    z = contrastive.sample_chains(cfg, contrastive.chain_start(cfg, e, targets, "noise", stored),
                                  energy)[-1]
    assert (F.softmax(z[:2], -1)[..., 0] < 0.99).all()
    model.config.pcd_reinit_prob = 0.0
    z = contrastive.sample_chains(cfg, contrastive.chain_start(cfg, e, targets, "noise", stored),
                                  energy)[-1]
    assert (F.softmax(z[:2], -1)[..., 0] > 0.99).all()


def test_replay_slots_are_distinct_and_writes_keep_the_newest():
    """replay_draw draws distinct slots; a batch with more fresh windows than slots stores its last
    R windows."""
    model = pcd_model(n_persistent=3, replay_frac=1.0)
    state = new_state(model.config)
    idx, targets = seq_batch(B=5, seed=7)
    chain = rand(5, 16, V, seed=8)
    state.replay_store(idx, targets, None, chain=chain)
    assert state.replay_count == 5
    assert {tuple(r.tolist()) for r in state.replay_x} == {tuple(r.tolist()) for r in idx[2:]}
    for r in range(3):
        i = int((idx == state.replay_x[r]).all(-1).nonzero()[0])
        assert torch.equal(state.replay_chain[r], chain[i])
    for seed in range(5):
        torch.manual_seed(seed)
        _, _, slots = state.replay_draw(idx, targets, 1.0)
        assert slots.numel() == 3 and slots.unique().numel() == 3


@pytest.mark.parametrize("reg", [0.0, 0.02])
def test_fast_pcd_fast_weights_update_and_decay(reg):
    """fast_pcd: fast weights step by -fast_weight_lr * grad of mean(cd) w.r.t. W_E, then decay when
    lr = 0."""
    model = pcd_model("fast_pcd", fast_weight_lr=0.5, fast_weight_decay=0.9, contrastive_reg=reg)
    state = new_state(model.config)
    assert state.fast_weight.abs().max() == 0
    idx, targets = seq_batch(seed=7)
    torch.manual_seed(0)
    terms = contrastive.losses(model, idx, targets, state)
    fw1 = state.fast_weight.clone()
    assert fw1.abs().max() > 1e-4
    # the fast weights descend the same loss as W_E (q held fixed), with their own step size
    (g_we,) = torch.autograd.grad(terms["cd"].mean(), model.energy_head.weight)
    assert torch.allclose(fw1, -0.5 * g_we, rtol=1e-9, atol=1e-13), (
        "fast-weight step is not -fast_weight_lr * dL_cd/dW_E: d(reg * E_neg^2)/de = +2 reg E_neg "
        "q, "
        f"max abs diff {(fw1 + 0.5 * g_we).abs().max().item():.3g}")
    # zero step: the fast weights only decay
    model.config.fast_weight_lr = 0.0
    torch.manual_seed(1)
    contrastive.losses(model, idx, targets, state)
    assert torch.allclose(state.fast_weight, 0.9 * fw1, rtol=1e-12, atol=0)


def test_fast_weights_are_used_only_while_sampling():
    """Large fast weights change the cd term (through the chains) but not ce, ce_s1 or the
    energies."""
    model = pcd_model("fast_pcd", langevin_noise_scale=0.05, pcd_reinit_prob=0.2)
    state0 = new_state(model.config)
    state1 = copy.deepcopy(state0)
    state1.fast_weight.copy_(rand(V, 32, scale=10.0, seed=8))
    idx, targets = seq_batch(seed=8)
    terms0, e0 = run_losses(model, idx, targets, state0)
    terms1, e1 = run_losses(model, idx, targets, state1)
    # exact: the same forward and thinking on the same tokens with the same seed (the state enters
    # only via cd)
    assert torch.equal(e0, e1)
    assert torch.equal(terms0["ce"], terms1["ce"])
    assert torch.equal(terms0["ce_s1"], terms1["ce_s1"])
    assert (terms0["cd"] - terms1["cd"]).abs().max() > 1e-3
    # plain pcd ignores the fast weights
    model.config.contrastive_type = "pcd"
    state2 = copy.deepcopy(state0)
    state2.fast_weight.copy_(state1.fast_weight)
    terms_p0, _ = run_losses(model, idx, targets, copy.deepcopy(state0))
    terms_p2, _ = run_losses(model, idx, targets, state2)
    # exact: the same computation, the fast weights unread
    assert torch.equal(terms_p0["cd"], terms_p2["cd"])
    assert torch.equal(state2.fast_weight, state1.fast_weight)  # and does not update them


# --------------------------------------------------------------------------------------------------
# losses bookkeeping


def test_contrastive_term_only_in_training_mode():
    """losses() adds cd only with use_contrastive in training mode; eval mode has ce and ce_s1
    only."""
    model = pcd_model("cd")
    idx, targets = seq_batch(seed=9)
    assert set(contrastive.losses(model, idx, targets)) == {"ce", "ce_s1", "cd", "cd_gap"}
    model.eval()
    assert set(contrastive.losses(model, idx, targets)) == {"ce", "ce_s1"}


def test_losses_ce_terms_are_cross_entropies_of_z0_and_zK():
    """ce_s1 is CE of z_0 = -e/T and ce is CE of the thinking output z_K, per position."""
    model = make_model(think_steps=3, softmax_temperature=0.7, entropy_weight=0.2).eval()
    idx, targets = seq_batch(seed=10)
    terms = ebm.losses(model, idx, targets)
    e = model.energies(model(idx))
    zs = linear_logits(model, e, 3)

    def nll(z):
        return -F.log_softmax(z, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


    assert torch.allclose(terms["ce_s1"], nll(-e / 0.7), atol=1e-12)
    assert torch.allclose(terms["ce"], nll(zs[-1]), atol=1e-12)
    assert not torch.allclose(terms["ce"], terms["ce_s1"])
    # think_steps override
    terms0 = ebm.losses(model, idx, targets, think_steps=0)
    assert torch.allclose(terms0["ce"], terms0["ce_s1"], atol=1e-12)
