"""The balanced-bracket data (dyck.py): every line a correct task, bins where they claim,
deterministic."""

import re

import pytest

import dyck
from helpers import TINY, run_train


def closing(prefix):
    """The completion by another route than dyck.py's stack: strip matched pairs until none is left,
    then close what remains, innermost first (None if a closer does not match)."""
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
    """Each line is prefix=completion, the completion closes the prefix, depth <= 8, span <= 24,
    length <= 48."""
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
    """measure: depth and longest opener-closer distance of a word; a wrong or stray closer is
    unbalanced."""
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
    """Each bin's tasks are correct, distinct, held out from training prefixes, in its depth and
    span ranges, and fit a block of 64 (prefix, =, completion)."""
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
    """data.data_path=dyck.txt, missing: train.py writes dyck.training_text() there and trains on
    it."""
    path = tmp_path / "dyck.txt"
    run_train(TINY + [f"data.data_path={path}", f"out_dir={tmp_path / 'out'}"])
    assert path.read_text() == dyck.training_text()
    assert (tmp_path / "out" / "final.pt").exists()


@pytest.fixture(scope="module")
def dyck_model(tmp_path_factory):
    """A tiny linear-energy model trained a few steps on dyck text: (model, vocab)."""
    root = tmp_path_factory.mktemp("dyck")
    path = root / "dyck.txt"
    path.write_text(dyck.training_text(5, 20_000))
    run_train(TINY + ["train.max_steps=20", f"data.data_path={path}", f"out_dir={root / 'out'}"])
    from checkpoints import load_model
    model, vocab, _ = load_model(root / "out" / "final.pt", "cpu")
    return model, vocab


def test_complete_equals_cached_generation(dyck_model):
    """complete (a full pass per character) picks the same characters as ebm.generate with its KV
    cache."""
    from functools import partial

    import torch

    from ebm import generate, system2_logits
    model, vocab = dyck_model
    prefixes = ["(([", "[]()", "[[(("]
    for prefix in prefixes:
        ours = dyck.complete(model, vocab, [prefix], 6, think_steps=2)[0]
        idx = torch.tensor([vocab.encode("\n" + prefix + dyck.SEP)])
        theirs = vocab.decode(generate(model, idx, 6, partial(system2_logits,
                                                              steps=2))[0, -6:].tolist())
        assert ours == theirs, prefix


def test_exact_verifier_of_linear_energy_is_greedy_system1(dyck_model):
    """Linear energy: the argmin of e over the vocabulary is System 1's argmax, so exact decoding =
    K=0."""
    model, vocab = dyck_model
    tasks = dyck.eval_sets(2, 10)["in_distribution"]
    exact = dyck.score(model, vocab, tasks, exact=True)["exact_match"]
    assert exact == dyck.score(model, vocab, tasks)["exact_match"]
    prefixes = [p for p, _ in tasks if len(p) == len(tasks[0][0])]
    assert dyck.complete(model, vocab, prefixes, 5, exact=True) == dyck.complete(model, vocab,
                                                                                 prefixes, 5)


def test_score_counts_whole_completions_and_the_newline(dyck_model, monkeypatch):
    """A completion counts only with its newline; accuracy is per character; the compute is per
    task."""
    model, vocab = dyck_model
    tasks = [("((", "))"), ("[", "]"), ("([", "])")]
    answers = {"((": "))\n", "[": "]x", "([": "])\n"}  # the second misses its newline
    monkeypatch.setattr(dyck, "complete", lambda m, v, prefixes, n,
                        *a: [answers[p][:n].ljust(n, "x") for p in prefixes])
    r = dyck.score(model, vocab, tasks, think_steps=2, starts=3)
    assert r["exact_match"]["mean"] == pytest.approx(2 / 3) and r["tasks"] == 3
    assert r["char_accuracy"]["mean"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert (r["passes_per_task"] == pytest.approx(8 / 3)
            and r["think_steps_per_task"] == pytest.approx(8 / 3 * 6))
    assert r["exact_match"]["lo"] <= 2 / 3 <= r["exact_match"]["hi"]


def test_bootstrap_interval_is_over_tasks():
    """Constant values give a point; the interval of 0/1 values narrows like 1 / sqrt(n)."""
    assert dyck.bootstrap_interval([1.0] * 50) == {"mean": 1.0, "lo": 1.0, "hi": 1.0}
    small = dyck.bootstrap_interval([0.0, 1.0] * 50)
    big = dyck.bootstrap_interval([0.0, 1.0] * 800)
    ratio = (small["hi"] - small["lo"]) / (big["hi"] - big["lo"])
    assert 3 < ratio < 5  # sqrt(16) = 4


def test_beam_search_of_width_one_is_greedy_and_wide_beams_find_the_most_likely(dyck_model):
    """Width 1 is greedy; a beam as wide as all V^2 two-character continuations finds the most
    likely one."""
    import itertools

    import torch
    model, vocab = dyck_model
    V = len(vocab)
    for prefix in ["(([", "[]("]:
        assert dyck.beam_complete(model, vocab, prefix, 4, 1) == dyck.complete(model, vocab,
                                                                               [prefix], 4)[0]
        best, best_lp = None, -float("inf")
        # brute force: the likelihood of every pair
        for pair in itertools.product(vocab.chars, repeat=2):
            idx = torch.tensor([vocab.encode("\n" + prefix + dyck.SEP + "".join(pair))])
            h, e, _ = dyck.observe(model, idx)
            lp = torch.log_softmax(-e[0].double() / model.config.softmax_temperature, -1)
            total = lp[-3, idx[0, -2]] + lp[-2, idx[0, -1]]
            if total > best_lp:
                best, best_lp = "".join(pair), total
        assert dyck.beam_complete(model, vocab, prefix, 2, V * V) == best
