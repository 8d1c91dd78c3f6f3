"""
Does thinking help more out of distribution? `uv run --extra plots study.py` trains every arm that
is missing on balanced brackets (dyck.py: data.data_path=dyck.txt), scores each on held-out tasks in
depth and distance bins (dyck.score), and writes to out_dir: study.json (every figure), study.md
(the tables) and study.png (exact match against nesting depth, one line per arm, 95% intervals
shaded; needs `--extra plots`).

Arms: the plain transformer (greedy, and beam search: test-time compute spent the usual way), a
deeper plain transformer, the default linear energy (its greedy output cannot change with thinking:
the K sweep shows it), and EBT's S1 and S2 recipes (K below, at and beyond the trained K;
self-verification with M starts ranked by energy; the exact verifier), each with every seed.
"""

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import hydra
import torch
from hydra.core.config_store import ConfigStore

import dyck
from checkpoints import load_model
from data import REPO, load_text
from util import UserError, check_overrides, pick_device, run
from viz import pyplot

# what each arm adds to the training overrides of its size (StudyConfig)
ARMS = {
    "plain": ["model.think_steps=0"],
    "plain_deep": ["model.think_steps=0"],  # and model.n_layer=deep_layers
    "linear": [],
    "ebt": ["preset=ebt"],
    "ebt_s2": ["preset=ebt_s2"],
}
# the plot's x axis, by nesting depth
DEPTH_BINS = ["in_distribution", "depth_just_past", "depth_far_past"]


