"""viz.py's trend: tokens per run from its checkpoint, the gap between two arms per budget and seed."""

import json
import math

import pytest
import torch

from helpers import REPO, compose_cfg  # noqa: F401  (puts the repo on sys.path)
import viz  # noqa: E402


def fake_run(tmp_path, name, think_steps, steps, seed, loss, se, processes=None):
    """A checkpoint holding only what trend reads, and its eval.json with a think sweep."""
    d = tmp_path / name
    d.mkdir()
    corpus = tmp_path / "corpus.txt"  # its first 90% is 204,800 characters: 100 steps read it once
    if not corpus.exists():
        corpus.write_text("a" * 227_556)
    ckpt = {"config": {"model": {"think_steps": think_steps, "energy": "transformer" if think_steps
                                 else "linear", "think_rule": "ebt"},
                       "data": {"batch_size": 16, "block_size": 64, "data_path": str(corpus)},
                       "train": {"grad_accum_steps": 2, "seed": seed}}, "step": steps,
            "model": {}, "vocab": ["a"]}
    if processes:
        ckpt["processes"] = processes
    torch.save(ckpt, d / "final.pt")
    sweep = [{"think_steps": k, "loss": loss + 1.0 * (k != think_steps), "se": se}
             for k in (0, 1, 2)]
    (d / "eval.json").write_text(json.dumps({"checkpoint": str(d / "final.pt"),
                                             "model_think_steps": think_steps,
                                             "think_sweep": sweep}))
    return str(d / "eval.json")


def test_trend_counts_tokens_and_gaps_per_seed(tmp_path):
    """Tokens = steps x batch x block x accum x processes; the gap is the second arm minus the first,
    per shared seed, at budgets both arms hold; its se combines the two arms' se."""
    files = [fake_run(tmp_path, "p1", 0, 100, 1, 2.0, 0.03),
             fake_run(tmp_path, "p2", 0, 100, 2, 2.1, 0.04),
             fake_run(tmp_path, "p3", 0, 400, 1, 1.5, 0.03, processes=2),
             fake_run(tmp_path, "e1", 2, 100, 1, 2.5, 0.03),
             fake_run(tmp_path, "e2", 2, 100, 2, 2.3, 0.04),
             fake_run(tmp_path, "e3", 2, 400, 1, 1.6, 0.04, processes=2),
             fake_run(tmp_path, "e4", 2, 1200, 1, 1.4, 0.04)]  # no plain run at this budget
    points = viz.trend_points(files)
    assert [p["tokens"] for p in points] == [204800, 204800, 1638400, 204800, 204800, 1638400,
                                             2457600]
    assert points[3]["loss"] == 2.5  # the trained K's row, not K = 0
    assert [p["epochs"] for p in points[:3]] == pytest.approx([1.0, 1.0, 8.0])
    base, other, rows = viz.trend_rows(points)
    assert (base, other) == ("plain transformer", "EBT, K=2")
    assert [r["tokens"] for r in rows] == [204800, 1638400]
    small, large = rows
    assert small["seeds"] == [1, 2]
    assert small["gaps"] == pytest.approx([0.5, 0.2]) and small["gap"] == pytest.approx(0.35)
    assert small["gap_se"] == pytest.approx(math.sqrt(2 * 0.03**2 + 2 * 0.04**2) / 2)
    assert large["seeds"] == [1] and large["gaps"] == pytest.approx([0.1])
    assert large["gap_se"] == pytest.approx(math.sqrt(0.03**2 + 0.04**2))


def test_trend_refuses_other_than_two_arms(tmp_path):
    """trend needs exactly two arms: one arm gives one clear error."""
    files = [fake_run(tmp_path, "p1", 0, 100, 1, 2.0, 0.03)]
    with pytest.raises(viz.UserError, match="exactly two arms"):
        viz.trend_points(files)


