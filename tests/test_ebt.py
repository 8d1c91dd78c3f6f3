"""The EBT think rule (z <- p - alpha dE/dp) and its two recipes (preset=ebt, preset=ebt_s2), the
smooth clip, self-verification by energy, and the exact verifier's one-hot energies."""

import math
from functools import partial

import pytest
import torch
from torch.nn import functional as F

import contrastive
import ebm
import energies
import eval as eval_mod
import engine
from conftest import assert_no_leak, free_energy_rule, make_model, perturb
from helpers import TINY, TINY_MODEL, compose_cfg, read_metrics, run_sample, run_train, write_corpus
from util import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

V = 11
D = torch.float64
# the two official recipes as model config (the presets' model keys), for unit tests on tiny models
S1 = dict(energy="transformer", energy_layers=0, cand_embed="linear", think_rule="ebt",
          think_start="noise",
          think_steps=2, think_step_embed=True, think_lr=5.0, think_lr_learnable=True,
          ce_all_steps=True,
          think_detach=True, aux_ce_weight=0.0, verify_by="energy")
S2 = dict(energy="transformer", energy_layers=0, cand_embed="linear", think_rule="ebt",
          think_start="noise",
          think_steps=3, think_steps_random=True, think_steps_min=2, think_lr=5.0,
          think_lr_spread=2.0,
          think_noise=3.0, think_truncate=True, replay_size=8, replay_frac=0.5, aux_ce_weight=0.0,
          verify_by="energy")


def batch(B=2, T=16, seed=0):
    seq = torch.randint(V, (B, T + 1), generator=torch.Generator().manual_seed(seed))
    return seq[:, :-1], seq[:, 1:]


# --------------------------------------------------------------------------------------------------
# the step


@pytest.mark.parametrize("energy", ["linear", "mixture", "transformer"])
def test_ebt_step_is_p_minus_alpha_autograd_dE_dp(energy):
    """Two EBT steps equal z_{k+1} = p_k - alpha * dE/dp(p_k, step k) with dE/dp from autograd
    (float64)."""
    extra = dict(cand_embed="linear", think_step_embed=True,
                 think_steps=2) if energy == "transformer" else {}
    model = perturb(make_model(energy=energy, think_rule="ebt", mixture_stopgrad=False,
                               **extra)).eval()
    idx, _ = batch()
    caches = model.new_caches(idx.size(0)) if energy == "transformer" else None
    h = model(idx, caches)
    e = model.energies(h)
    z = torch.randn(*e.shape, dtype=D, generator=torch.Generator().manual_seed(1))
    alpha = 0.7
    zs = ebm.think(z, ebm.make_energy(model, h, e, caches), 2, partial(ebm.ebt_step, lr=alpha))

    def E(p, k):  # the energy written out, differentiated by autograd
        if energy == "linear":
            return (p * e).sum(-1)
        if energy == "mixture":
            g = model.mix_proj(F.gelu(model.mix_fc(torch.cat([h, p @ model.transformer.wte.weight],
                                                             -1))))
            return (p * e).sum(-1) + model.mix_beta * g[..., 0]
        return model.candidate_energy(model.cand_proj(p), caches, k)

    zk = z
    for k in range(2):
        p = F.softmax(zk, -1).detach().requires_grad_()
        (g,) = torch.autograd.grad(E(p, k).sum(), p)
        zk = p.detach() - alpha * g
        assert torch.allclose(zs[k + 1], zk, rtol=1e-10, atol=1e-12), k


def test_step_embedding_gives_each_step_its_landscape():
    """With think_step_embed the energy differs between step indices; steps past the last reuse the
    last."""
    model = perturb(make_model(energy="transformer", think_step_embed=True, think_steps=2)).eval()
    idx, _ = batch()
    caches = model.new_caches(idx.size(0))
    model(idx, caches)
    cand = torch.randn(2, 16, 32, dtype=D)
    E0, E1, E5, Enone = (model.candidate_energy(cand, caches, k) for k in (0, 1, 5, None))
    assert (E0 - E1).abs().max() > 1e-6
    assert torch.allclose(E5, E1, rtol=0, atol=1e-12) and torch.allclose(Enone, E1, rtol=0,
                                                                         atol=1e-12)


