"""
Where thinking should pay: `uv run --extra plots sudoku_study.py` trains every arm that is missing
on Sudoku (sudoku.py's files), scores each on the test bins (in distribution and with fewer givens
than trained on), and writes to out_dir: study.json (every figure), study.md (the tables) and
study_givens.png, study_steps.png (solve rate against givens per arm, and against think steps K;
needs `--extra plots`). Resumable: a run continues from its ckpt.pt, a scored run is not run again.

Arms (grid.py), each at the learning rates `lrs` (one seed; the best by the solve rate on held-out
training puzzles gets the second seed):
  onepass       the transformer predicting every cell in one pass (cross-entropy per cell)
  onepass_deep  the same with as many counted FLOPs per training step as ebt (more layers)
  ebt           the bidirectional EBT, K think steps from noise (EBT's S1 recipe)
At test the ebt arm also thinks longer than trained (`steps`), from M noise starts keeping the
lowest energy per puzzle (self-verification, `starts`), and with the exact verifier picking among
the M (an oracle bound). Intervals: a bootstrap over puzzles.
"""

import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

import sudoku
from bench import counted_flops
from checkpoints import save_checkpoint
from engine import TrainConfig, get_lr
from grid import GridConfig, GridNet, loss, solve
from stats import bootstrap_means
from util import UserError, check_overrides, run
from viz import pyplot

ARMS = ("onepass", "onepass_deep", "ebt")
GRIDS = 2048  # candidate grids solved at once at test (memory)


