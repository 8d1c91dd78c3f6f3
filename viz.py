"""
Plots of what thinking does, and eval.json as the markdown report that eval.py prints:
`uv run --extra plots viz.py checkpoint=out_ebt/final.pt evals='[out_ebt/eval.json]'`. matplotlib is
an optional extra (`--extra plots`), so the core install stays small. Writes PNGs to out_dir:

  think_sweep.png     val loss against think steps, one line per eval.json (from `uv run eval.py`)
  think_descent.png   the free energy F(z_k) along the think steps at a few val positions
                      (checkpoint)
  candidates.png      the candidate distribution p before and after thinking at one val position
                      (checkpoint)
  chains.png          the contrastive chains' KL to the model after k steps (eval.json files with a
                      chains part)
  energy_gap.png      E_neg - E_pos over training, one line per contrastive run (`metrics`:
                      metrics.jsonl files)
  trend.png           val loss and the gap between two arms against training tokens (log axis),
                      one point per run (`trend`: eval.json files of runs at several budgets and
                      seeds); the table of it is printed
"""

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore

from checkpoints import load_checkpoint, load_model
from data import load_text, val_text
from ebm import free_energy, make_energy, observe, system2_logits
from util import UserError, check_overrides, pick_device, run


@dataclass
class VizConfig:
    # for think_descent.png and candidates.png (null: skip)
    checkpoint: Optional[str] = "out_ebt/final.pt"
    # eval.json files for think_sweep.png and chains.png
    evals: List[str] = field(default_factory=list)
    # metrics.jsonl files of contrastive runs for energy_gap.png
    metrics: List[str] = field(default_factory=list)
    # eval.json files of two arms (the first file's arm is the baseline) at several budgets for
    # trend.png
    trend: List[str] = field(default_factory=list)
    # the second arm's counted training FLOPs per step over the first's (bench.py's flops_ratio):
    # the trend table reads the first arm's loss at that many times the second's tokens off the
    # first arm's curve (0: no such column)
    trend_flops_ratio: float = 0.0
    # the best loss possible on the scored text (e.g. corpora.py's optimum under eval.py's windows):
    # the trend table gives each arm's excess over it (null: no such column)
    trend_optimum: Optional[float] = None
    # the gap slope is also fitted over the budgets of at least this many tokens alone (0: only over
    # every budget), e.g. where both arms are past their first steps' warm-up
    trend_fit_from: int = 0
    out_dir: str = "assets"
    # steps drawn in think_descent.png; candidates.png shows the model's think_steps
    think_steps: int = 16
    positions: int = 6  # val positions in think_descent.png
    top: int = 12  # candidates shown in candidates.png
    seed: int = 1337  # which val positions
    device: str = "auto"


ConfigStore.instance().store(name="viz_schema", node=VizConfig)


def save(plt, fig, ax, path, xlabel, ylabel, title):
    """Label the axes, add the legend and write the figure to path."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(plt, results, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        rows = r["think_sweep"]
        run_name = Path(r["checkpoint"]).parent.name
        label = f"{r['energy']} (trained K={r['model_think_steps']}, {run_name})"
        ax.plot([row["think_steps"] for row in rows], [row["loss"] for row in rows], marker="o",
                label=label)
    ax.set_xscale("symlog", linthresh=1)
    ks = sorted({row["think_steps"] for r in results for row in r["think_sweep"]})
    ax.set_xticks(ks, [str(k) for k in ks])
    save(plt, fig, ax, path, "think steps K", "val loss (nats)", "val loss against think steps")


def plot_chains(plt, results, path):
    """KL(chains after k steps || softmax(-E / T)) against k, one line per eval.json and kind of
    start."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        c = r["chains"]
        for kind in ("cd", "pcd", "fast_pcd"):
            if kind in c["rows"][0]:
                label = f"{kind}, {Path(r['checkpoint']).parent.name} (step {c['step_size']:g})"
                ax.plot([row["steps"] for row in c["rows"]], [row[kind]["kl"] for row in c["rows"]],
                        marker="o",
                        label=label)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("symlog", linthresh=1e-3)
    save(plt, fig, ax, path, "chain steps k", "mean KL(q_k || softmax(-E/T)) (nats)",
         "how close the contrastive chains are to the model")