def test_think_lr_spread_draws_per_position_in_range():
    """think_lr_spread=s: while training, eta per position uniform in [eta / s, eta * s]; off in
    eval."""
    model = make_model(think_lr=2.0, think_lr_spread=2.0)
    z = torch.zeros(4, 50, V, dtype=D)
    lr = ebm.step_size(model.train(), z)
    assert lr.shape == (4, 50, 1) and lr.min() >= 1.0 and lr.max() <= 4.0 and lr.std() > 0.3
    assert ebm.step_size(model.eval(), z) == 2.0


def test_think_start_options():
    """think_start: s1 = the System 1 logits, zeros, noise = N(0, 1)."""
    z0 = torch.randn(3, 5, V, dtype=D)
    cfg = make_model().config
    for start, check in (("s1", lambda s: torch.equal(s, z0)), ("zeros", lambda s: (s == 0).all()),
                         ("noise",
                          lambda s: abs(s.std().item() - 1) < 0.2 and not torch.equal(s, z0))):
        cfg.think_start = start
        assert check(ebm.think_start(cfg, z0)), start


# --------------------------------------------------------------------------------------------------
# the recipes: no leak, gradients through dE/dp


@pytest.mark.parametrize("recipe", ["S1", "S2"])
def test_no_leak_from_future_tokens_in_ebt_recipes(recipe):
    """Per-position loss terms at positions <= t do not change when tokens after x_{t+1} change
    (train and eval)."""
    model = perturb(make_model(**(S1 if recipe == "S1" else S2), think_samples=3), 0.1)
    # block_size windows: the
    seq = torch.randint(V, (2, 17), generator=torch.Generator().manual_seed(7))
    assert_no_leak(model, seq, (0, 6, 13))  # replay buffer stores whole ones


def s2_loss(model, idx, targets):
    torch.manual_seed(5)  # the same noise start, noise, step sizes and step count every call
    return ebm.total_loss(model.config, contrastive.losses(model, idx, targets,
                                                   contrastive.ReplayState(model.config).to(D)))


@pytest.mark.parametrize("truncate", [True, False])
def test_s2_recipe_double_backward_reaches_parameters(truncate):
    """S2 (graph kept between steps): the loss reaches the energy's parameters only through dE/dp
    (double backward). Without truncation the gradient matches a central finite difference along a
    random direction (float64); truncated, it is the last step's share of it, so it only has to
    exist."""
    model = perturb(make_model(**{**S2, "think_truncate": truncate})).train()
    idx, targets = batch()
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(s2_loss(model, idx, targets), params, allow_unused=True)
    named = {n: g for (n, _), g in zip(model.named_parameters(), grads)}
    for n in ("energy_readout.weight", "cand_proj.weight", "transformer.h.0.mlp.c_fc.weight",
              "transformer.h.0.attn.c_attn.weight"):
        assert named[n] is not None and named[n].abs().max() > 0, n
    if truncate:
        return
    gen = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, dtype=D, generator=gen) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction) if g is not None)
    # the truncation error of a central difference grows with the curvature: 1e-5 is 1e-3 off here
    eps = 1e-7

    def shifted(sign):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
        out = s2_loss(model, idx, targets).detach()
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
        return out

    numeric = (shifted(1) - shifted(-1)) / (2 * eps)
    assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-8), (analytic, numeric)


def test_s1_detach_trains_each_step_alone():
    """S1 (think_detach): the candidate carries no graph into the next step, so the loss of step 2
    does not depend on step 1's energy: with ce over the last step only, the step embedding of step
    0 gets no gradient."""
    model = perturb(make_model(**{**S1, "ce_all_steps": False})).train()
    idx, targets = batch()
    torch.manual_seed(0)
    loss = ebm.total_loss(model.config, ebm.losses(model, idx, targets))
    (g,) = torch.autograd.grad(loss, [model.step_embed.weight])
    assert g[0].abs().max() == 0 and g[1].abs().max() > 0


