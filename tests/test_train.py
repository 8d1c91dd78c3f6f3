"""End-to-end training: outputs, exact resume, no target leak, NaN handling, Ctrl-C and kill -9."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import engine
import helpers
from helpers import REPO, TINY, TINY_DATA, TINY_MODEL, load_ckpt, read_metrics, run_train, wait_for, write_corpus

import train as train_mod
from util import UserError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text file (20k characters, 22 symbols) for quick runs."""
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", n_chars=20_000)


def same_state(a, b):
    """Equal keys, bit-equal tensors, equal plain data (e.g. a module's extra state)."""
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


# ---------------------------------------------------------------------------------------------------
# outputs


def test_outputs_of_a_run(corpus, tmp_path, monkeypatch, capsys):
    """A run writes final.pt, best.pt, ckpt.pt and metrics.jsonl into out_dir, and nothing else anywhere."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = helpers.repo_snapshot()
    run_train(TINY + ["train.max_steps=5", f"data.data_path={corpus}", "out_dir=out"])
    assert sorted(os.listdir(cwd)) == ["out"]
    out = cwd / "out"
    assert sorted(os.listdir(out)) == ["best.pt", "ckpt.pt", "final.pt", "metrics.jsonl"]
    assert helpers.repo_snapshot() == before

    lines = (out / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [2, 4, 5]
    for r in rows:
        assert {"step", "val_loss", "val_loss_s1", "train_loss", "time_s"} <= r.keys()
        assert all(math.isfinite(r[k]) for k in ("val_loss", "val_loss_s1", "train_loss", "time_s"))
    assert rows[0]["time_s"] <= rows[-1]["time_s"]

    final, best, ckpt = (load_ckpt(out / n) for n in ("final.pt", "best.pt", "ckpt.pt"))
    text = corpus.read_text()
    for c in (final, best, ckpt):  # self-contained: weights, resolved config, vocabulary, step
        assert {"model", "config", "vocab", "step"} <= c.keys()
        assert c["vocab"] == sorted(set(text))
        assert c["config"]["model"]["vocab_size"] == len(c["vocab"]) and c["config"]["data"]["block_size"] == 16
        assert not [k for k in c["model"] if k.startswith("_orig_mod")]
    assert final["step"] == ckpt["step"] == 5
    best_row = min(rows, key=lambda r: r["val_loss"])
    assert best["step"] == best_row["step"]
    assert {"optimizer", "rng"} <= ckpt.keys()  # what resuming needs
    assert same_state(final["model"], ckpt["model"])


def test_run_returns_best_val_and_is_reproducible(corpus, tmp_path, capsys):
    """Two runs with the same seed give identical weights; a different train.seed gives different ones."""
    a = run_train(TINY + [f"data.data_path={corpus}", f"out_dir={tmp_path / 'a'}"])
    run_train(TINY + [f"data.data_path={corpus}", f"out_dir={tmp_path / 'b'}"])
    run_train(TINY + [f"data.data_path={corpus}", f"out_dir={tmp_path / 'c'}", "train.seed=7"])
    wa, wb, wc = (load_ckpt(tmp_path / d / "final.pt")["model"] for d in "abc")
    assert same_state(wa, wb)
    assert not same_state(wa, wc)
    assert a.model.vocab_size == 22


# ---------------------------------------------------------------------------------------------------
# resume


RESUME_MODES = {
    "plain": ["model.dropout=0.1", "model.think_noise=0.05"],  # dropout and think noise use the torch RNG
    "pcd": ["model.use_contrastive=true", "model.contrastive_type=pcd", "model.n_persistent=50"],
    "fast_pcd": ["model.use_contrastive=true", "model.contrastive_type=fast_pcd", "model.n_persistent=50"],
    "replay": ["model.replay_size=6", "model.replay_frac=0.5"],  # EBT replay buffer
    "accum_bf16": ["train.grad_accum_steps=2", "train.dtype=bfloat16"],  # micro-batches, autocast
}
CHAIN_MODES = ("pcd", "fast_pcd", "replay")  # the modes with a ReplayState


@pytest.mark.parametrize("mode", list(RESUME_MODES))
def test_resume_is_exact(mode, corpus, tmp_path, capsys):
    """N steps, then resume to N+M, equals N+M straight: same weights (torch.equal) and same val losses."""
    n, m = 4, 3
    common = TINY_MODEL + TINY_DATA + RESUME_MODES[mode] + [
        f"data.data_path={corpus}", "train.decay_lr=false", "train.warmup_steps=2", "train.learning_rate=1e-2",
        "train.eval_interval=2", "train.eval_iters=2", "train.log_interval=1"]
    run_train(common + [f"train.max_steps={n + m}", f"out_dir={tmp_path / 'straight'}"])
    run_train(common + [f"train.max_steps={n}", f"out_dir={tmp_path / 'resumed'}"])
    ckpt = load_ckpt(tmp_path / "resumed" / "ckpt.pt")
    assert ckpt["step"] == n
    if mode in CHAIN_MODES:
        mc = ckpt["config"]["model"]
        windows = mc["replay_size"] or mc["n_persistent"]  # the replay buffer: EBT's replay or PCD's windows
        assert ckpt["chains"][0]["replay_chain"].shape == (windows, mc["block_size"], 22)  # entry r: rank r
    capsys.readouterr()
    run_train(common + [f"train.max_steps={n + m}", f"out_dir={tmp_path / 'resumed'}", "train.resume=true"])
    assert f"at step {n}" in capsys.readouterr().out

    straight = load_ckpt(tmp_path / "straight" / "final.pt")
    resumed = load_ckpt(tmp_path / "resumed" / "final.pt")
    assert resumed["step"] == straight["step"] == n + m
    assert same_state(straight["model"], resumed["model"])
    if mode in CHAIN_MODES:  # the replay buffer and fast weights continued too
        s_ck, r_ck = load_ckpt(tmp_path / "straight" / "ckpt.pt"), load_ckpt(tmp_path / "resumed" / "ckpt.pt")
        assert same_state(s_ck["chains"][0], r_ck["chains"][0])
        if mode == "replay":  # windows were stored, and replayed windows were warm-started from them
            chains = r_ck["chains"][0]
            assert chains["_extra_state"]["replay_count"] > 6 and chains["replay_z"].abs().sum() > 0
        else:  # PCD: windows were stored with their chains
            assert r_ck["chains"][0]["replay_chain"].abs().sum() > 0
    rows_s, rows_r = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in rows_r] == [r["step"] for r in rows_s] == [2, 4, 6, 7]
    assert rows_r[-1]["val_loss"] == rows_s[-1]["val_loss"]
    assert [r["val_loss"] for r in rows_r] == [r["val_loss"] for r in rows_s]


def test_resume_with_another_model_is_refused(corpus, tmp_path, capsys):
    """Resuming with another architecture or block size than ckpt.pt fails with one line naming the key."""
    run_train(TINY + [f"data.data_path={corpus}", f"out_dir={tmp_path}"])
    for change, key in (("model.n_embd=64", "model.n_embd"), ("model.energy=mixture", "model.energy"),
                        ("data.block_size=8", "data.block_size")):
        with pytest.raises(UserError, match=f"another {key}") as err:
            run_train(TINY + [f"data.data_path={corpus}", f"out_dir={tmp_path}", "train.resume=true",
                              "train.max_steps=6", change])
        assert "\n" not in str(err.value)


def test_resume_with_another_loss_weight_or_think_option_is_noted(corpus, tmp_path, capsys):
    """Changing a loss weight or a think option on resume is allowed, printed as a note, and takes effect."""
    run_train(TINY + [f"data.data_path={corpus}", f"out_dir={tmp_path}"])
    capsys.readouterr()
    cfg = run_train(TINY + [f"data.data_path={corpus}", f"out_dir={tmp_path}", "train.resume=true",
                            "train.max_steps=5", "model.aux_ce_weight=0.5", "model.think_steps=3"])
    out = capsys.readouterr().out
    assert "note: resuming with" in out and "model.aux_ce_weight=0.5 (was 0.1)" in out
    assert "model.think_steps=3 (was 2)" in out and "train.max_steps=5 (was 3)" in out
    ckpt = load_ckpt(tmp_path / "final.pt")
    assert ckpt["step"] == 5 and ckpt["config"]["model"]["think_steps"] == cfg.model.think_steps == 3


@pytest.mark.parametrize("options, inert", [
    (["model.ce_all_steps=true", "model.think_truncate=true"], "model.ce_all_steps"),
    (["model.think_steps=0", "model.think_noise=0.1"], "model.think_noise"),
    (["model.think_steps=0", "model.replay_size=8"], "model.replay_size"),
    (["model.energy_layers=0"], "model.energy_layers"),  # the default energy is linear
    (["model.mixture_stopgrad=false"], "model.mixture_stopgrad"),
    (["model.contrastive_k=5"], "model.contrastive_k"),  # contrastive training is off
    (["model.use_contrastive=true", "model.n_persistent=50"], "model.n_persistent"),  # cd has no buffer
    (["model.use_contrastive=true", "model.contrastive_type=pcd", "model.fast_weight_lr=0.1"], "model.fast_weight_lr"),
    (["train.think_lr_lr_mult=3"], "train.think_lr_lr_mult"),
])
def test_options_that_would_do_nothing_are_refused(options, inert, corpus, tmp_path):
    """An option set where it has no effect is refused with one line that names it, before any training."""
    with pytest.raises(UserError, match=f"{inert}=.* does nothing") as err:
        run_train(TINY + [f"data.data_path={corpus}", f"out_dir={tmp_path}"] + options)
    assert "\n" not in str(err.value) and not (tmp_path / "ckpt.pt").exists()


# ---------------------------------------------------------------------------------------------------
# no target leak: on uniformly random text nothing can beat ln(V)

LEAK_MODES = {
    "no_contrastive": [],
    "cd": ["model.use_contrastive=true", "model.contrastive_type=cd"],
    "pcd": ["model.use_contrastive=true", "model.contrastive_type=pcd"],
    "fast_pcd": ["model.use_contrastive=true", "model.contrastive_type=fast_pcd"],
    "mixture": ["model.energy=mixture", "model.mixture_hidden=32", "model.mixture_stopgrad=false"],
    "mixture_cd": ["model.energy=mixture", "model.mixture_hidden=32", "model.use_contrastive=true"],
    "transformer": ["model.energy=transformer", "data.batch_size=4"],  # slower: a smaller batch
    "transformer_cd": ["model.energy=transformer", "data.batch_size=4", "model.use_contrastive=true"],
}


@pytest.fixture(scope="module")
def random_text(tmp_path_factory):
    """50k characters drawn uniformly and independently from 20 letters."""
    return write_corpus(tmp_path_factory.mktemp("random") / "random.txt", n_chars=50_000,
                        alphabet="abcdefghijklmnopqrst", seed=1)


@pytest.mark.parametrize("mode", list(LEAK_MODES))
def test_no_leak_on_random_text(mode, random_text, tmp_path, capsys):
    """200 steps on random text keep every val loss (S1, S2) >= ln(V) - 0.05 in every loss mode and energy."""
    run_train(TINY_MODEL + ["data.batch_size=8"] + LEAK_MODES[mode] + [
        f"data.data_path={random_text}", "data.block_size=16", "model.think_steps=2",
        "train.max_steps=200", "train.eval_interval=50", "train.eval_iters=8", "train.learning_rate=1e-2",
        "train.warmup_steps=10", "train.log_interval=50", f"out_dir={tmp_path}"])
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [50, 100, 150, 200]
    floor = math.log(20) - 0.05
    for r in rows:
        assert r["val_loss"] >= floor and r["val_loss_s1"] >= floor, r
        assert r["train_loss"] >= floor - 0.15, r  # train batches are random too (small batches: noisier)


# ---------------------------------------------------------------------------------------------------
# NaN


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    """A loss that turns NaN stops the run with one line; ckpt.pt from the last good eval survives."""
    calls = {"n": 0}
    real_total_loss = engine.total_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_total_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 5 else loss  # step 5 poisons the weights

    monkeypatch.setattr(engine, "total_loss", poisoned)
    with pytest.raises(UserError) as err:
        run_train(TINY_MODEL + TINY_DATA + [f"data.data_path={corpus}", "train.max_steps=20", "train.eval_interval=3",
                                            "train.eval_iters=1", "train.log_interval=1", f"out_dir={tmp_path}"])
    message = str(err.value)
    assert "\n" not in message and "nan" in message and "ckpt.pt" in message
    ckpt = load_ckpt(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 3 == read_metrics(tmp_path)[-1]["step"]
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert not (tmp_path / "final.pt").exists()
    # the kept checkpoint resumes (with a sane loss again)
    monkeypatch.setattr(engine, "total_loss", real_total_loss)
    run_train(TINY_MODEL + TINY_DATA + [f"data.data_path={corpus}", "train.max_steps=5", "train.eval_interval=3",
                                        "train.eval_iters=1", "train.log_interval=1", f"out_dir={tmp_path}",
                                        "train.resume=true"])
    assert load_ckpt(tmp_path / "final.pt")["step"] == 5


# ---------------------------------------------------------------------------------------------------
# signals (real programs)


def start_training(out_dir, corpus, extra):
    args = [sys.executable, str(REPO / "train.py"), *TINY_MODEL, *TINY_DATA, f"data.data_path={corpus}",
            f"out_dir={out_dir}", "train.max_steps=100000", "train.eval_iters=1", *extra]
    # output goes to files: a full pipe would block the program (and hide where a kill lands)
    stdout = open(out_dir.parent / "stdout.txt", "w")
    stderr = open(out_dir.parent / "stderr.txt", "w")
    try:
        return subprocess.Popen(args, cwd=out_dir.parent, stdout=stdout, stderr=stderr)
    finally:
        stdout.close()
        stderr.close()


def outputs(out_dir):
    return (out_dir.parent / "stdout.txt").read_text(), (out_dir.parent / "stderr.txt").read_text()


def test_sigint_saves_a_resumable_checkpoint(corpus, tmp_path, capsys):
    """Ctrl-C (SIGINT) saves ckpt.pt and exits non-zero with one line; train.resume=true continues exactly."""
    out = tmp_path / "run"
    extra = ["train.eval_interval=5", "train.learning_rate=1e-2", "train.warmup_steps=0", "train.decay_lr=false"]
    proc = start_training(out, corpus, extra)
    try:
        wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2,
                 proc)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        _, stderr = outputs(out)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    lines = helpers.error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("error: interrupted at step"), stderr[-3000:]
    ckpt = load_ckpt(out / "ckpt.pt")
    step = ckpt["step"]
    assert f"interrupted at step {step}" in lines[0] and "train.resume=true" in lines[0]
    assert step >= 10 and {"optimizer", "rng"} <= ckpt.keys()
    assert not (out / "final.pt").exists()

    capsys.readouterr()
    run_train(TINY_MODEL + TINY_DATA + [f"data.data_path={corpus}", f"out_dir={out}", "train.eval_iters=1",
                                        f"train.max_steps={step + 3}", "train.resume=true", *extra])
    assert f"at step {step}" in capsys.readouterr().out
    assert load_ckpt(out / "final.pt")["step"] == step + 3
    # the same run without the interruption ends with the same weights
    run_train(TINY_MODEL + TINY_DATA + [f"data.data_path={corpus}", f"out_dir={tmp_path / 'straight'}",
                                        "train.eval_iters=1", f"train.max_steps={step + 3}", *extra])
    resumed = load_ckpt(out / "final.pt")["model"]
    straight = load_ckpt(tmp_path / "straight" / "final.pt")["model"]
    for k in straight:  # another process (thread count may differ): equal up to float rounding
        assert torch.allclose(resumed[k], straight[k], rtol=1e-4, atol=1e-6), k


def test_sigkill_leaves_a_loadable_checkpoint(corpus, tmp_path):
    """kill -9 at random moments (ckpt.pt rewritten every step) always leaves a ckpt.pt that loads."""
    rng = random.Random()
    delays = [rng.uniform(0.0, 1.5) for _ in range(3)]
    procs = []
    try:
        for i in range(len(delays)):
            (tmp_path / str(i)).mkdir()
            procs.append(start_training(tmp_path / str(i) / "run", corpus, ["train.eval_interval=1"]))
        for i, (proc, delay) in enumerate(zip(procs, delays)):
            ckpt_file = tmp_path / str(i) / "run" / "ckpt.pt"
            wait_for(ckpt_file.exists, proc)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        for proc in procs:
            proc.wait(timeout=30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for i, proc in enumerate(procs):
        assert proc.returncode == -signal.SIGKILL, (delays, proc.returncode)
        ckpt = load_ckpt(tmp_path / str(i) / "run" / "ckpt.pt")  # whole, whatever the moment of the kill
        assert ckpt["step"] >= 1 and {"model", "optimizer", "rng"} <= ckpt.keys(), delays


def test_val_path_validates_on_a_file_of_its_own(tmp_path, capsys):
    """data.val_path: all of data_path trains, the val file validates, the vocabulary is both's;
    without it the last 10% of data_path validates."""
    from data import Dataset

    text, val = "abcab" * 40, "cabxc" * 10  # 'x' only in the val text
    split = Dataset(text, block_size=4)
    assert split.vocab.decode(split.splits["val"].tolist()) == text[int(0.9 * len(text)):]
    own = Dataset(text, block_size=4, val_text=val)
    assert own.vocab.chars == ["a", "b", "c", "x"]
    assert own.vocab.decode(own.splits["train"].tolist()) == text
    assert own.vocab.decode(own.splits["val"].tolist()) == val
    train_file, val_file = write_corpus(tmp_path / "train.txt"), tmp_path / "val.txt"
    val_file.write_text("abcdeZ" * 200, encoding="utf-8")  # 'Z' never in the training file
    out = tmp_path / "run"
    run_train(TINY + [f"data.data_path={train_file}", f"data.val_path={val_file}", f"out_dir={out}"])
    assert "Z" in load_ckpt(out / "final.pt")["vocab"]
    assert all(math.isfinite(row["val_loss"]) for row in read_metrics(out))