def plot_energy_gap(plt, metrics, path):
    """E_neg - E_pos (training batches, mean since the previous eval) against the step, one line per
    run."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for file in metrics:
        rows = [json.loads(line) for line in Path(file).read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "energy_gap" in r]
        if not rows:
            raise UserError(f"{file} has no energy_gap: it comes from a run with "
                            f"model.use_contrastive=true")
        ax.plot([r["step"] for r in rows], [r["energy_gap"] for r in rows], marker="o",
                label=Path(file).parent.name)
    ax.axhline(0.0, color="gray", lw=0.5)
    save(plt, fig, ax, path, "training step", "E_neg - E_pos",
         "energy of the negatives above that of the data")


def arm_name(m):
    """A trend arm's name from its checkpoint's model config: plain, EBT, or energy and rule."""
    k = m["think_steps"]
    if k == 0:
        return "plain transformer"
    if m["energy"] == "transformer" and m["think_rule"] == "ebt":
        return f"EBT, K={k}"
    return f"{m['energy']} energy, {m['think_rule']} rule, K={k}"


def trend_points(evals):
    """One point per eval.json: its arm (named from the checkpoint's config), the tokens it trained
    on (steps x batch_size x block_size x grad_accum_steps x processes), seed, and the val loss and
    standard error of the prediction at the trained K."""
    points = []
    for file in evals:
        r = json.loads(Path(file).read_text())
        ckpt = load_checkpoint(r["checkpoint"])
        m, d, t = ckpt["config"]["model"], ckpt["config"]["data"], ckpt["config"]["train"]
        row = next(x for x in r["think_sweep"] if x["think_steps"] == r["model_think_steps"])
        tokens = (ckpt["step"] * d["batch_size"] * d["block_size"] * t["grad_accum_steps"]
                  * ckpt.get("processes", 1))  # checkpoints before "processes": one process
        points.append({"arm": arm_name(m), "tokens": tokens, "steps": ckpt["step"], "seed": t["seed"],
                       "loss": row["loss"], "se": row["se"], "epochs": tokens / train_chars(d)})
    if len({p["arm"] for p in points}) != 2:
        raise UserError(f"trend needs eval.json files of exactly two arms, got "
                        f"{sorted({p['arm'] for p in points})}")
    return points


def train_chars(data_cfg):
    """The characters of a run's training split: all of data_path with a val_path of its own, else
    its first 90% (checkpoints from before val_path have no such key)."""
    n = len(load_text(data_cfg["data_path"]))
    return n if data_cfg.get("val_path") else int(0.9 * n)


def gap_slope(rows):
    """The gap's least-squares slope against log10 tokens over every seed's gap, in nats per decade
    of tokens, and its standard error (from the residuals; n - 2 degrees of freedom)."""
    xs = [math.log10(r["tokens"]) for r in rows for _ in r["gaps"]]
    ys = [g for r in rows for g in r["gaps"]]
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if n < 3 or sxx == 0:
        return float("nan"), float("nan")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    resid = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys))
    return slope, math.sqrt(resid / (n - 2) / sxx)


def trend_rows(points):
    """Per budget both arms hold: each arm's losses by seed, and the gap (second arm minus the
    first) per seed both arms share, its mean, and one standard error from eval.py's window
    bootstraps (unpaired: conservative, as both arms are scored on the same windows)."""
    base, other = dict.fromkeys(p["arm"] for p in points)
    rows = []
    for tokens in sorted({p["tokens"] for p in points}):
        a = {p["seed"]: p for p in points if p["arm"] == base and p["tokens"] == tokens}
        b = {p["seed"]: p for p in points if p["arm"] == other and p["tokens"] == tokens}
        seeds = sorted(a.keys() & b.keys())
        if not seeds:
            continue
        gaps = [b[s]["loss"] - a[s]["loss"] for s in seeds]
        se = math.sqrt(sum(a[s]["se"] ** 2 + b[s]["se"] ** 2 for s in seeds)) / len(seeds)
        rows.append({"tokens": tokens, "steps": a[seeds[0]]["steps"], "seeds": seeds,
                     "epochs": a[seeds[0]]["epochs"],
                     base: [a[s]["loss"] for s in seeds], other: [b[s]["loss"] for s in seeds],
                     "gaps": gaps, "gap": sum(gaps) / len(gaps), "gap_se": se})
    return base, other, rows


def mean_curve(points, arm):
    """The arm's mean loss over seeds at each of its budgets, [(tokens, loss)] by tokens."""
    budgets = sorted({p["tokens"] for p in points if p["arm"] == arm})
    return [(x, statistics.mean(p["loss"] for p in points if p["arm"] == arm and p["tokens"] == x))
            for x in budgets]