def training_curve(model, steps):
    """The losses of `steps` AdamW steps (the same batches and seeds every call) and the first
    step's gradients."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = contrastive.ReplayState(model.config).to(model.energy_head.weight.dtype)
    curve, first = [], None
    for i in range(steps):
        idx, targets = batch(B=4, seed=i)
        torch.manual_seed(i)  # noise starts, step sizes, step counts
        loss = ebm.total_loss(model.config, contrastive.losses(model, idx, targets, state))
        optimizer.zero_grad()
        loss.backward()
        first = first or {n: p.grad.clone() for n,
                          p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        curve.append(loss.item())
    return curve, first


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["S1", "S2"])
def test_compiled_dE_dp_trains_as_eager(recipe):
    """train.compile's E and dE/dp (energies.compile_dE_dp: the double backward runs through a
    compiled graph) give the eager parameter gradients and the first loss within 1e-5 relative in
    float32, and a 10-step loss curve within 1e-9 in float64 (in float32 S2's noisy steps amplify
    rounding: 1e-5 at step 2 is 1e-2 by step 6, compiled or not)."""
    for dtype, steps, rel in ((torch.float32, 1, 1e-5), (torch.float64, 10, 1e-9)):
        models = [perturb(make_model(dtype=dtype,
                                     **(S1 if recipe == "S1" else S2))).train() for _ in "ab"]
        energies.compile_dE_dp(models[1])
        (eager, g_eager), (comp, g_comp) = (training_curve(m, steps) for m in models)
        assert g_eager.keys() == g_comp.keys() and "energy_readout.weight" in g_eager
        for n, g in g_eager.items():
            assert (g_comp[n] - g).norm() <= 1e-5 * g.norm(), (dtype, n)
        assert comp == pytest.approx(eager, rel=rel), dtype


@pytest.mark.slow
def test_compiled_ebt_generation_equals_eager_and_compiles_once():
    """generate(compile=True) with S1's model (noise starts, step embeddings, dE/dp by autograd
    eagerly) gives eager's greedy tokens from the same seed, and generating more tokens compiles
    nothing new: no graph per token or per cache length (1 layer, 32 wide, block 16)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # other tests' graphs neither count nor fill the recompile limit
    model = perturb(make_model(dtype=torch.float32, n_layer=1, **S1)).eval()
    idx = torch.randint(0, V, (1, 3), generator=torch.Generator().manual_seed(0))
    think = partial(ebm.system2_logits, steps=2)

    def generate(n, compile):
        torch.manual_seed(0)
        return ebm.generate(model, idx, n, think, compile=compile)

    assert torch.equal(generate(3, True), generate(3, False))
    graphs = counters["stats"]["unique_graphs"]
    # up to 15 of the 16 positions: every cache length from 4 on
    assert torch.equal(generate(12, True), generate(12, False))
    assert counters["stats"]["unique_graphs"] == graphs > 0