@dataclass
class SudokuStudyConfig:
    out_dir: str = "out/sudoku"
    train_path: str = "sudoku_train.txt"
    test_path: str = "sudoku_test.txt"
    arms: List[str] = field(default_factory=lambda: list(ARMS))
    # four: with three (to 4e-3) every arm was best at the highest
    lrs: List[float] = field(default_factory=lambda: [1e-3, 2e-3, 4e-3, 8e-3])
    seeds: List[int] = field(default_factory=lambda: [1337, 1338])  # the second: the best lr only
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    deep_layers: int = 0  # onepass_deep's layers; 0: matched to ebt's counted FLOPs per step
    think_rule: str = "ebt"  # ebt | free_energy
    think_steps: int = 2  # K in training
    max_steps: int = 3000
    batch_size: int = 64
    n_val: int = 1000  # the last training puzzles, held out to choose the learning rate
    steps: List[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # K at test (ebt)
    starts: List[int] = field(default_factory=lambda: [1, 4, 16])  # M at test (ebt)
    workers: int = 2  # runs side by side, one thread each
    eval_seed: int = 1  # the noise starts at test


ConfigStore.instance().store(name="sudoku_study_schema", node=SudokuStudyConfig)


# --------------------------------------------------------------------------------------------------
# one run: train (resumably), then score


def grid_config(cfg, arm, layers=None):
    """The arm's network (grid.GridConfig) at the study's size."""
    return GridConfig(size=cfg_size(cfg), n_layer=layers or cfg.n_layer, n_head=cfg.n_head,
                      n_embd=cfg.n_embd, energy=arm == "ebt", think_rule=cfg.think_rule,
                      think_steps=cfg.think_steps)


def cfg_size(cfg):
    """The grid size of the training file: 6 or 9, from its first line."""
    with open(sudoku.resolve_path(cfg.train_path), "rb") as f:
        return round(((len(f.readline().rstrip(b"\n")) - 1) // 2) ** 0.5)


def optimizer(net, lr):
    """AdamW as train.py's: 2D weights decay, norms do not, and the learned step size has its own
    group at TrainConfig's think_lr_lr_mult times the learning rate (EBT's S1 recipe)."""
    step = [net.log_lr] if net.config.energy else []
    params = [p for p in net.parameters() if p.requires_grad and all(p is not s for s in step)]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
              {"params": step, "weight_decay": 0.0, "lr_mult": TrainConfig().think_lr_lr_mult}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))


def train(cfg, net, lr, seed, out, data):
    """Train net for max_steps on random batches of the training puzzles, resuming from
    out/ckpt.pt; a checkpoint every 250 steps and at the end."""
    opt, gen = optimizer(net, lr), torch.Generator().manual_seed(seed)
    schedule = TrainConfig(max_steps=cfg.max_steps, learning_rate=lr, min_lr=lr / 10)
    step, path = 0, out / "ckpt.pt"
    if path.exists():
        ckpt = torch.load(path, weights_only=True)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["batch_rng"])
        torch.set_rng_state(ckpt["rng"])
        step = ckpt["step"]
    givens, solutions = data
    net.train()
    while step < cfg.max_steps:
        for group in opt.param_groups:
            group["lr"] = get_lr(step, schedule) * group.get("lr_mult", 1.0)
        rows = torch.randint(len(givens), (cfg.batch_size,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss(net, givens[rows], solutions[rows]).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 250 == 0 or step == cfg.max_steps:
            save_checkpoint({"model": net.state_dict(), "optimizer": opt.state_dict(),
                             "batch_rng": gen.get_state(), "rng": torch.get_rng_state(),
                             "step": step}, path)


def score(net, givens, solutions, generator=None, **think):
    """Per puzzle: solved (1/0) and the share of its blank cells filled correctly. Solved in
    chunks of at most GRIDS candidate grids (puzzles x starts): thinking keeps each step's graph
    for dE/dp, and 2,000 puzzles x 16 starts at once took over 20 GB."""
    rows = max(1, GRIDS // think.get("starts", 1))
    grids = torch.cat([solve(net, part, generator=generator, **think)
                       for part in givens.split(rows)])
    blank = givens == 0
    cells = ((grids == solutions) & blank).sum(-1) / blank.sum(-1).clamp_min(1)
    return {"solved": (grids == solutions).all(-1).double(), "cells": cells.double()}


def interval(values):
    """Mean and 95% interval (a bootstrap over puzzles)."""
    means = bootstrap_means(values).sort().values
    return [values.double().mean().item(), means[24].item(), means[974].item()]


def scored(per_puzzle, bins):
    """{bin: {solve: [mean, lo, hi], cells: [...], puzzles: n}} of per-puzzle figures."""
    return {name: {"solve": interval(per_puzzle["solved"][rows]),
                   "cells": interval(per_puzzle["cells"][rows]), "puzzles": len(rows)}
            for name, rows in bins.items() if len(rows)}


def score_run(cfg, net, test, val, sweeps):
    """The run's figures: on the held-out training puzzles (val, to choose the learning rate) and
    on every test bin; for ebt with sweeps also against K (M = 1), against M (trained K), the
    longest K with the most starts, and the oracle."""
    net.eval()
    givens, solutions, bins = test
    gen = lambda: torch.Generator().manual_seed(cfg.eval_seed)  # noqa: E731  the same starts
    out = {"val": scored(score(net, *val, gen()), {"val": torch.arange(len(val[0]))})["val"],
           "test": scored(score(net, givens, solutions, gen()), bins)}
    if net.config.energy and sweeps:
        out["by_steps"] = {k: scored(score(net, givens, solutions, gen(), steps=k), bins)
                           for k in cfg.steps}
        out["by_starts"] = {m: scored(score(net, givens, solutions, gen(), starts=m), bins)
                            for m in cfg.starts}
        M, K = max(cfg.starts), max(cfg.steps)
        out["longest"] = scored(score(net, givens, solutions, gen(), steps=K, starts=M), bins)
        out["oracle"] = scored(score(net, givens, solutions, gen(), starts=M,
                                     verifier=sudoku.verify), bins)
    return out


def run_one(cfg_dict, arm, layers, lr, seed, sweeps=False):
    """Train (or resume: a trained run only loads) one run and score it, with the test-time sweeps
    if asked; writes out_dir/<name>/result.json."""
    torch.set_num_threads(1)
    cfg = SudokuStudyConfig(**cfg_dict)
    out = Path(cfg.out_dir) / run_name(arm, lr, seed)
    out.mkdir(parents=True, exist_ok=True)
    givens, solutions, _ = sudoku.load(cfg.train_path, unique=False)
    n = len(givens) - cfg.n_val
    test_givens, test_solutions, n_givens = sudoku.load(cfg.test_path, unique=False)
    size = round(givens.size(1) ** 0.5)
    bins = sudoku.by_bin(n_givens, sudoku.named(sudoku.TEST_BINS[size], sudoku.TRAIN_GIVENS[size]))
    torch.manual_seed(seed)
    net = GridNet(grid_config(cfg, arm, layers))
    t0 = time.time()
    train(cfg, net, lr, seed, out, (givens[:n], solutions[:n]))
    result = {"arm": arm, "lr": lr, "seed": seed, "layers": net.config.n_layer,
              "params": sum(p.numel() for p in net.parameters()),
              "train_seconds": round(time.time() - t0, 1),
              **score_run(cfg, net, (test_givens, test_solutions, bins),
                          (givens[n:], solutions[n:]), sweeps)}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def run_name(arm, lr, seed):
    return f"{arm}_lr{lr:g}_s{seed}"


# --------------------------------------------------------------------------------------------------
# the study


def step_flops(cfg, arm, layers=None):
    """Counted FLOPs of one training step of the arm (bench.counted_flops), on a batch of the
    training file."""
    givens, solutions, _ = sudoku.load(cfg.train_path, unique=False)
    torch.manual_seed(0)
    net = GridNet(grid_config(cfg, arm, layers))
    batch = givens[: cfg.batch_size], solutions[: cfg.batch_size]
    return counted_flops(lambda: loss(net, *batch).backward())


def solve_flops(cfg, layers):
    """Counted FLOPs to solve one puzzle at test (grid.solve on a batch of test puzzles, per
    puzzle): each one-pass arm, and ebt at the trained K with one start and at the longest K with
    the most starts."""
    givens = sudoku.load(cfg.test_path, unique=False)[0][: cfg.batch_size]
    out = {}
    for name, arm, n_layer, think in (
            ("onepass", "onepass", cfg.n_layer, {}), ("onepass_deep", "onepass", layers, {}),
            (f"ebt K={cfg.think_steps} M=1", "ebt", cfg.n_layer, {}),
            (f"ebt K={max(cfg.steps)} M={max(cfg.starts)}", "ebt", cfg.n_layer,
             {"steps": max(cfg.steps), "starts": max(cfg.starts)})):
        net = GridNet(grid_config(cfg, arm, n_layer)).eval()
        out[name] = counted_flops(lambda: solve(net, givens, **think)) / len(givens)
    return out


def matched_layers(cfg):
    """onepass_deep's layers: deep_layers, or the count whose counted FLOPs per step come nearest
    ebt's."""
    if cfg.deep_layers:
        return cfg.deep_layers, None
    target = step_flops(cfg, "ebt")
    per_layer = step_flops(cfg, "onepass", 2) - step_flops(cfg, "onepass", 1)
    base = step_flops(cfg, "onepass", 1) - per_layer
    layers = max(1, round((target - base) / per_layer))
    return layers, {"ebt": target, "onepass": step_flops(cfg, "onepass"),
                    "onepass_deep": base + layers * per_layer}


def run_all(cfg, jobs, sweeps=False):
    """Results of the runs (arm, layers, lr, seed), cfg.workers side by side, ebt's with the
    test-time sweeps if asked; done ones are read."""
    results, todo = {}, []
    for job in jobs:
        path = Path(cfg.out_dir) / run_name(job[0], *job[2:]) / "result.json"
        done = json.loads(path.read_text()) if path.exists() else None
        if done and (not sweeps or job[0] != "ebt" or "by_steps" in done):
            results[job] = done
        else:
            todo.append(job)
    if todo:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max(1, cfg.workers), mp_context=ctx) as pool:
            futures = {job: pool.submit(run_one, asdict(cfg), *job, sweeps) for job in todo}
            for job, future in futures.items():
                results[job] = future.result()
                print(f"{run_name(job[0], *job[2:])}: val solve {results[job]['val']['solve'][0]:.3f}")
    return results


def best_lr(results, arm):
    """The arm's learning rate with the best solve rate on the held-out training puzzles (then
    cell accuracy)."""
    rows = [r for r in results.values() if r["arm"] == arm]
    return max(rows, key=lambda r: (r["val"]["solve"][0], r["val"]["cells"][0]))["lr"]


def study(cfg: SudokuStudyConfig):
    """Every arm at every learning rate (first seed), the best again at the other seeds, and the
    test-time sweeps of ebt's best runs."""
    unknown = [a for a in cfg.arms if a not in ARMS]
    if unknown or not cfg.lrs or not cfg.seeds:
        raise UserError(f"arms must be among {', '.join(ARMS)} (got {unknown}), lrs and seeds "
                        "non-empty")
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    layers, flops = matched_layers(cfg)
    arm_layers = {arm: layers if arm == "onepass_deep" else cfg.n_layer for arm in cfg.arms}
    results = run_all(cfg, [(a, arm_layers[a], lr, cfg.seeds[0]) for a in cfg.arms for lr in cfg.lrs])
    best = {arm: best_lr(results, arm) for arm in cfg.arms}
    results.update(run_all(cfg, [(a, arm_layers[a], best[a], s) for a in cfg.arms
                                 for s in cfg.seeds], sweeps=True))
    report = {"config": OmegaConf.to_container(OmegaConf.structured(cfg)), "flops_per_step": flops,
              "flops_per_puzzle": solve_flops(cfg, layers), "deep_layers": layers, "best_lr": best,
              "runs": {run_name(a, *rest): r for (a, _, *rest), r in results.items()}}
    out = Path(cfg.out_dir)
    (out / "study.json").write_text(json.dumps(report, indent=1))
    (out / "study.md").write_text(markdown(report))
    print(markdown(report))
    plot(report, out)
    return report


# --------------------------------------------------------------------------------------------------
# the report


def best_runs(report):
    """{arm: [results of its best learning rate, one per seed]}."""
    out = {}
    for r in report["runs"].values():
        if r["lr"] == report["best_lr"][r["arm"]]:
            out.setdefault(r["arm"], []).append(r)
    return out


def rows(report):
    """(name, [per-seed {bin: figures}]) for every arm and, for ebt, its test-time variants."""
    out = []
    for arm, runs in best_runs(report).items():
        out.append((f"{arm} (lr {report['best_lr'][arm]:g})", [r["test"] for r in runs]))
        if arm == "ebt":
            K, M = max(report["config"]["steps"]), max(report["config"]["starts"])
            out.append((f"ebt, K={K}, M={M} starts (lowest energy)", [r["longest"] for r in runs]))
            out.append((f"ebt, M={M} starts, the exact verifier picks (oracle)",
                        [r["oracle"] for r in runs]))
    return out


def cell(per_seed, name, key):
    """'mean (seed values)' of a figure over the seeds."""
    values = [s[name][key][0] for s in per_seed if name in s]
    mean = sum(values) / len(values)
    return f"{mean:.3f} ({', '.join(f'{v:.3f}' for v in values)})"


def markdown(report):
    """The tables: solve rate and cell accuracy per bin for every arm; ebt against K and M."""
    bins = list(next(iter(report["runs"].values()))["test"])
    head = "| arm | " + " | ".join(bins) + " |\n|---|" + "---|" * len(bins) + "\n"
    train = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in (report["flops_per_step"] or {}).items())
    test = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in report["flops_per_puzzle"].items())
    out = [f"onepass_deep: {report['deep_layers']} layers. Counted GFLOP per training step: "
           f"{train or 'not counted (deep_layers set)'}; MFLOP to solve a puzzle: {test}\n"]
    for key, title in (("solve", "solve rate"), ("cells", "cell accuracy (blank cells)")):
        out.append(f"\n{title}, mean of the seeds (each seed):\n\n" + head)
        for name, per_seed in rows(report):
            out.append(f"| {name} | " + " | ".join(cell(per_seed, b, key) for b in bins) + " |\n")
    ebt = best_runs(report).get("ebt", [])
    for part, label in (("by_steps", "K"), ("by_starts", "M")):
        if ebt:
            out.append(f"\nebt solve rate against {label} at test:\n\n" + head.replace("arm", label))
            for value in ebt[0][part]:
                out.append(f"| {value} | " + " | ".join(
                    cell([r[part][value] for r in ebt], b, "solve") for b in bins) + " |\n")
    return "".join(out)


