"""The bidirectional grid EBT (grid.py) and the Sudoku study (sudoku_study.py)."""

import json

import pytest
import torch
from torch.nn import functional as F

import ebm
import sudoku
import sudoku_study
from grid import GridConfig, GridNet, full_attention, loss, solve
from helpers import compose_cfg

SMALL = dict(size=6, n_layer=2, n_head=2, n_embd=16)


def make_net(seed=0, **kw):
    torch.manual_seed(seed)
    return GridNet(GridConfig(**{**SMALL, **kw})).double()


def batch(n=3, seed=0):
    """n solved 6x6 puzzles of 18-24 givens (givens (n, 36), solutions (n, 36))."""
    rows = sudoku.puzzles(seed, n, [18, 24])
    givens = torch.tensor([g for g, _ in rows])
    return givens, torch.tensor([s for _, s in rows])


def test_dE_dp_matches_finite_differences():
    """energy_fn's dE/dp is the gradient of E: central differences agree in float64."""
    net = make_net().eval()
    givens, _ = batch(2)
    energy = net.energy_fn(givens)
    p = F.softmax(torch.randn(2, 36, 6, dtype=torch.float64), -1)
    E, dE_dp = energy(p)
    d = torch.randn_like(p)
    eps = 1e-6
    numeric = (energy(p + eps * d)[0] - energy(p - eps * d)[0]) / (2 * eps)
    assert torch.allclose((dE_dp * d).sum((-1, -2)), numeric, rtol=1e-6, atol=1e-9)
    assert E.shape == (2,)


def test_attention_is_full_every_cell_sees_every_cell():
    """Changing the last cell's given changes the first cell's output (no causal mask), and the
    written-out attention equals SDPA's without a mask."""
    net = make_net()
    givens, _ = batch(1)
    x = net.embed(givens)
    h = net.trunk(x)
    changed = givens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 7
    assert not torch.allclose(net.trunk(net.embed(changed))[0, 0], h[0, 0])
    attn, y = net.h[0].attn, net.h[0].ln_1(x)
    q, k, v = attn.c_attn(y).view(1, 36, 3, 2, 8).permute(2, 0, 3, 1, 4)
    ref = attn.c_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 36, 16))
    assert torch.allclose(full_attention(attn, y), ref, atol=1e-10)


def test_training_reaches_every_parameter_through_the_think_steps():
    """The S1 loss (through K think steps, dE/dp with its graph) sends gradient to the candidate
    map, the step embeddings, the readout, the learned step size and every block."""
    net = make_net().train()
    givens, solutions = batch(4)
    loss(net, givens, solutions).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_think_uses_ebm_think_with_the_configured_rule(monkeypatch):
    """Thinking is ebm.think with ebm's step rule (one loop), K + 1 logits from noise."""
    calls = []
    real = ebm.think

    def spy(z, energy, steps, step, **kw):
        calls.append((steps, step.func))
        return real(z, energy, steps, step, **kw)

    monkeypatch.setattr(ebm, "think", spy)
    for rule, func in (("ebt", ebm.ebt_step), ("free_energy", ebm.free_energy_step)):
        net = make_net(think_rule=rule).eval()
        zs = net.think(batch(2)[0], 3, starts=2)
        assert len(zs) == 4 and zs[-1].shape == (2, 2, 36, 6) and calls[-1] == (3, func)


def test_self_verification_keeps_the_lowest_energy_and_the_oracle_a_verified_grid():
    """solve keeps per puzzle the start of lowest final energy; with a verifier, one it accepts."""
    net = make_net().eval()
    givens, solutions = batch(3)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    zs = net.think(givens, 2, starts=4, generator=gen())
    E = net.energy_fn(givens)(F.softmax(zs[-1], -1))[0]  # (4, 3)
    grids = torch.where(givens > 0, givens, zs[-1].argmax(-1) + 1)  # (4, 3, 36)
    best = grids[E.argmin(0), torch.arange(3)]
    assert torch.equal(solve(net, givens, steps=2, starts=4, generator=gen()), best)
    accept_third = lambda g, c: torch.arange(4).expand(3, 4) == 2  # noqa: E731
    picked = solve(net, givens, steps=2, starts=4, generator=gen(), verifier=accept_third)
    assert torch.equal(picked, grids[2])
    assert (solve(net, givens)[givens > 0] == givens[givens > 0]).all()  # givens kept