@pytest.mark.slow
def test_sample_compiles_every_graph_before_its_timed_run():
    """sample.py's untimed run (compile_ahead) compiles every graph its timed run needs, past a cache
    rebuild: generating then compiles nothing new (S1's model, block 16, 40 tokens)."""
    from torch._dynamo.utils import counters

    import sample as sample_mod

    torch._dynamo.reset()
    product = energies.Product([perturb(make_model(dtype=torch.float32, n_layer=1, **S1)).eval()])
    idx = torch.randint(0, V, (1, 3), generator=torch.Generator().manual_seed(0))
    think = partial(ebm.system2_logits, steps=2)
    sample_mod.compile_ahead(product, idx, 40, think)
    graphs = counters["stats"]["unique_graphs"]
    ebm.generate(product, idx, 40, think, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs > 0


def recipe_loss(model, T=16):
    """The training loss of one batch (B=2) of a recipe, its noise seeded."""
    idx, targets = batch(T=T)
    torch.manual_seed(5)
    state = contrastive.ReplayState(model.config).to(model.energy_head.weight.dtype)
    return ebm.total_loss(model.config, contrastive.losses(model, idx, targets, state))


@pytest.mark.parametrize("recipe", ["S1", "S2"])
def test_recomputed_slots_give_the_written_out_gradients(recipe):
    """The candidate slots recomputed in the backward and double backward (model.Recompute) give
    the parameter gradients of the written-out slots: within 1e-10 relative in float64, and S1's
    within 1e-5 in float32 (S2's noisy steps amplify float32 rounding several times over)."""
    dtypes = ((torch.float32, 1e-5),) if recipe == "S1" else ()
    for dtype, rel in dtypes + ((torch.float64, 1e-10),):
        model = perturb(make_model(dtype=dtype, **(S1 if recipe == "S1" else S2))).train()
        params = list(model.parameters())
        recomputed = torch.autograd.grad(recipe_loss(model), params, allow_unused=True)
        model.config.recompute = False  # autograd keeps every intermediate of the slots
        kept = torch.autograd.grad(recipe_loss(model), params, allow_unused=True)
        for (n, _), a, b in zip(model.named_parameters(), recomputed, kept):
            assert (a is None) == (b is None), n
            if b is not None:
                assert (a - b).norm() <= rel * b.norm(), (dtype, n)


def test_recomputed_slots_keep_less_for_the_double_backward():
    """What an S1 loss keeps for its backward (the graph, beyond the weights) at block 64: under
    0.6 of what the written-out slots keep (the attention's (T, T) scores and weights, the
    RMSNorms' and SwiGLU's intermediates, forward and backward)."""
    import bench

    model = perturb(make_model(dtype=torch.float32, block_size=64, **S1)).train()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())

    def kept():
        with bench.MemoryCount() as count:
            loss = recipe_loss(model, T=64)
        return count.now - weights - loss.numel() * loss.element_size()

    recomputed = kept()
    model.config.recompute = False
    assert 0 < recomputed < 0.6 * kept()


# --------------------------------------------------------------------------------------------------
# the smooth clip and self-verification by energy


def test_smooth_clip_values_and_gradient_against_autograd():
    """smooth_clip = m * tanh(x / m); its gradient 1 - tanh^2(x / m) is > 0 where a clamp's is 0."""
    x = torch.linspace(-3, 3, 61, dtype=D, requires_grad=True)
    m = 0.25
    y = ebm.smooth_clip(x, m)
    assert torch.allclose(y, m * torch.tanh(x / m), rtol=1e-12, atol=0)
    assert y.abs().max() < m
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(g, 1 - torch.tanh(x / m) ** 2, rtol=1e-10, atol=1e-14)
    (g_hard,) = torch.autograd.grad(x.clamp(-m, m).sum(), x)
    assert (g[g_hard == 0] > 0).all() and (g_hard == 0).any()


def test_smooth_clip_step_against_autograd_of_F():
    """A free-energy step with think_clip=smooth is z - m * tanh(lr * dF/dz / m), dF/dz by autograd
    (float64)."""
    e = torch.randn(3, 7, V, dtype=D)
    z = torch.randn(3, 7, V, dtype=D, requires_grad=True)
    lr, tau, m = 0.9, 0.2, 0.25
    (dF,) = torch.autograd.grad(ebm.free_energy(z, ebm.linear_energy(e), tau)[1].sum(), z)
    z1 = ebm.think(z.detach(), ebm.linear_energy(e), 1, free_energy_rule(lr, tau, m, "smooth"))[1]
    assert torch.allclose(z1, z.detach() - m * torch.tanh(lr * dF / m), rtol=1e-10, atol=1e-12)