@dataclass
class StudyConfig:
    out_dir: str = "out/study"
    arms: List[str] = field(default_factory=lambda: list(ARMS))
    seeds: List[int] = field(default_factory=lambda: [1337, 1338])
    # every arm's size (plain_deep's layers: deep_layers); block 64 holds every task with its
    # newline before
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    block_size: int = 64
    batch_size: int = 16
    max_steps: int = 1500
    # plain_deep: as many counted FLOPs per training step as the ebt arm (bench.py at this shape on
    # dyck.txt: 10 layers 2.35 GFLOP per step, ebt 2.29, 2 layers 0.47)
    deep_layers: int = 10
    tasks: int = 200  # held-out tasks per bin
    eval_seed: int = 1  # the tasks and the noise starts
    # K, for the arms that think
    sweep: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 8])
    # M at the trained K, for the EBT arms
    samples: List[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    beams: List[int] = field(default_factory=lambda: [1, 4, 16])  # beam widths, for the plain arms
    device: str = "auto"


ConfigStore.instance().store(name="study_schema", node=StudyConfig)


def train_arm(cfg, arm, seed):
    """The arm's final.pt, trained first (train.py in a subprocess) unless it is already there."""
    out = Path(cfg.out_dir).resolve() / f"{arm}_seed{seed}"  # absolute: train.py runs in the repo
    if not (out / "final.pt").exists():
        layers = cfg.deep_layers if arm == "plain_deep" else cfg.n_layer
        size = [f"model.n_layer={layers}", f"model.n_head={cfg.n_head}",
                f"model.n_embd={cfg.n_embd}",
                f"data.block_size={cfg.block_size}", f"data.batch_size={cfg.batch_size}",
                f"train.max_steps={cfg.max_steps}"]
        cmd = [sys.executable, str(REPO / "train.py"), "data.data_path=dyck.txt", *size, *ARMS[arm],
               f"train.seed={seed}", f"out_dir={out}"]
        print(f"training {arm}, seed {seed}: {' '.join(cmd[2:])}", flush=True)
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
            raise UserError(f"training {arm} (seed {seed}) failed: {last}")
    return out / "final.pt"


def methods(cfg, model):
    """(label, dyck.score options) for this arm: thinking arms sweep K (and EBT arms M, ranked by
    energy) and read the exact verifier; plain arms search beams."""
    m = model.config
    if m.think_steps == 0:  # greedy (width 1) always: it is the arm's own prediction
        return [("greedy" if w == 1 else f"beam {w}",
                 {"beam": w}) for w in sorted(set(cfg.beams) | {1})]
    out = [(f"K={k}", {"think_steps": k}) for k in sorted(set(cfg.sweep) | {m.think_steps})]
    if m.think_rule == "ebt":
        out += [(f"K={m.think_steps}, M={s}", {"think_steps": m.think_steps,
                                               "starts": s}) for s in cfg.samples if s > 1]
    return out + [("exact verifier", {"exact": True})]


def evaluate_arm(cfg, path, tasks, device):
    """{"think_steps": the trained K, "train": train.py's last metrics (step, time_s, val_loss),
    "methods": {label: {bin: dyck.score}}} for one trained arm; the noise starts are seeded per
    method."""
    model, vocab, _ = load_model(path, device)
    if set(vocab.chars) != set(dyck.PAIRS) | set(dyck.PAIRS.values()) | {dyck.SEP, "\n"}:
        raise UserError(f"{path} was not trained on dyck.txt: delete it so that study.py retrains "
                        f"it")
    results = {}
    for label, options in methods(cfg, model):
        torch.manual_seed(cfg.eval_seed)
        results[label] = {name: dyck.score(model, vocab, bin_tasks, **options) for name,
                          bin_tasks in tasks.items()}
    last = json.loads((Path(path).parent / "metrics.jsonl").read_text().splitlines()[-1])
    return {"think_steps": model.config.think_steps,
            "train": {k: last[k] for k in ("step", "time_s", "val_loss")},
            "methods": results}


def markdown(cfg, results):
    """The mean over seeds per arm and method, then one row per arm, seed and method: exact match
    [95% interval] per bin, and the compute per task."""
    bins = list(dyck.BINS)
    out = ["# Balanced brackets: does thinking help more out of distribution?", "",
           f"{cfg.tasks} held-out tasks per bin (dyck.eval_sets, seed {cfg.eval_seed}); exact "
           f"match of the whole "
           "completion and its newline; compute per task: transformer passes, think steps (both in "
           "distribution)", "",
           f"## mean over seeds {list(cfg.seeds)} [lowest, highest seed]", "",
           "| arm | method | " + " | ".join(bins) + " | passes | think steps |",
           "|---" * (len(bins) + 4) + "|"]
    for arm, by_seed in results.items():
        runs = list(by_seed.values())
        for label, first in runs[0]["methods"].items():
            cells = []
            for b in bins:
                seeds = [r["methods"][label][b]["exact_match"]["mean"] for r in runs]
                cells.append(f"{sum(seeds) / len(seeds):.3f} [{min(seeds):.3f}, {max(seeds):.3f}]")
            b0 = first[bins[0]]
            out.append(f"| {arm} | {label} | " + " | ".join(cells) +
                       f" | {b0['passes_per_task']:.1f} | {b0['think_steps_per_task']:.1f} |")
    out += ["", "## each seed [95% bootstrap interval over tasks]", "",
            "| arm | seed | method | " + " | ".join(bins) + " | passes | think steps |",
            "|---" * (len(bins) + 5) + "|"]
    for arm, by_seed in results.items():
        for seed, r in by_seed.items():
            for label, by_bin in r["methods"].items():
                cells = [f"{s['exact_match']['mean']:.3f} [{s['exact_match']['lo']:.2f}, "
                         f"{s['exact_match']['hi']:.2f}]"
                         for s in by_bin.values()]
                first = next(iter(by_bin.values()))
                out.append(f"| {arm} | {seed} | {label} | " + " | ".join(cells) +
                           f" | {first['passes_per_task']:.1f} | "
                           f"{first['think_steps_per_task']:.1f} |")
    return "\n".join(out) + "\n"


def primary(r):
    """An arm's own prediction: greedy for a plain arm, thinking at the trained K for the others."""
    K = r["think_steps"]
    return "greedy" if K == 0 else f"K={K}"


def plot(results, path):
    """Exact match against the depth bins, one line per arm (its own prediction, the mean over
    seeds), shaded from the lowest to the highest seed's 95% interval."""
    plt = pyplot()
    if plt is None:
        print("study.png not written: matplotlib is missing (run with `uv run --extra plots "
              "study.py`)")
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(DEPTH_BINS))
    for arm, by_seed in results.items():
        rows = [r["methods"][primary(r)] for r in by_seed.values()]
        label = f"{arm} ({primary(next(iter(by_seed.values())))})"
        mean = [sum(r[b]["exact_match"]["mean"] for r in rows) / len(rows) for b in DEPTH_BINS]
        lo = [min(r[b]["exact_match"]["lo"] for r in rows) for b in DEPTH_BINS]
        hi = [max(r[b]["exact_match"]["hi"] for r in rows) for b in DEPTH_BINS]
        ax.plot(x, mean, marker="o", label=label)
        ax.fill_between(x, lo, hi, alpha=0.2)
    ax.set_xticks(list(x),
                  [f"depth {dyck.BINS[b][0][0]}-{dyck.BINS[b][0][1]}\n{b}" for b in DEPTH_BINS])
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1)
    ax.set_title("closing brackets past the training depth")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def study(cfg: StudyConfig):
    unknown = [a for a in cfg.arms if a not in ARMS]
    if unknown or not cfg.arms or not cfg.seeds or cfg.tasks < 1 or cfg.deep_layers < 1:
        raise UserError(f"arms must be a non-empty list of {list(ARMS)} (got {cfg.arms}); seeds "
                        f"non-empty; "
                        "tasks and deep_layers >= 1")
    if min(cfg.sweep, default=0) < 0 or min(cfg.samples + cfg.beams, default=1) < 1:
        raise UserError("sweep needs K >= 0, samples and beams >= 1")
    device = pick_device(cfg.device, key="device")
    train_prefixes = {line.split(dyck.SEP)[0] for line in load_text("dyck.txt").splitlines()}
    tasks = dyck.eval_sets(cfg.eval_seed, cfg.tasks, exclude=train_prefixes)
    results = {arm: {seed: evaluate_arm(cfg, train_arm(cfg, arm, seed), tasks,
                                        device) for seed in cfg.seeds}
               for arm in cfg.arms}
    out = Path(cfg.out_dir).resolve()
    (out / "study.json").write_text(json.dumps({"config": vars(cfg), "results": results}, indent=2))
    (out / "study.md").write_text(markdown(cfg, results))
    print(markdown(cfg, results))
    plotted = plot(results, out / "study.png")
    png = f", {out / 'study.png'}" if plotted else ""
    print(f"wrote {out / 'study.json'}, {out / 'study.md'}" + png)
    return results


@hydra.main(version_base="1.3", config_path="config", config_name="study")
def main(cfg):
    run(study, cfg)


if __name__ == "__main__":
    check_overrides("study", sys.argv[1:])
    main()