def read_off(points, arm, tokens):
    """The arm's mean loss at `tokens`, interpolated linearly in log tokens between its two nearest
    budgets (None outside the budgets it was trained at: no extrapolation)."""
    curve = mean_curve(points, arm)
    # each budget with the next; the last with itself (a single budget, or tokens at the last)
    for (lo, a), (hi, b) in zip(curve, curve[1:] + curve[-1:]):
        if lo <= tokens <= hi:
            w = 0.0 if hi == lo else math.log(tokens / lo) / math.log(hi / lo)
            return (1 - w) * a + w * b
    return None


def tokens_for(points, arm, loss):
    """The tokens at which the arm's mean curve (linear in log tokens between budgets) first reaches
    `loss` (None where it never does within its budgets, or starts below it)."""
    curve = mean_curve(points, arm)
    for (lo, a), (hi, b) in zip(curve, curve[1:]):
        if a >= loss >= b and a > b:
            return lo * (hi / lo) ** ((a - loss) / (a - b))
    return None


def trend_markdown(base, other, rows, points=(), flops_ratio=0.0, optimum=None, fit_from=0):
    """trend_rows as a markdown table, one row per budget, with the tokens the base arm needs to reach
    the other arm's loss (as a multiple of the budget); with flops_ratio, the base arm at the
    other's counted FLOPs (read off its curve) and the other arm's gap to it; with optimum, each
    arm's mean excess over it; then the gap's slope against log tokens, over every budget and,
    with fit_from, over the budgets of at least fit_from tokens."""
    cells = [[f"{r['tokens']:,}", f"{r['epochs']:.2f}", r["steps"], len(r["seeds"]),
              ", ".join(f"{x:.4f}" for x in r[base]), ", ".join(f"{x:.4f}" for x in r[other]),
              ", ".join(f"{g:+.4f}" for g in r["gaps"]), f"{r['gap']:+.4f} ± {r['gap_se']:.4f}"]
             for r in rows]
    head = ["tokens", "epochs", "steps", "seeds", base, other, "gap per seed", "gap (mean ± se)",
            f"{base}'s tokens for {other}'s loss"]
    for r, row in zip(rows, cells):  # the other arm's data efficiency: < 1x where it needs more tokens
        at = tokens_for(points, base, statistics.mean(r[other]))
        row.append("(beyond its budgets)" if at is None else f"{at / r['tokens']:.2f}x")
    if flops_ratio:
        head += [f"{base} at {other}'s FLOPs", "gap at equal FLOPs"]
        for r, row in zip(rows, cells):
            at = read_off(points, base, r["tokens"] * flops_ratio)
            row += ["(beyond its budgets)", ""] if at is None else [
                f"{at:.4f}", f"{statistics.mean(r[other]) - at:+.4f}"]
    if optimum is not None:
        head += [f"{base} excess", f"{other} excess"]
        for r, row in zip(rows, cells):
            row += [f"{statistics.mean(r[arm]) - optimum:+.4f}" for arm in (base, other)]
    fits = [("every budget", rows)]
    if fit_from:
        fits.append((f"the budgets of {fit_from:,} tokens and more",
                      [r for r in rows if r["tokens"] >= fit_from]))
    lines = [""]
    for name, chosen in fits:
        slope, se = gap_slope(chosen)
        lines.append(f"gap slope over {name}: {slope:+.4f} ± {se:.4f} nats per decade of tokens "
                     "(least squares over each seed's gap against log10 tokens, ± one standard error)")
    return "\n".join(table(None, head, cells) + lines)