def plot(report, out):
    """study_givens.png (solve rate per bin, one line per row of the table) and study_steps.png
    (ebt's solve rate against K, one line per bin): the mean of the seeds, the seeds' range
    shaded (between seeds the solve rate moves far more than a bootstrap over puzzles says)."""
    plt = pyplot()
    if plt is None:
        print("no matplotlib: plots skipped (uv run --extra plots sudoku_study.py draws them)")
        return
    bins = list(next(iter(report["runs"].values()))["test"])

    def draw(ax, xs, per_x, label):  # per_x: for each x, the seeds' solve rates
        ax.plot(xs, [sum(v) / len(v) for v in per_x], marker="o", label=label)
        ax.fill_between(xs, [min(v) for v in per_x], [max(v) for v in per_x], alpha=0.15)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, per_seed in rows(report):
        draw(ax, bins, [[s[b]["solve"][0] for s in per_seed] for b in bins], name)
    ax.set(xlabel="test bin (givens)", ylabel="puzzles solved", ylim=(0, 1))
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "study_givens.png", dpi=120)
    ebt = best_runs(report).get("ebt")
    if ebt:
        fig, ax = plt.subplots(figsize=(6, 4))
        ks = list(ebt[0]["by_steps"])
        for b in bins:
            draw(ax, [int(k) for k in ks], [[r["by_steps"][k][b]["solve"][0] for r in ebt]
                                            for k in ks], b)
        ax.set(xscale="log", xlabel="think steps K at test (trained: "
               f"{report['config']['think_steps']})", ylabel="puzzles solved", ylim=(0, 1))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "study_steps.png", dpi=120)


@hydra.main(version_base="1.3", config_path="config", config_name="sudoku_study")
def main(cfg):
    run(study, cfg)


if __name__ == "__main__":
    check_overrides("sudoku_study", sys.argv[1:])
    main()