def test_verify_by_energy_keeps_the_lowest_energy(monkeypatch):
    """verify_by=energy keeps, per position, the candidate with the lowest final E (not F)."""
    model = perturb(make_model(energy="mixture", mixture_stopgrad=False, entropy_weight=1.0),
                    0.5).eval()
    idx, _ = batch(2, 16)
    h = model(idx)
    e = model.energies(h)
    calls, real_think = [], ebm.think
    monkeypatch.setattr(ebm, "think", lambda *a,
                        **k: calls.append(real_think(*a, **k)) or calls[-1])
    M = 6
    torch.manual_seed(0)
    zs, chosen = ebm.self_verify(model, e, ebm.make_energy(model, h, e), 2, M, "energy")
    # (M, B, T)
    E, free = ebm.free_energy(calls[0][-1], ebm.make_energy(model, h, e),
                              model.config.entropy_weight)
    assert torch.equal(chosen, E.argmin(0))
    # the two rankings differ here: the test can tell
    assert not torch.equal(E.argmin(0), free.argmin(0))
    best = calls[0][-1].gather(0, chosen[None, ..., None].expand(1, *zs[-1].shape)).squeeze(0)
    assert torch.equal(zs[-1], best)


# --------------------------------------------------------------------------------------------------
# the exact verifier's energies


@pytest.mark.parametrize("energy, cand_embed", [("linear", "wte"), ("mixture", "wte"),
                                                ("transformer", "wte"),
                                               ("transformer", "linear")])
def test_onehot_energies_match_a_loop_over_tokens(energy, cand_embed):
    """onehot_energies (..., V) equals E(x, onehot(v)) computed one token v at a time by the energy
    itself."""
    model = perturb(make_model(energy=energy, cand_embed=cand_embed,
                               think_step_embed=energy == "transformer"))
    model.eval()
    idx, _ = batch(3, 16)
    caches = model.new_caches(3) if energy == "transformer" else None
    h = model(idx, caches)
    e = model.energies(h)
    fast = energies.onehot_energies(model, h, e, caches, chunk=4)
    energy_fn = ebm.make_energy(model, h, e, caches)
    loop = torch.stack([energy_fn(F.one_hot(torch.full(e.shape[:-1], v),
                                            V).to(D))[0] for v in range(V)], -1)
    assert fast.shape == e.shape
    assert torch.allclose(fast, loop, rtol=1e-9, atol=1e-11)
    if energy == "linear":
        assert torch.equal(fast, e)


# --------------------------------------------------------------------------------------------------
# config checks


@pytest.mark.parametrize("override, words", [
    ("model.think_rule=adam", "model.think_rule=adam must be one of"),
    ("model.think_start=ones", "model.think_start=ones must be one of"),
    ("model.think_clip=soft", "model.think_clip=soft must be one of"),
    ("model.verify_by=max", "model.verify_by=max must be one of"),
    ("model.cand_embed=mlp", "model.cand_embed=mlp must be one of"),
    ("model.think_lr_spread=0.5", "model.think_lr_spread=0.5 must be >= 1"),
    ("model.think_steps_min=5", "model.think_steps_min=5 must be in 1..model.think_steps"),
])
def test_bad_ebt_values_are_refused(override, words):
    """Impossible values of the new keys fail with one line naming the key."""
    with pytest.raises(UserError, match=words.replace(".", r"\.")):
        engine.check_config(compose_cfg("train", [override]))


@pytest.mark.parametrize("overrides", [
    ["model.think_rule=ebt", "model.think_clip=smooth"],
    ["model.think_rule=ebt", "model.think_max_move=1.0"],
    ["model.cand_embed=linear"],
    ["model.think_step_embed=true"],
    ["model.think_steps_min=2"],
    ["model.think_truncate=true", "model.think_detach=true"],
    ["model.think_steps=0", "model.think_rule=ebt"],
])
def test_inert_ebt_options_are_refused(overrides):
    """New options set where they would do nothing are refused (engine.inert_options)."""
    with pytest.raises(UserError, match="does nothing"):
        engine.check_config(compose_cfg("train", overrides))


# --------------------------------------------------------------------------------------------------
# end to end: the presets train, sample and evaluate; random text stays random


@pytest.fixture(scope="module")
def random_text(tmp_path_factory):
    """50k characters drawn uniformly and independently from 20 letters."""
    return write_corpus(tmp_path_factory.mktemp("random") / "random.txt", n_chars=50_000,
                        alphabet="abcdefghijklmnopqrst", seed=1)