def plot_trend(plt, points, path, optimum=None):
    """trend.png: val loss per run and arm (left), the gap per seed and its mean ± one standard
    error (right), against training tokens on a log axis."""
    base, other, rows = trend_rows(points)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for arm in (base, other):
        mine = [p for p in points if p["arm"] == arm]
        left.scatter([p["tokens"] for p in mine], [p["loss"] for p in mine], s=12)
        own = sorted({p["tokens"] for p in mine})  # this arm's budgets
        means = [sum(p["loss"] for p in mine if p["tokens"] == x)
                 / sum(p["tokens"] == x for p in mine) for x in own]
        left.plot(own, means, marker="o", label=arm)
    for r in rows:
        right.scatter([r["tokens"]] * len(r["gaps"]), r["gaps"], s=12, color="gray")
    right.errorbar([r["tokens"] for r in rows], [r["gap"] for r in rows],
                   yerr=[r["gap_se"] for r in rows], marker="o", capsize=3,
                   label=f"{other} minus {base}")
    right.axhline(0.0, color="gray", lw=0.5)
    epochs = {p["tokens"]: p["epochs"] for p in points}
    for ax in (left, right):  # a tick at every budget, in millions, with its epochs
        ax.set_xscale("log")
        ax.set_xticks(sorted(epochs), [f"{x / 1e6:.3g}M\n{epochs[x]:.2g} ep" for x in sorted(epochs)],
                      fontsize=7)
        ax.minorticks_off()
    left.set_xlabel("training tokens")
    left.set_ylabel("val loss (nats per character)")
    if optimum is not None:
        left.axhline(optimum, color="gray", lw=0.8, ls="--", label="optimum")
    left.legend(fontsize=7)
    save(plt, fig, right, path, "training tokens", "gap in val loss (nats)",
         "the gap against training tokens")


def pyplot():
    """matplotlib's pyplot drawing to files, or None where the plots extra is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


@torch.no_grad()
def descend(model, x, steps):
    """Logits z_0..z_K (K + 1, T, V) and free energies F(z_k) (K + 1, T) along the think loop on
    window x."""
    h, e, caches = observe(model, x)
    energy = make_energy(model, h, e, caches)
    zs = system2_logits(model, e, energy, steps)
    free = torch.stack([free_energy(z, energy, model.config.entropy_weight)[1] for z in zs])
    return torch.stack(zs)[:, 0], free[:, 0]


def plot_descent(plt, free, x, y, picks, vocab, energy, path):
    """F(z_k) - F(z_0) along the think loop for the positions picks of window x (targets y)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in picks.tolist():
        context = vocab.decode(x[max(0, t - 8) : t + 1].tolist())
        label = f"t={t}: {context!r} -> {vocab.chars[int(y[t])]!r}"
        ax.plot(range(free.size(0)), free[:, t] - free[0, t], marker=".", label=label)
    save(plt, fig, ax, path, "think step k", "F(z_k) - F(z_0)",
         f"free energy along the think loop ({energy} energy)")


def plot_candidates(plt, z0, zk, k, x, y, t, vocab, top, path):
    """The top candidates for position t of window x: System 1's probabilities beside those after k
    steps."""
    p0, pk = z0.softmax(-1), zk.softmax(-1)
    best = torch.maximum(p0, pk).topk(top).indices
    names = [{" ": "space", "\n": "\\n"}.get(vocab.chars[i], vocab.chars[i]) for i in best.tolist()]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([i - 0.2 for i in range(top)], p0[best], width=0.4, label="System 1 (p_0)")
    ax.bar([i + 0.2 for i in range(top)], pk[best], width=0.4, label=f"after K={k} steps")
    ax.set_xticks(range(top), names)
    ax.set_title(f"candidates for the next char after "
                 f"{vocab.decode(x[max(0, t - 16) : t + 1].tolist())!r} "
                 f"(true: {vocab.chars[int(y[t])]!r})", fontsize=9)
    ax.set_ylabel("probability")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# eval.json as markdown: one table per part (eval.py prints it; eval.json holds the figures)


