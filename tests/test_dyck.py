"""The balanced-bracket data (dyck.py): every line a correct task, bins where they claim, deterministic."""

import re

import pytest

import dyck
from helpers import TINY, run_train


def closing(prefix):
    """The completion by another route than dyck.py's stack: strip matched pairs until none is left, then
    close what remains, innermost first (None if a closer does not match)."""
    while True:
        shorter = re.sub(r"\(\)|\[\]", "", prefix)
        if shorter == prefix:
            break
        prefix = shorter
    if any(c in ")]" for c in prefix):
        return None
    return "".join({"(": ")", "[": "]"}[c] for c in reversed(prefix))


@pytest.fixture(scope="module")
def text():
    return dyck.training_text()


def test_training_lines_are_correct_tasks_within_the_training_bounds(text):
    """Each line is prefix=completion, the completion closes the prefix, depth <= 8, span <= 24, length <= 48."""
    lines = text.splitlines()
    assert text.endswith("\n") and len(text) >= dyck.TRAIN_CHARS and len(lines) > 10_000
    depths = set()
    for line in lines:
        prefix, completion = line.split(dyck.SEP)
        assert completion and completion == closing(prefix), line
        balanced, depth, span = dyck.measure(prefix + completion)
        assert balanced and depth <= dyck.MAX_DEPTH and span <= dyck.MAX_SPAN, line
        assert len(prefix) + len(completion) <= dyck.MAX_LEN, line
        depths.add(depth)
    assert depths == set(range(1, dyck.MAX_DEPTH + 1))  # every allowed depth occurs
    assert set(text) == set("()[]=\n")


def test_measure_finds_depth_span_and_errors():
    """measure: depth and longest opener-closer distance of a word; a wrong or stray closer is unbalanced."""
    assert dyck.measure("([])[]") == (True, 2, 3)
    assert dyck.measure("(((") == (False, 3, 0)
    assert not dyck.measure("(]")[0] and not dyck.measure(")(")[0] and not dyck.measure("([)]")[0]


def test_generation_is_deterministic_from_the_seed():
    """The same seed gives the same text and eval sets; another seed gives others."""
    assert dyck.training_text(7, 5000) == dyck.training_text(7, 5000)
    assert dyck.training_text(7, 5000) != dyck.training_text(8, 5000)
    assert dyck.eval_sets(3, 20) == dyck.eval_sets(3, 20)
    assert dyck.eval_sets(3, 20) != dyck.eval_sets(4, 20)


def test_eval_bins_hold_what_they_claim(text):
    """Each bin's tasks are correct, distinct, held out from training prefixes, in its depth and span ranges,
    and fit a block of 64 (prefix, =, completion)."""
    train_prefixes = {line.split(dyck.SEP)[0] for line in text.splitlines()}
    sets = dyck.eval_sets(1, 200, exclude=train_prefixes)
    assert list(sets) == list(dyck.BINS)
    for name, tasks in sets.items():
        (d_lo, d_hi), (s_lo, s_hi), max_len = dyck.BINS[name]
        assert len(tasks) == 200 and len({p for p, _ in tasks}) == 200
        for prefix, completion in tasks:
            assert completion == closing(prefix) and prefix not in train_prefixes
            balanced, depth, span = dyck.measure(prefix + completion)
            assert balanced and d_lo <= depth <= d_hi and s_lo <= span <= s_hi, (name, prefix)
            assert len(prefix) + 1 + len(completion) <= min(max_len + 1, 64)
    assert max(dyck.measure(p + c)[1] for p, c in sets["depth_far_past"]) > dyck.MAX_DEPTH + 4


def test_train_on_dyck_writes_the_data_and_trains(tmp_path):
    """data.data_path=dyck.txt, missing: train.py writes dyck.training_text() there and trains on it."""
    path = tmp_path / "dyck.txt"
    run_train(TINY + [f"data.data_path={path}", f"out_dir={tmp_path / 'out'}"])
    assert path.read_text() == dyck.training_text()
    assert (tmp_path / "out" / "final.pt").exists()
