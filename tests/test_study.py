"""study.py at a tiny size: it trains what is missing, scores every arm's methods per bin, writes its files.
Each arm trains in a train.py subprocess (~13 s here, most of it imports), so these tests train three arms with
one seed; the documented command (docs/dyck.md: every arm, two seeds, the plot) runs in the slow tests."""

import json

import pytest

import dyck
import study
from helpers import compose_cfg

TINY_STUDY = ["n_layer=1", "n_embd=16", "batch_size=4", "max_steps=2", "tasks=3", "sweep=[0,2]", "samples=[1,2]",
              "beams=[1,2]", "deep_layers=2"]


def study_cfg(out, *extra):
    return compose_cfg("study", [f"out_dir={out}", *TINY_STUDY, *extra])


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, study.study(study_cfg(out, "seeds=[1]", "arms=[plain_deep,linear,ebt_s2]"))


def test_every_arm_seed_method_and_bin_is_scored(tiny_study):
    """Each arm and seed has its methods (beams for plain arms; K, M and the exact verifier for the others)
    scored on every bin; study.json and study.md hold them."""
    out, results = tiny_study
    expected = {"plain_deep": ["greedy", "beam 2"], "linear": ["K=0", "K=2", "exact verifier"],
                "ebt_s2": ["K=0", "K=2", "K=3", "K=3, M=2", "exact verifier"]}  # K=3: S2's trained K, always
    assert list(results) == list(expected)
    for arm, by_seed in results.items():
        assert list(by_seed) == [1]
        for r in by_seed.values():
            assert list(r["methods"]) == expected[arm], arm
            assert r["train"]["step"] == 2 and r["train"]["time_s"] > 0  # train.py's last metrics line
            for by_bin in r["methods"].values():
                assert list(by_bin) == list(dyck.BINS)
                assert all(s["tasks"] == 3 and 0 <= s["exact_match"]["mean"] <= 1 for s in by_bin.values())
    written = json.loads((out / "study.json").read_text())
    assert written["results"]["ebt_s2"]["1"]["methods"]["K=3, M=2"] == results["ebt_s2"][1]["methods"]["K=3, M=2"]
    table = (out / "study.md").read_text()
    rows = sum(len(v) for v in expected.values())
    assert table.count("\n| ") == 2 * (1 + rows)  # the mean over seeds and each seed: a header and a row each
    b = results["linear"][1]["methods"]["K=2"]
    mean = b["in_distribution"]["exact_match"]["mean"]
    assert f"| linear | K=2 | {mean:.3f} [{mean:.3f}, {mean:.3f}] |" in table  # one seed: its own value


def test_plain_deep_has_more_layers_and_compute_is_counted(tiny_study):
    """plain_deep trains with deep_layers; beam W costs W passes per character; M starts cost M * K steps."""
    out, results = tiny_study
    from checkpoints import load_model
    deep, _, _ = load_model(out / "plain_deep_seed1" / "final.pt", "cpu")
    linear, _, _ = load_model(out / "linear_seed1" / "final.pt", "cpu")
    assert deep.config.n_layer == 2 and linear.config.n_layer == 1 and deep.config.think_steps == 0
    r = results["plain_deep"][1]["methods"]
    b = "in_distribution"
    assert r["beam 2"][b]["passes_per_task"] == pytest.approx(2 * r["greedy"][b]["passes_per_task"])
    e = results["ebt_s2"][1]["methods"]
    assert e["K=3, M=2"][b]["think_steps_per_task"] == pytest.approx(2 * e["K=3"][b]["think_steps_per_task"])
    assert e["exact verifier"][b]["onehot_candidates_per_task"] == pytest.approx(6 * e["K=3"][b]["passes_per_task"])


def test_a_second_run_trains_nothing(tiny_study, capsys):
    """What is trained is kept: a second run with the same out_dir only scores."""
    out, _ = tiny_study
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/final.pt")}
    study.study(study_cfg(out, "seeds=[1]", "arms=[plain_deep,ebt_s2]"))
    assert "training" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/final.pt")} == before


@pytest.mark.parametrize("override", ["arms=[plain,nope]", "arms=[]", "tasks=0", "beams=[0]", "sweep=[-1]"])
def test_bad_study_options_are_refused(override, tmp_path):
    """Unknown arms, empty lists and impossible sizes get one clear error."""
    with pytest.raises(study.UserError):
        study.study(study_cfg(tmp_path, override))
