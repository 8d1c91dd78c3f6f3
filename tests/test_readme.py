"""Every command in README.md runs (with tiny sizes and step counts appended), so the docs cannot drift."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import bench as bench_mod
from helpers import REPO, TINY, compose_cfg, run_sample, run_train

TINY_BENCH = ["bench.steps=1", "bench.repeats=1", "bench.warmup=1", "bench.gen_tokens=4"]


def readme_commands():
    """The `uv run ...` lines of README.md's bash blocks, each split as a shell would, comments dropped."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["uv", "run"]:
                commands.append(words[2:])
    return commands


COMMANDS = readme_commands()


def test_readme_has_the_two_commands():
    """The README documents `uv sync`-free `uv run train.py` and `uv run pytest` as the two commands."""
    assert ["train.py"] in COMMANDS and ["pytest"] in COMMANDS
    assert len(COMMANDS) >= 15


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("readme_ckpt")
    run_train(TINY + [f"out_dir={out}"])
    return out / "final.pt"


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_readme_command_runs(words, tmp_path, tiny_checkpoint, capsys, monkeypatch):
    """This README command runs as written (only sizes, steps and paths are shrunk or redirected)."""
    script, args = (words[1], words[2:]) if words[0] == "python" else (words[0], words[1:])
    if script == "pytest":
        return  # this very suite
    out = [f"out_dir={tmp_path}"]
    if script == "train.py":
        monkeypatch.setenv("WANDB_MODE", "offline")
        if "train.resume=true" in args:  # something to resume first
            run_train(TINY + out)
            args = args + ["train.max_steps=5"]
        run_train(args + TINY + out)
        assert (tmp_path / "final.pt").exists()
    elif script == "sample.py":
        args = [f"checkpoint={tiny_checkpoint}" if a.startswith("checkpoint=") else a for a in args]
        texts = run_sample(args + ["max_new_tokens=8"], capsys)
        assert texts and all(len(t) > 8 for t in texts)
    elif script == "torchrun":  # a real multi-process run (tests/test_distributed.py checks what it does)
        assert "train.py" in args, words
        torchrun = Path(sys.executable).parent / "torchrun"
        r = subprocess.run([str(torchrun), *args, *TINY, *out], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert (tmp_path / "final.pt").exists() and "processes" in r.stdout
    elif script == "bench.py":
        result = bench_mod.bench(compose_cfg("bench", TINY + TINY_BENCH + out))
        assert result["train"]["ratio"] > 0 and (tmp_path / "bench.json").exists()
    else:
        pytest.fail(f"README command for an unknown script: {words}")


def test_gpu_preset_is_the_predecessors_model():
    """preset=gpu composes the predecessor's model: 6 layers, 6 heads, 384 wide, block 256, batch 64."""
    cfg = compose_cfg("train", ["preset=gpu"])
    m, d = cfg.model, cfg.data
    assert (m.n_layer, m.n_head, m.n_embd, d.block_size, d.batch_size) == (6, 6, 384, 256, 64)
    assert compose_cfg("train", ["preset=gpu", "model.n_layer=2"]).model.n_layer == 2  # overrides still win