def eval_markdown(r):
    """The report of an eval.json (or eval_product.json): what eval.py prints after scoring."""
    return product_markdown(r) if "product" in r else checkpoint_markdown(r)


def num(x, nd=4):
    return f"{x:.{nd}f}"


def loss_se(s):
    """A summary's loss and its standard error."""
    return f"{num(s['loss'])} ± {s['se']:.4f}"


def delta(s):
    """A summary's paired difference and its standard error."""
    return f"{s['delta']:+.4f} ± {s['delta_se']:.4f}"


def table(title, head, rows):
    """Markdown lines of a table: a blank line and a heading when titled, the header cells, a
    separator and one line per row of cells (an empty cell is one space)."""
    lines = ["", f"## {title}"] if title else []
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in rows:
        lines.append("|" + "|".join(f" {c} " if c != "" else " " for c in row) + "|")
    return lines


def product_markdown(r):
    """The product of experts' report: one row per member, the product last."""
    vs = r["product"][0]["vs"]
    rows = [[row["member"], row["think_steps"], loss_se(row["s1"]), loss_se(row["s2"]),
             delta(row["s2"]), f"{row['temperature']:.3f}", num(row["at_temperature"]["loss"]),
             delta(row["at_temperature"])] for row in r["product"]]
    head = ["member", "think_steps", "System 1", "thinking", f"vs {vs}", "best T",
            "thinking at best T", f"vs {vs} at its best T"]
    return "\n".join([
        f"# eval of a product of experts: {', '.join(r['experts'])} at weights "
        f"{r['expert_weights']}",
        f"E(x, v) = sum_i w_i E_i(x, v); System 1 z_0 = -sum_i w_i e_i / T and thinking "
        f"(K={r['think_steps']}) with the first expert's T and options; {r['tokens']} val tokens "
        f"reported in windows of {r['block_size']} (the smallest block_size), {r['tune_tokens']} "
        f"for tuning temperatures; device {r['device']}; losses in nats (uniform: "
        f"{r['uniform_loss']:.4f}); ± is one bootstrap standard error ({r['bootstrap_resamples']} "
        f"resamples of {r['report_windows']} windows); only the loss parts of eval.py are run for "
        "a product", "", *table(None, head, rows)])


def checkpoint_markdown(r):
    """One checkpoint's report: a header saying what the figures are, then a section per part."""
    return "\n".join([
        f"# eval of {r['checkpoint']}",
        f"energy {r['energy']}, trained with think_steps {r['model_think_steps']}; {r['tokens']} "
        f"val tokens reported, {r['tune_tokens']} for tuning temperatures; device {r['device']}; "
        f"losses in nats (uniform: {r['uniform_loss']:.4f}); ± is one standard error of the loss "
        f"or of the paired difference, from {r['bootstrap_resamples']} bootstrap resamples of "
        f"whole windows of block_size characters ({r['report_windows']} report windows), since "
        "neighbouring characters are correlated",
        *sweep_markdown(r), *(verification_markdown(r) + uncertainty_markdown(r) + ood_markdown(r)
                               if "ood" in r else []), *chains_markdown(r)])


def sweep_markdown(r):
    """The think sweep, and the temperature-matched control."""
    vs = r["think_sweep"][0]["at_temperature"]["vs_think_steps"]
    sweep = [[row["think_steps"], loss_se(row), num(row["bits_per_char"]), delta(row),
              f"{row['us_per_token']:.1f}", f"{row['temperature']:.3f}",
              num(row["at_temperature"]["loss"]), delta(row["at_temperature"]),
              num(row["loss_all_windows"])] for row in r["think_sweep"]]
    sweep_table = table("think sweep (each K also at its own best temperature, chosen on the tune "
                        "slice)", ["think_steps", "val loss", "bits/char", "vs K=0", "µs/token",
                                   "best T", "val loss at best T", f"vs K={vs} at its best T",
                                   "all windows"], sweep)
    if "temperature_control" not in r:  # eval.py sweep_only=true
        return sweep_table
    t = r["temperature_control"]
    control = [["System 1", 1, num(t["s1"]["loss"]), ""],
               ["System 1", f"{t['s1_temperature']:.3f}", num(t["s1_at_temperature"]["loss"]),
                delta(t["s1_at_temperature"])],
               ["thinking", 1, num(t["s2"]["loss"]), delta(t["s2"])],
               ["thinking", f"{t['s2_temperature']:.3f}", num(t["s2_at_temperature"]["loss"]),
                f"{delta(t['s2_at_temperature'])} vs System 1 at its temperature"]]
    return sweep_table + table(f"temperature-matched control (K={t['think_steps']}; temperatures "
                               "chosen on the tune slice)",
                               ["prediction", "temperature", "val loss", "vs raw System 1"], control)