def test_trend_writes_the_plot(tmp_path, capsys):
    """viz.py trend=[...] writes trend.png and prints the table."""
    pytest.importorskip("matplotlib")
    files = [fake_run(tmp_path, f"p{s}_{n}", 0, n, s, 2.0 - n / 1000, 0.03) for s in (1, 2)
             for n in (100, 200)]
    files += [fake_run(tmp_path, f"e{s}_{n}", 2, n, s, 2.3 - n / 1000, 0.03) for s in (1, 2)
              for n in (100, 200)]
    cfg = compose_cfg("viz", [f"trend=[{','.join(files)}]", "checkpoint=null",
                              f"out_dir={tmp_path / 'plots'}"])
    viz.visualise(cfg)
    assert (tmp_path / "plots" / "trend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 204,800 | 1.00 | 100 | 2 | 1.9000, 1.9000 | 2.2000, 2.2000 | +0.3000, +0.3000 |" in \
        capsys.readouterr().out


def test_gap_slope_against_log_tokens():
    """The gap's slope per decade of tokens: exact (se 0) for gaps on a line in log10 tokens; a
    noisy line gives a positive standard error around the true slope."""
    rows = [{"tokens": 10 ** k, "gaps": [0.3 - 0.05 * k, 0.3 - 0.05 * k]} for k in (4, 5, 6, 7)]
    slope, se = viz.gap_slope(rows)
    assert slope == pytest.approx(-0.05) and se == pytest.approx(0.0, abs=1e-12)
    noisy = [{"tokens": 10 ** k, "gaps": [0.3 - 0.05 * k + 0.01, 0.3 - 0.05 * k - 0.01]}
             for k in (4, 5, 6, 7)]
    slope, se = viz.gap_slope(noisy)
    assert slope == pytest.approx(-0.05) and se > 0


def test_trend_reads_the_baseline_off_its_curve_at_equal_flops_and_gives_the_excess():
    """At flops_ratio r the baseline's loss at r x the other arm's tokens is interpolated in log
    tokens between its budgets (never extrapolated), and each arm's excess is its mean minus the
    optimum."""
    points = [{"arm": "plain", "tokens": t, "loss": l, "seed": 1, "epochs": 0.1, "steps": 1, "se": 0.01}
              for t, l in ((1000, 2.0), (10000, 1.5), (100000, 1.2))]
    points += [{"arm": "EBT", "tokens": 1000, "loss": 2.2, "seed": 1, "epochs": 0.1, "steps": 1, "se": 0.01}]
    assert viz.read_off(points, "plain", 10 ** 3.5) == pytest.approx(1.75)
    assert viz.read_off(points, "plain", 10000) == pytest.approx(1.5)
    assert viz.read_off(points, "plain", 200000) is None
    assert viz.tokens_for(points, "plain", 1.75) == pytest.approx(10 ** 3.5)  # the inverse of read_off
    assert viz.tokens_for(points, "plain", 1.2) == pytest.approx(100000)
    assert viz.tokens_for(points, "plain", 2.2) is None and viz.tokens_for(points, "plain", 1.1) is None
    base, other, rows = viz.trend_rows(points)
    table = viz.trend_markdown(base, other, rows, points, flops_ratio=10 ** 0.5, optimum=1.0)
    assert "| (beyond its budgets) | 1.7500 | +0.4500 | +1.0000 | +1.2000 |" in table


def test_trend_fits_the_slope_again_from_a_budget_on():
    """fit_from refits the gap slope over the budgets from that many tokens on: a first budget far
    off the line moves the fit over every budget, not the one from the second budget on."""
    points = []
    for k, gap in ((3, 0.9), (4, 0.1), (5, 0.05), (6, 0.0)):
        for seed in (1, 2):
            common = {"tokens": 10 ** k, "seed": seed, "epochs": 0.1, "steps": 1, "se": 0.01}
            points += [{**common, "arm": "plain", "loss": 1.5},
                       {**common, "arm": "EBT", "loss": 1.5 + gap}]
    base, other, rows = viz.trend_rows(points)
    lines = viz.trend_markdown(base, other, rows, points, fit_from=10 ** 4).splitlines()
    assert lines[-2].startswith("gap slope over every budget: -0.2")
    assert lines[-1].startswith("gap slope over the budgets of 10,000 tokens and more: -0.0500 ± 0.0000")