@pytest.mark.parametrize("preset", ["ebt", "ebt_s2"])
def test_no_leak_on_random_text_in_ebt_presets(preset, random_text, tmp_path, capsys):
    """200 steps of either recipe on random text over 20 letters keep every val loss >= ln 20 -
    0.05."""
    run_train([f"preset={preset}"] + TINY_MODEL + [
        "data.batch_size=4", f"data.data_path={random_text}", "data.block_size=16",
                                                   "train.max_steps=200",
        "train.eval_interval=50", "train.eval_iters=8", "train.learning_rate=1e-2",
                                                   "train.warmup_steps=10",
        "train.log_interval=50", f"out_dir={tmp_path}"])
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [50, 100, 150, 200]
    for r in rows:
        assert r["val_loss"] >= math.log(20) - 0.05 and r["val_loss_s1"] >= math.log(20) - 0.05, r


@pytest.mark.parametrize("preset", ["ebt", "ebt_s2"])
def test_ebt_presets_train_sample_and_evaluate(preset, tmp_path, capsys):
    """preset=ebt / ebt_s2 compose to the official recipe, train a tiny model, and sample.py and
    eval.py think with it (eval.json has the exact verifier and both self-verification rankings)."""
    corpus = write_corpus(tmp_path / "corpus.txt", n_chars=20_000)
    cfg = run_train([f"preset={preset}"] + TINY + ["train.max_steps=4", f"data.data_path={corpus}",
                                                    f"out_dir={tmp_path / 'out'}"])
    m = cfg.model
    assert (m.energy, m.think_rule, m.think_start, m.cand_embed, m.verify_by) == \
           ("transformer", "ebt", "noise", "linear", "energy")
    if preset == "ebt":
        assert m.think_lr_learnable and m.think_detach and m.ce_all_steps and m.think_step_embed
    else:
        assert (m.think_truncate and m.replay_size > 0 and m.think_lr_spread == 2.0
                and m.think_noise > 0)
    ckpt = tmp_path / "out" / "final.pt"
    texts = run_sample([f"checkpoint={ckpt}", "max_new_tokens=6", "prompt=ab", "think_samples=2"],
                       capsys)
    assert len(texts) == 1 and len(texts[0].strip()) >= 8
    eval_cfg = compose_cfg("eval", [f"checkpoint={ckpt}", "max_tokens=1024", "sweep=[0,1,2]",
                                    "samples=[1,2]",
                                    "epsilons=[0.1]", "device=cpu"])
    r = eval_mod.evaluate_checkpoint(eval_cfg)
    # noise starts are seeded: the same figures every run
    again = eval_mod.evaluate_checkpoint(eval_cfg)
    assert [row["loss"] for row in again["think_sweep"]] == [row["loss"]
                                                             for row in r["think_sweep"]]
    assert again["self_verification"][1]["loss"] == r["self_verification"][1]["loss"]
    x = r["exact_verifier"]
    assert 0 <= x["argmax_is_argmin"] <= 1 and 0 <= x["accuracy"] <= 1 and x["temperature"] > 0
    assert (r["self_verification"][1]["verify_by"] == "energy"
            and "by_free_energy" in r["self_verification"][1])
    assert "energy_gap" in r["uncertainty"]


def test_resume_with_another_step_embedding_is_refused(tmp_path, capsys):
    """The step embedding has one row per think step: resuming with other think_steps (or without
    it) is refused."""
    corpus = write_corpus(tmp_path / "corpus.txt", n_chars=5_000)
    base = ["preset=ebt"] + TINY + [f"data.data_path={corpus}", f"out_dir={tmp_path / 'out'}"]
    run_train(base)
    for change, key in (("model.think_steps=3", "model.think_steps"),
                        ("model.cand_embed=wte", "model.cand_embed")):
        with pytest.raises(UserError, match=f"another {key}"):
            run_train(base + ["train.resume=true", "train.max_steps=6", change])