def verification_markdown(r):
    """Self-verification (ranked by the model's verify_by and by the other ranking, which each row
    holds under by_<other>) and the exact verifier."""
    own = r["self_verification"][0]["verify_by"]
    other = next(key[3:] for key in r["self_verification"][0] if key.startswith("by_"))
    rows = [[row["samples"], num(row["loss"]), delta(row), f"{row['random_start_chosen']:.4f}",
             num(row[f"by_{other}"]["loss"]), delta(row[f"by_{other}"]),
             f"{row['us_per_token']:.1f}"] for row in r["self_verification"]]
    x = r["exact_verifier"]
    exact = [num(x["loss"]), delta(x), f"{x['accuracy']:.4f}", f"{x['think_accuracy']:.4f}",
             f"{x['argmax_is_argmin']:.4f}"]
    head = ["samples M", "val loss", "vs M=1", "random start chosen", f"by {other}: val loss",
            "vs M=1", "µs/token"]
    exact_head = ["val loss", "vs thinking", "accuracy", "thinking's accuracy",
                  "thinking's argmax = argmin E"]
    return (table(f"self-verification (K={r['think_steps']}; kept: lowest {own}, or lowest "
                  f"{other})", head, rows)
            + table("exact verifier (softmax(-E(x, v) / T) over every token v, T = "
                    f"{x['temperature']:.3f})", exact_head, [exact]))


def uncertainty_markdown(r):
    """Energy as uncertainty, and adaptive compute."""
    u = r["uncertainty"]
    labels = {"energy": "E(p_K)", "energy_gap": "E(p_K) - min_v E(x, v)", "free_energy": "F(z_K)",
              "max_prob": "1 - max p (baseline)"}
    scores = [[label, num(u[name]["pearson"], 3), num(u[name]["spearman"], 3),
               num(u[name]["auroc"], 3)] for name, label in labels.items()]
    adaptive = [[f"{row['epsilon']:g}", f"{row['mean_steps']:.2f} / {row['max_steps']}",
                 num(row["loss"]), delta(row), row["fixed_steps"], num(row["fixed"]["loss"])]
                for row in r["adaptive"]]
    return (table(f"energy as uncertainty (K={u['think_steps']}; argmax wrong on "
                  f"{u['error_rate']:.1%} of tokens)",
                  ["score", "Pearson with loss", "Spearman with loss", "AUROC for argmax wrong"],
                  scores)
            + table("adaptive compute (stop when the free energy changes by less than epsilon)",
                    ["epsilon", "mean steps", "val loss", "vs K=0", "fixed K", "its val loss"],
                    adaptive))


def ood_markdown(r):
    """The think sweep on val, the out-of-distribution text and the corrupted val, side by side."""
    o = r["ood"]
    names = ["val", "ood_text", "corrupted_val"]
    rows = []
    for same_k in zip(*[o[n]["sweep"] for n in names]):  # one K's row of each text
        rows.append([same_k[0]["think_steps"], *[f"{num(t['loss'])} ({delta(t)})" for t in same_k]])
    rows.append(["tokens", *[o[n]["tokens"] for n in names]])
    rows.append(["gain of the best K",
                 *[f"{o[n]['gain']:+.4f} (K={o[n]['best_think_steps']})" for n in names]])
    return table(f"out of distribution (ood_text {o['ood_path']}; corrupted val: "
                 f"{o['corrupt']:.0%} substituted)", ["think_steps", *names], rows)


