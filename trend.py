"""
Does EBT's gap to the plain transformer shrink with more data? `uv run --extra plots trend.py
corpus=synthetic` trains the best plain transformer and the EBT S1 recipe (the tuned settings of
docs/results.md) at every budget and seed that is missing, each budget its own run and cosine schedule,
scores each with eval.py on the corpus's val text, and writes to out_dir/corpus: trend.png and trend.md
(viz.py's trend: the gap per budget and seed, its slope against log tokens, the plain arm read off at
EBT's counted FLOPs, and on the synthetic language each arm's excess over the optimum).

Corpora (docs/corpora.md): `synthetic` (21.6M training characters of a language with a known entropy
rate) and `natural` (4.57M characters of the complete works, scored on tiny Shakespeare's val split) are
read at most once at every budget up to 4000 steps of 1,024 characters; `tiny` is tiny Shakespeare, whose
1.0M training characters the budgets past 1000 steps read again (the repeated-data curve).

Every run is its own train.py and eval.py process, `workers` at a time with the CPU's threads shared
between them; a run stopped part way resumes from its ckpt.pt, a scored one is kept.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import hydra
from hydra.core.config_store import ConfigStore

import viz
from data import REPO
from util import UserError, check_overrides, run

# each corpus's train.py overrides and the val tokens eval.py scores (the synthetic val text is larger,
# and its optimum was measured on the first 102,400 characters: docs/corpora.md)
CORPORA = {
    "synthetic": (["data.data_path=synthetic.txt"], 102400),
    "natural": (["data.data_path=shakespeare_complete.txt",
                 "data.val_path=shakespeare_complete_val.txt"], 25600),
    "tiny": ([], 25600),
}
# the two arms at their tuned settings (docs/results.md); the learning rate comes from TrendConfig
ARMS = {
    "plain": ["model.think_steps=0"],
    "ebt": ["preset=ebt", "model.think_lr=0.5", "train.compile=true"],
}


@dataclass
class TrendConfig:
    corpus: str = "synthetic"
    out_dir: str = "out/trend"
    # training steps of block_size x batch_size characters, both arms, each with every seed
    budgets: List[int] = field(default_factory=lambda: [62, 125, 250, 500, 1000, 2000, 4000])
    # the plain arm alone at these budgets too: its curve up to EBT's counted FLOPs at the largest budget
    flops_budgets: List[int] = field(default_factory=lambda: [8000, 20000])
    seeds: List[int] = field(default_factory=lambda: [1337, 1338])
    block_size: int = 64
    batch_size: int = 16
    # each arm's peak learning rate (the cosine ends at a tenth of it)
    plain_lr: float = 4e-3
    ebt_lr: float = 2e-3
    # EBT's counted training FLOPs per step over the plain step's at this shape (bench.py: 4.92)
    flops_ratio: float = 4.92
    # the best loss possible on the scored windows (corpora.py corpus=synthetic window=64
    # max_tokens=102400 prints it), for each arm's excess; null: none
    optimum: Optional[float] = None
    # the gap slope is fitted again over the budgets of at least this many tokens (0: only over all)
    fit_from: int = 0
    workers: int = 2
    # more train.py overrides for every run (e.g. a smaller model)
    train_args: List[str] = field(default_factory=list)


ConfigStore.instance().store(name="trend_schema", node=TrendConfig)


def runs(cfg):
    """(arm, steps, seed) of every run: both arms at every budget, the plain arm also at flops_budgets."""
    both = [(arm, n, s) for n in cfg.budgets for s in cfg.seeds for arm in ARMS]
    return both + [("plain", n, s) for n in cfg.flops_budgets for s in cfg.seeds]


def train_and_score(cfg, arm, steps, seed, threads):
    """The run's eval.json, trained (or resumed) and scored first unless it is already there."""
    out = Path(cfg.out_dir).resolve() / cfg.corpus / f"{arm}_n{steps}_s{seed}"
    if (out / "eval.json").exists():
        return out / "eval.json"
    data, max_tokens = CORPORA[cfg.corpus]
    lr = cfg.plain_lr if arm == "plain" else cfg.ebt_lr
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TORCHINDUCTOR_COMPILE_THREADS": str(threads)}
    train = [
        "train.py", *data, f"data.block_size={cfg.block_size}", f"data.batch_size={cfg.batch_size}",
        *ARMS[arm], f"train.learning_rate={lr}", f"train.min_lr={lr / 10}", f"train.max_steps={steps}",
        f"train.warmup_steps={min(100, int(0.4 * steps))}", f"train.seed={seed}", f"out_dir={out}",
        *cfg.train_args, *(["train.resume=true"] if (out / "ckpt.pt").exists() else [])]
    commands = [] if (out / "final.pt").exists() else [train]  # a trained run is only scored
    commands.append(["eval.py", f"checkpoint={out / 'final.pt'}", f"max_tokens={max_tokens}",
                     "sweep=[0,2]", "samples=[1]", "epsilons=[]", "chain_steps=[]", "sweep_only=true"])
    for command in commands:
        print(f"{arm}, {steps} steps, seed {seed}: {' '.join(command)}", flush=True)
        done = subprocess.run([sys.executable, str(REPO / command[0]), *command[1:]], cwd=REPO, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
            raise UserError(f"{command[0]} for {arm}, {steps} steps, seed {seed} failed: {last}")
    return out / "eval.json"


def trend(cfg: TrendConfig):
    if cfg.corpus not in CORPORA:
        raise UserError(f"corpus must be one of {list(CORPORA)}, got {cfg.corpus!r}")
    if not cfg.seeds or not cfg.budgets or min(cfg.budgets + cfg.flops_budgets) < 1 or cfg.workers < 1:
        raise UserError("budgets and seeds must be non-empty, every budget >= 1 step, workers >= 1")
    # the cores this process may use (Linux counts a `taskset` limit), shared between the workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // cfg.workers)
    with ThreadPoolExecutor(cfg.workers) as pool:  # each worker waits on its own subprocesses
        evals = list(pool.map(lambda r: train_and_score(cfg, *r, threads), runs(cfg)))
    out = Path(cfg.out_dir).resolve() / cfg.corpus
    points = viz.trend_points([str(e) for e in evals])
    table = viz.trend_markdown(*viz.trend_rows(points), points, cfg.flops_ratio, cfg.optimum, cfg.fit_from)
    print(table)
    (out / "trend.md").write_text(table + "\n")
    (out / "trend.json").write_text(json.dumps({"config": vars(cfg), "points": points}, indent=2))
    written = [out / "trend.md", out / "trend.json"]
    plt = viz.pyplot()
    if plt is None:
        print("trend.png not written: matplotlib is missing (run with `uv run --extra plots trend.py`)")
    else:
        viz.plot_trend(plt, points, out / "trend.png", cfg.optimum)
        written.append(out / "trend.png")
    print("wrote " + ", ".join(map(str, written)))
    return points


@hydra.main(version_base="1.3", config_path="config", config_name="trend")
def main(cfg):
    run(trend, cfg)


if __name__ == "__main__":
    check_overrides("trend", sys.argv[1:])
    main()