def test_scoring_in_chunks_scores_every_puzzle_as_one_batch_would(monkeypatch):
    """sudoku_study.score solves at most GRIDS candidate grids at once: in chunks it gives each
    puzzle the figures it gets in one batch (the one-pass arm: no noise to draw)."""
    net = make_net(energy=False).eval()
    givens, solutions = batch(7)
    whole = sudoku_study.score(net, givens, solutions)
    monkeypatch.setattr(sudoku_study, "GRIDS", 3)  # chunks of 3, 3 and 1 puzzles
    chunked = sudoku_study.score(net, givens, solutions)
    assert torch.equal(chunked["solved"], whole["solved"])
    assert torch.allclose(chunked["cells"], whole["cells"])
    assert whole["cells"].min() < 1  # an untrained net: the figures differ between puzzles


def test_onepass_learns_a_batch():
    """The one-pass arm's loss on a fixed batch falls with training."""
    net = make_net(energy=False).train()
    givens, solutions = batch(8)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    first = loss(net, givens, solutions).item()
    for _ in range(60):
        opt.zero_grad()
        loss(net, givens, solutions).backward()
        opt.step()
    assert loss(net, givens, solutions).item() < 0.5 * first


def test_study_runs_every_arm_and_resumes(tmp_path):
    """A tiny study trains each arm at each lr, the best again at the second seed, sweeps K and M
    for ebt's best runs, writes its report, and a second call trains nothing."""
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    sudoku.main_sudoku(compose_cfg("sudoku", [f"train_path={train}", f"test_path={test}",
                                              "n_train=60", "n_test=4"]))
    args = [f"out_dir={tmp_path / 'out'}", f"train_path={train}", f"test_path={test}", "n_layer=1",
            "n_head=2", "n_embd=16", "max_steps=3", "batch_size=4", "n_val=10", "lrs=[1e-3,2e-3]",
            "steps=[1,2]", "starts=[1,2]", "workers=1"]
    report = sudoku_study.study(compose_cfg("sudoku_study", args))
    assert len(report["runs"]) == 3 * 2 + 3  # every arm at both lrs, the best at seed 1338
    assert report["deep_layers"] >= 1 and report["flops_per_step"]["ebt"] > report["flops_per_step"]["onepass"]
    solving = report["flops_per_puzzle"]  # thinking costs more at test, longer and wider more still
    assert solving["onepass"] < solving["ebt K=2 M=1"] < solving["ebt K=2 M=2"]
    ebt = [r for r in report["runs"].values() if r["arm"] == "ebt"]
    assert all(set(r["test"]) == {"in_distribution", "givens_15_17", "givens_12_14", "givens_9_11"}
               for r in ebt)
    best = [r for r in ebt if r["lr"] == report["best_lr"]["ebt"]]
    assert len(best) == 2 and all({"by_steps", "by_starts", "longest", "oracle"} <= r.keys()
                                  for r in best)  # the test-time sweeps: the best runs only
    assert not any("by_steps" in r for r in ebt if r["lr"] != report["best_lr"]["ebt"])
    assert "solve rate" in (tmp_path / "out" / "study.md").read_text()
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*/ckpt.pt")}
    again = sudoku_study.study(compose_cfg("sudoku_study", args))
    assert again["runs"] == json.loads((tmp_path / "out" / "study.json").read_text())["runs"]
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp  # nothing trained again


def test_bad_arm_is_refused_in_one_line(tmp_path):
    """An unknown arm is refused before any work."""
    from util import UserError

    with pytest.raises(UserError, match="arms must be among"):
        sudoku_study.study(compose_cfg("sudoku_study", ["arms=[onepass,magic]"]))


def test_optimizer_holds_every_parameter_once_and_the_step_size_at_its_own_rate():
    """Every parameter sits in one group; the EBT's learned step size alone in a group whose
    learning rate is think_lr_lr_mult times the others' (the one-pass net has none)."""
    from engine import TrainConfig

    for energy in (True, False):
        net = make_net(energy=energy)
        opt = sudoku_study.optimizer(net, 1e-3)
        held = [p for g in opt.param_groups for p in g["params"]]
        assert len(held) == len(list(net.parameters())) == len({id(p) for p in held})
        mults = [(g.get("lr_mult", 1.0), len(g["params"])) for g in opt.param_groups]
        assert mults[-1] == ((TrainConfig().think_lr_lr_mult, 1) if energy else (10.0, 0))