def chains_markdown(r):
    """KL of the contrastive chains to the model, by step and kind (none without a chains part)."""
    if "chains" not in r:
        return []
    c = r["chains"]
    kinds = [k for k in ("cd", "pcd", "fast_pcd") if k in c["rows"][0]]
    rows = [[row["steps"], *[f"{row[k]['kl']:.4f} ± {row[k]['se']:.4f}" for k in kinds]]
            for row in c["rows"]]
    return table(f"contrastive chains: KL(chains after k steps || softmax(-E / T)) (step "
                 f"{c['step_size']:g}, tau {c['temperature']:g}, noise {c['noise']:g}; cd from the "
                 "data, pcd from noise)", ["k", *kinds], rows)


def visualise(cfg: VizConfig):
    plt = pyplot()
    if plt is None:
        raise UserError("matplotlib is not installed: run with `uv run --extra plots viz.py ...`")
    if cfg.think_steps < 1 or cfg.positions < 1 or cfg.top < 1:
        raise UserError("think_steps, positions and top must be >= 1")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    missing = [f for f in cfg.evals + cfg.metrics + cfg.trend if not Path(f).is_file()]
    if missing:
        raise UserError(f"{missing[0]} not found: `uv run eval.py checkpoint=...` writes eval.json "
                        f"next to the "
                        "checkpoint, train.py writes out_dir/metrics.jsonl")
    if cfg.evals:
        results = [json.loads(Path(file).read_text()) for file in cfg.evals]
        plot_sweep(plt, results, out / "think_sweep.png")
        written.append(out / "think_sweep.png")
        if any("chains" in r for r in results):
            plot_chains(plt, [r for r in results if "chains" in r], out / "chains.png")
            written.append(out / "chains.png")
    if cfg.trend:
        points = trend_points(cfg.trend)
        plot_trend(plt, points, out / "trend.png", cfg.trend_optimum)
        print(trend_markdown(*trend_rows(points), points, cfg.trend_flops_ratio, cfg.trend_optimum,
                             cfg.trend_fit_from))
        written.append(out / "trend.png")
    if cfg.metrics:
        plot_energy_gap(plt, cfg.metrics, out / "energy_gap.png")
        written.append(out / "energy_gap.png")
    if cfg.checkpoint:
        model, vocab, run_cfg = load_model(cfg.checkpoint, pick_device(cfg.device, key="device"))
        d = run_cfg["data"]  # checkpoints from before data.val_path have no such key
        val = torch.tensor(vocab.encode(val_text(d["data_path"], d.get("val_path"))),
                           dtype=torch.long)
        T = model.config.block_size
        gen = torch.Generator().manual_seed(cfg.seed)
        start = int(torch.randint(len(val) - T - 1, (), generator=gen))
        x, y = val[start : start + T], val[start + 1 : start + T + 1]
        zs, free = descend(model, x.view(1, -1).to(model.energy_head.weight.device),
                           cfg.think_steps)
        zs, free = zs.cpu(), free.cpu()
        picks = torch.randperm(T, generator=gen)[: cfg.positions].sort().values
        plot_descent(plt, free, x, y, picks, vocab, model.config.energy, out / "think_descent.png")
        k, t = min(model.config.think_steps, cfg.think_steps), int(picks[0])
        plot_candidates(plt, zs[0, t], zs[k, t], k, x, y, t, vocab, cfg.top, out / "candidates.png")
        written += [out / "think_descent.png", out / "candidates.png"]
    if not written:
        raise UserError("nothing to plot: pass checkpoint=PATH, evals='[a/eval.json,b/eval.json]', "
                        "metrics='[a/metrics.jsonl]' and/or trend='[a/eval.json,b/eval.json,...]'")
    print("wrote " + ", ".join(str(p) for p in written))
    return written


@hydra.main(version_base="1.3", config_path="config", config_name="viz")
def main(cfg):
    run(visualise, cfg)


if __name__ == "__main__":
    check_overrides("viz", sys.argv[1:])
    main()
