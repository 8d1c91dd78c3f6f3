"""trend.py at a tiny size: it trains and scores every missing run (train.py and eval.py subprocesses),
writes the trend's table and data, and on a second call trains nothing. The documented commands
(docs/results.md: every budget, two seeds, the plot) run in the slow tests."""

import json

import pytest

import trend
from helpers import compose_cfg

TINY_TREND = ["corpus=tiny", "budgets=[2]", "flops_budgets=[4]", "seeds=[1]", "block_size=16", "batch_size=4",
              "flops_ratio=2", "optimum=1.0", "fit_from=1",
              "train_args=['model.n_layer=1','model.n_head=2','model.n_embd=16','train.compile=false','train.eval_iters=1']"]


@pytest.fixture(scope="module")
def tiny_trend(tmp_path_factory):
    out = tmp_path_factory.mktemp("trend")
    cfg = compose_cfg("trend", [f"out_dir={out}", *TINY_TREND])
    return out / "tiny", cfg, trend.trend(cfg)


def test_every_budget_and_arm_is_trained_and_scored(tiny_trend):
    """Both arms at budget 2, the plain arm also at 4; each its own run of that many steps."""
    out, cfg, points = tiny_trend
    got = sorted((p["arm"], p["steps"], p["seed"], p["tokens"]) for p in points)
    assert got == [("EBT, K=2", 2, 1, 128), ("plain transformer", 2, 1, 128), ("plain transformer", 4, 1, 256)]
    for arm, n in (("plain", 2), ("ebt", 2), ("plain", 4)):
        final = json.loads((out / f"{arm}_n{n}_s1" / "metrics.jsonl").read_text().splitlines()[-1])
        assert final["step"] == n


def test_the_table_reads_the_plain_arm_at_ebts_flops(tiny_trend):
    """trend.md: a row per shared budget; at budget 2 the plain arm is read off at 2 x the tokens (its budget
    4); each arm's excess over the optimum; both slope fits."""
    out, cfg, points = tiny_trend
    table = (out / "trend.md").read_text()
    loss = {(p["arm"], p["steps"]): p["loss"] for p in points}
    rows = [line for line in table.splitlines() if line.startswith("| 128 |")]
    assert len(rows) == 1
    ebt_vs_plain4 = loss["EBT, K=2", 2] - loss["plain transformer", 4]
    assert f"| {loss['plain transformer', 4]:.4f} | {ebt_vs_plain4:+.4f} |" in rows[0]
    assert f"| {loss['plain transformer', 2] - 1.0:+.4f} | {loss['EBT, K=2', 2] - 1.0:+.4f} |" in rows[0]
    assert "gap slope over every budget" in table and "gap slope over the budgets of 1 tokens" in table
    assert json.loads((out / "trend.json").read_text())["config"]["budgets"] == [2]


def test_a_second_call_trains_nothing_and_a_lost_score_is_redone(tiny_trend):
    """Runs with an eval.json are kept; a run whose eval.json is gone is scored again, not retrained."""
    out, cfg, points = tiny_trend
    finals = {p: p.stat().st_mtime_ns for p in out.glob("*/final.pt")}
    (out / "ebt_n2_s1" / "eval.json").unlink()
    again = trend.trend(cfg)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/final.pt")} == finals
    assert (out / "ebt_n2_s1" / "eval.json").exists()
    assert sorted(p["loss"] for p in again) == pytest.approx(sorted(p["loss"] for p in points))


def test_bad_settings_are_refused_in_one_line():
    """An unknown corpus or an empty budget list is a UserError naming the cause."""
    from util import UserError

    with pytest.raises(UserError, match="corpus must be one of"):
        trend.trend(compose_cfg("trend", ["corpus=wiki"]))
    with pytest.raises(UserError, match="budgets and seeds"):
        trend.trend(compose_cfg("trend", ["budgets=[]"]))
