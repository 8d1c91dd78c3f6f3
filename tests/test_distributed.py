"""Several processes: `torchrun --nproc_per_node=2` with DDP matches one process, ckpt.pt holds every rank's
state and resumes in one process, and SIGTERM, SIGINT or a NaN on one rank stop every rank cleanly."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import helpers
from helpers import REPO, TINY_MODEL, load_ckpt, read_metrics, run_train, write_corpus

import train as train_mod
from util import UserError

TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text file (20k characters, 22 symbols) for quick runs."""
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", n_chars=20_000)


def common(corpus, *extra):
    return TINY_MODEL + ["data.block_size=16", "data.batch_size=8", f"data.data_path={corpus}", "train.eval_iters=2",
                         "train.learning_rate=1e-2", "train.warmup_steps=0", "train.decay_lr=false", *extra]


def start_torchrun(args, out_dir):
    """torchrun with 2 CPU processes of train.py; output into files beside out_dir (a full pipe would block)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / "stdout.txt", "w") as stdout, open(out_dir.parent / "stderr.txt", "w") as stderr:
        return subprocess.Popen([*TORCHRUN, str(REPO / "train.py"), *args, f"out_dir={out_dir}"], cwd=out_dir.parent,
                                stdout=stdout, stderr=stderr)


def outputs(out_dir):
    return (out_dir.parent / "stdout.txt").read_text(), (out_dir.parent / "stderr.txt").read_text()


def test_two_processes_match_one(corpus, tmp_path, capsys):
    """2 processes x 4 windows (grad accumulation 2) equal 1 process x 8: same losses and weights; ckpt.pt resumes."""
    args = common(corpus, "train.eval_interval=3", "train.log_interval=1", "train.grad_accum_steps=2")
    proc = start_torchrun(args + ["train.max_steps=6"], tmp_path / "two" / "out")
    proc.wait(timeout=180)
    stdout, stderr = outputs(tmp_path / "two" / "out")
    assert proc.returncode == 0, stderr[-3000:]
    run_train(args + ["train.max_steps=6", f"out_dir={tmp_path / 'one'}"])

    assert stdout.count("done: 6 steps") == 1 and "x 2 processes, 16 windows per step" in stdout  # rank 0 logs
    two, one = read_metrics(tmp_path / "two" / "out"), read_metrics(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [3, 6]
    for r2, r1 in zip(two, one):
        for key in ("train_loss", "val_loss", "val_loss_s1"):
            assert r2[key] == pytest.approx(r1[key], abs=1e-5), (key, r2, r1)
    w2, w1 = (load_ckpt(d / "final.pt")["model"] for d in (tmp_path / "two" / "out", tmp_path / "one"))
    assert max((w2[k] - w1[k]).abs().max().item() for k in w1) < 1e-5

    ckpt = load_ckpt(tmp_path / "two" / "out" / "ckpt.pt")
    assert len(ckpt["rng"]["torch"]) == 2 and not torch.equal(*ckpt["rng"]["torch"])  # each rank's own RNG
    capsys.readouterr()
    run_train(args + ["train.max_steps=8", "train.resume=true", f"out_dir={tmp_path / 'two' / 'out'}"])
    assert "at step 6" in capsys.readouterr().out
    assert load_ckpt(tmp_path / "two" / "out" / "final.pt")["step"] == 8


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_torchrun_stops_every_rank(signum, corpus, tmp_path, capsys):
    """SIGTERM or SIGINT to torchrun: every rank stops at the same step, ckpt.pt holds both ranks' PCD chains,
    the exit is non-zero, and one process continues with train.resume=true."""
    out = tmp_path / "run" / "out"
    args = common(corpus, "train.eval_interval=5", "model.use_contrastive=true", "model.contrastive_type=pcd",
                  "model.n_persistent=50")
    proc = start_torchrun(args + ["train.max_steps=100000"], out)
    try:
        metrics = out / "metrics.jsonl"
        helpers.wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, proc, timeout=120)
        proc.send_signal(signum)
        proc.wait(timeout=60)  # torchrun gives the workers 30 s before it kills them
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout, stderr = outputs(out)
    assert proc.returncode != 0
    stops = [s for s in stderr.splitlines() if s.startswith("error:")]
    assert len(stops) == 1 and stops[0].startswith("error: interrupted at step"), stderr[-3000:]  # rank 0 says it
    ckpt = load_ckpt(out / "ckpt.pt")
    step = ckpt["step"]
    assert f"interrupted at step {step};" in stops[0] and step >= 10 and not (out / "final.pt").exists()
    chains = [c["replay_chain"] for c in ckpt["chains"]]
    assert len(chains) == 2 and chains[0].shape[0] == 50 and not torch.equal(*chains)  # per rank: 50 windows

    capsys.readouterr()
    run_train(args + [f"train.max_steps={step + 3}", "train.resume=true", f"out_dir={out}"])
    assert f"at step {step}" in capsys.readouterr().out
    assert load_ckpt(out / "final.pt")["step"] == step + 3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nan_on_rank_1(rank, port, args, bad_step):
    """A torchrun worker, in a process of its own: rank 1 alone reports a NaN loss from step bad_step on."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    if rank == 1:
        real_step, calls = train_mod.train_step, [0]

        def poisoned(*a, **kw):
            calls[0] += 1
            metrics = real_step(*a, **kw)
            if calls[0] >= bad_step:
                metrics["train_loss"] = metrics["train_loss"] * float("nan")
            return metrics

        train_mod.train_step = poisoned
    out_dir = Path(next(a for a in args if a.startswith("out_dir=")).split("=", 1)[1])
    try:
        train_mod.train(helpers.compose_cfg("train", args))
        message = "finished"
    except UserError as err:
        message = str(err)
    (out_dir.parent / f"rank{rank}.txt").write_text(message)


def test_nan_on_one_rank_stops_every_rank(corpus, tmp_path, capsys):
    """A NaN loss on rank 1 only stops both ranks at the same step; the last good ckpt.pt is kept and resumes."""
    out = tmp_path / "out"
    args = common(corpus, "train.eval_interval=3", "train.log_interval=1", f"out_dir={out}")
    ctx = mp.spawn(nan_on_rank_1, args=(free_port(), args + ["train.max_steps=50"], 5), nprocs=2, join=False)
    deadline = time.time() + 120
    try:
        while not ctx.join(timeout=1):
            assert time.time() < deadline, "timed out"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1] and messages[0].startswith("the training loss became nan before step 5")
    ckpt = load_ckpt(out / "ckpt.pt")
    assert ckpt["step"] == 3 == read_metrics(out)[-1]["step"] and not (out / "final.pt").exists()
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    run_train(args + ["train.max_steps=5", "train.resume=true"])
    assert load_ckpt(out / "final.pt")["step"] == 5
