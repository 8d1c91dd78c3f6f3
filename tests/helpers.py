"""Shared helpers for the end-to-end tests (tests/test_train.py, tests/test_cli.py).

Most runs happen in-process: the real config is composed with Hydra's compose API and handed to
train.train / sample.sample, which is what `uv run train.py ...` does after parsing the command line.
A few tests start real subprocesses where the exit code, stderr or signals matter.
"""

import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import engine  # noqa: E402  (registers the train_schema config node)
import sample as sample_mod  # noqa: E402  (registers the sample_schema config node)
import train as train_mod  # noqa: E402

# a model small enough that a few steps take well under a second on CPU
TINY_MODEL = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32"]
TINY_DATA = ["data.block_size=16", "data.batch_size=4"]
TINY_TRAIN = ["train.max_steps=3", "train.eval_interval=2", "train.eval_iters=1"]
TINY = TINY_MODEL + TINY_DATA + TINY_TRAIN


def compose_cfg(name, overrides):
    """The typed config (dataclass) that `uv run {name}.py overrides...` would run with."""
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
        cfg = compose(name, overrides=list(overrides))
    return OmegaConf.to_object(cfg)


def run_train(overrides):
    """Train in-process with the real config and these overrides; returns the typed config used."""
    cfg = compose_cfg("train", overrides)
    train_mod.train(cfg)
    return cfg


def run_sample(overrides, capsys):
    """Sample in-process; returns the generated texts (the blocks before each '-----' separator)."""
    capsys.readouterr()
    sample_mod.sample(compose_cfg("sample", overrides))
    out = capsys.readouterr().out
    return out.split("---------------\n")[:-1]


def write_corpus(path, n_chars=20_000, alphabet="abcdefghij klmnopqrst\n", seed=0):
    """A text file of n_chars characters drawn uniformly (and independently) from alphabet."""
    rng = random.Random(seed)
    path = Path(path)
    path.write_text("".join(rng.choice(alphabet) for _ in range(n_chars)), encoding="utf-8")
    return path


def read_metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def seed_argv(command):
    """A README command line (leading '!' dropped, backslash continuations joined) -> (script, overrides),
    split as a POSIX shell would split it."""
    command = command.strip().lstrip("!").replace("\\\n", " ")
    words = shlex.split(command)
    assert words[:2] == ["uv", "run"], command
    words = words[2:]
    if words[0] == "python":
        words = words[1:]
    assert words[0] in ("train.py", "sample.py"), command
    return words[0], words[1:]


def cli(args, cwd=None, env=None, timeout=180, uv=False):
    """Run a script of the repo as a real program: `uv run args...` (uv=True) or the venv's python."""
    full_env = {**os.environ, **(env or {})}
    if args and args[0] in ("train.py", "sample.py") and cwd not in (None, REPO):
        args = [str(REPO / args[0]), *args[1:]]
    if uv:
        cmd = ["uv", "run", "--project", str(REPO), *args]
    else:
        cmd = [sys.executable, *args]
    return subprocess.run(cmd, cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, proc, timeout=90):
    """Poll until predicate() holds, failing if the process proc ends first or the timeout passes."""
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.returncode
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def error_lines(stderr):
    """The non-empty lines of stderr, ignoring tqdm's progress-bar redraws."""
    lines = [s for s in stderr.replace("\r", "\n").splitlines() if s.strip()]
    return [s for s in lines if not s.lstrip().startswith("train:")]


def repo_snapshot():
    """Every file of the repo outside .git, .venv and caches, with size and mtime: to see stray writes."""
    snap = {}
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", "tests"}
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip]
        for f in files:
            p = Path(root) / f
            st = p.stat()
            snap[str(p.relative_to(REPO))] = (st.st_size, st.st_mtime_ns)
    return snap


def run_main(script, args):
    """Run `python script args...` in this process: the script's real `__main__` block, with sys.argv set,
    stdout and stderr captured, SystemExit turned into a return code. Warnings that Python would print
    count as stderr lines. Returns a CompletedProcess like subprocess.run."""
    import contextlib
    import io
    import runpy
    import warnings

    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    path = str(REPO / script)
    out, err = io.StringIO(), io.StringIO()
    old_argv = sys.argv
    sys.argv = [path, *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            try:
                runpy.run_path(path, run_name="__main__")
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # an uncaught exception: Python would print a traceback
                import traceback

                err.write("Traceback (most recent call last):\n" + traceback.format_exc())
                code = 1
    finally:
        sys.argv = old_argv
        GlobalHydra.instance().clear()
        # the re-executed script registered its own copies of the schemas: put the imported ones back
        ConfigStore.instance().store(name="train_schema", node=engine.RunConfig)
        ConfigStore.instance().store(name="sample_schema", node=sample_mod.SampleConfig)
    stderr = err.getvalue()
    for w in caught:
        if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)):
            stderr = f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" + stderr
    return subprocess.CompletedProcess([sys.executable, path, *args], code, out.getvalue(), stderr)
