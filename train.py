"""
Train nanoEBM: `uv run train.py [overrides]`, e.g. `uv run train.py model.use_contrastive=true`.
Several processes (DDP): `uv run torchrun --standalone --nproc_per_node=N train.py [overrides]`.
Config: config/train.yaml (schema: RunConfig in engine.py). Writes only into out_dir.
The training loop comes first; below it, what it calls: logging, Ctrl-C, the NaN check, DDP and the
wandb check. Checkpoints (save, resume) are checkpoints.py's; setup and one step are engine.py's.
"""

import json
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoints import Checkpoints
from engine import (Objective, RunConfig, TrainConfig, compiled, evaluate, get_lr, setup,
                    train_step)
from util import Processes, UserError, check_overrides, run


def train(cfg: RunConfig):
    """Train in this process; under torchrun every process runs this, with DDP."""
    check_wandb(cfg)
    procs = Processes(cfg.train.device)
    try:
        return train_processes(cfg, procs)
    finally:
        procs.close()  # the process group goes, however the run ends


def train_processes(cfg: RunConfig, procs: Processes):
    """Set up (or resume) the run and train it to train.max_steps; returns the best val loss."""
    run, t = setup(cfg, procs.device, procs.rank, procs.world), cfg.train
    ckpts = Checkpoints(cfg, procs, run)
    step, best_val, elapsed = ckpts.resume() if t.resume else (0, math.inf, 0.0)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    objective = wrap(run, cfg, procs)
    rows = cfg.data.batch_size * t.grad_accum_steps  # windows per optimizer step, all processes
    if procs.master:
        print(describe(cfg, procs, run))
    log, stop = Log(cfg, procs, step), StopRequest()
    t_start = time.time() - elapsed  # the run's clock continues across resumes
    try:
        while step < t.max_steps:  # the training loop
            if procs.any(stop.signal is not None):  # every process stops at the same step
                save_and_stop(ckpts, step, best_val, time.time() - t_start)
            lr = set_lr(run.optimizer, step, t)
            x, y = run.data.batch("train", rows, run.batch_gen, run.device, procs.rank, procs.world)
            log.add(train_step(objective, run.optimizer, x, y, cfg, run.scaler))  # tensors: no sync
            step += 1
            last = step == t.max_steps
            if step % t.log_interval == 0 or last:  # the only sync between evals
                log.progress(step, lr)  # a NaN on any process stops all
            if step % t.eval_interval == 0 or last:
                val, val_s1 = evaluate(run.model, run.data, cfg, run.device, procs)
                check_finite(val, "val loss", f"at step {step}", cfg.out_dir)
                if val < best_val:  # val is the same on every process: they agree
                    best_val = val
                    ckpts.save("best.pt", step, best_val, time.time() - t_start)
                ckpts.save("ckpt.pt", step, best_val, time.time() - t_start)
                log.eval(step, val, val_s1, lr, time.time() - t_start)
        ckpts.save("final.pt", step, best_val, time.time() - t_start)
    finally:
        # the DDP wrapper goes before its process group (train() destroys that next): a reducer
        # outliving its group can abort the process at exit; an exception's traceback keeps it alive
        objective = None
        log.close()
        stop.restore()
    if procs.master:
        print(f"done: {step} steps in {time.time() - t_start:.1f}s{log.step_time()}, best val loss "
              f"{best_val:.4f}, saved {ckpts.dir / 'final.pt'}{peak_gpu_memory(run.device)}")
    return best_val


# -------------------------------------------------------------------------------------------------
# what the loop calls


def describe(cfg: RunConfig, procs, run):
    """The run in one line, printed as it starts."""
    rows = cfg.data.batch_size * cfg.train.grad_accum_steps
    return (f"{run.model.num_params() / 1e6:.2f}M parameters, vocab {len(run.data.vocab)}, "
            f"device {run.device}{f' x {procs.world} processes' if procs.world > 1 else ''}, "
            f"{rows} windows per step, {cfg.train.dtype}, think_steps {cfg.model.think_steps}, "
            f"out_dir {cfg.out_dir}")


def peak_gpu_memory(device):
    """', peak GPU memory X GiB' (what tensors took at most on this process's GPU) on CUDA, else
    nothing."""
    if torch.device(device).type != "cuda":
        return ""
    return f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"


def set_lr(optimizer, step, t: TrainConfig):
    """Set this step's learning rate (get_lr; times a group's lr_mult) and return it."""
    lr = get_lr(step, t)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    return lr


def wrap(run, cfg: RunConfig, procs):
    """What the training step calls: the objective (engine.Objective) of the model (compiled with
    train.compile), under DDP with several processes."""
    objective = Objective(compiled(run.model, cfg), run.state)  # checkpoints save run.model itself
    if procs.world == 1:
        return objective
    # with no think step the energy's own parameters (mixture g, candidate slots, a learned step
    # size) get no gradient, and DDP must be told to look for them
    device = torch.device(run.device)
    return DDP(objective, device_ids=[device] if device.type == "cuda" else None,
               find_unused_parameters=cfg.model.think_steps == 0)


class Log:
    """The training losses summed since the last eval (tensors), the progress bar,
    out_dir/metrics.jsonl (one JSON object per eval) and wandb; rank 0 writes. It times the
    training steps between log lines, evaluations and checkpoints excluded: what a step costs."""

    def __init__(self, cfg: RunConfig, procs, step):
        self.cfg, self.procs, self.master, self.wandb = cfg, procs, procs.master, None
        self.sums, self.n_sum, self.t_log, self.step_log = {}, 0, time.time(), step
        self.step_seconds = []  # per log interval: seconds per training step
        self.bar = tqdm(total=cfg.train.max_steps, initial=step, dynamic_ncols=True, desc="train",
                        disable=not self.master)
        mode = "a" if cfg.train.resume else "w"
        self.metrics = open(Path(cfg.out_dir) / "metrics.jsonl", mode) if self.master else None
        if cfg.wandb_project and self.master:
            self.wandb = start_wandb(cfg)

    def add(self, metrics):
        """A step's metrics (train_loss, energy_gap): tensors, added without a sync."""
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.n_sum += 1

    def progress(self, step, lr):
        """The mean training loss since the last eval on the bar (a sync), checked for NaN."""
        train_loss = self.procs.mean(self.sums["train_loss"]).item() / self.n_sum
        check_finite(train_loss, "training loss", f"before step {step}", self.cfg.out_dir)
        d, now = self.cfg.data, time.time()
        seconds = (now - self.t_log) / (step - self.step_log)  # the sync above ended the steps
        self.step_seconds.append(seconds)
        self.t_log, self.step_log = now, step
        tokens_per_s = d.batch_size * self.cfg.train.grad_accum_steps * d.block_size / seconds
        self.bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
        self.bar.update(step - self.bar.n)

    def eval(self, step, val, val_s1, lr, elapsed):
        """One row of metrics.jsonl (and wandb): the val losses and the training means since the
        last eval, which start again from zero."""
        means = {name: self.procs.mean(total).item() / self.n_sum
                 for name, total in self.sums.items()}
        row = {"step": step, "val_loss": val, "val_loss_s1": val_s1, **means, "lr": lr,
               "time_s": round(elapsed, 2)}
        self.sums, self.n_sum = {}, 0
        if self.master:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
            if self.wandb is not None:
                self.wandb.log(row, step=row["step"])
            self.bar.write(f"step {row['step']}: train {row['train_loss']:.4f}, "
                           f"val {row['val_loss']:.4f} (System 1 {row['val_loss_s1']:.4f})")
        self.t_log, self.step_log = time.time(), step  # the next interval times training only

    def step_time(self):
        """' (X ms a training step)': the median over the log intervals, the first left out when
        there are others (it compiles, with train.compile); nothing before the first log line."""
        times = self.step_seconds[1:] or self.step_seconds
        return f" ({1000 * statistics.median(times):.1f} ms a training step)" if times else ""

    def close(self):
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(cfg: RunConfig):
    """The wandb run (check_wandb found a login or an offline mode), or one line if it fails."""
    import wandb

    try:
        return wandb.init(project=cfg.wandb_project, name=cfg.wandb_name, dir=cfg.out_dir,
                          config=OmegaConf.to_container(OmegaConf.structured(cfg)))
    except wandb.errors.Error as err:  # e.g. no server (check_wandb found a login)
        raise UserError(f"wandb could not start the run ({str(err).splitlines()[0]}): check the "
                        "network and the login, or log offline with WANDB_MODE=offline") from None


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop saves a resumable checkpoint at the next step
    boundary."""

    def __init__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.signal = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def save_and_stop(ckpts, step, best_val, elapsed):
    """Ctrl-C or SIGTERM: save a resumable ckpt.pt and stop with one line that says how to go on."""
    ckpts.save("ckpt.pt", step, best_val, elapsed)
    raise UserError(f"interrupted at step {step}; saved {ckpts.dir / 'ckpt.pt'}: continue with the "
                    "same command plus train.resume=true")


def check_finite(loss, what, when, out_dir):
    """A NaN or infinite loss stops the run with one line; ckpt.pt from the last evaluation is
    kept."""
    if not math.isfinite(loss):
        raise UserError(f"the {what} became {loss} {when}; the last good checkpoint "
                        f"({Path(out_dir) / 'ckpt.pt'}) is kept: lower train.learning_rate")


WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")  # what wandb accepts


def check_wandb(cfg: RunConfig):
    """
    wandb_project set: wandb needs a login, unless WANDB_MODE is offline or disabled. Without one
    and without a terminal to ask on (a notebook's `!uv run`, a batch job) wandb.init would fail
    after the setup, with a traceback; ask wandb's own lookup (WANDB_API_KEY, ~/.netrc, its settings
    files) first, before any work. In a terminal wandb.init asks for a key itself (or offers
    offline). Rank 0 alone logs to wandb, so it alone checks.
    """
    if not cfg.wandb_project or int(os.environ.get("RANK", "0")) > 0:
        return
    # no login needed (read first: wandb's own settings are a per-process singleton that may
    # predate this environment)
    if os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled"):
        return
    import wandb

    try:
        # the mode wandb.init will use (WANDB_MODE or wandb's settings)
        mode = wandb.setup().settings.mode
    except Exception as err:  # wandb validates its settings, e.g. WANDB_MODE
        env = os.environ.get("WANDB_MODE")
        cause = (f"WANDB_MODE={env!r} is not a wandb mode" if env not in (None, *WANDB_MODES) else
                 f"wandb cannot start ({type(err).__name__}: {str(err).splitlines()[0]})")
        raise UserError(f"{cause}: use WANDB_MODE=online (after `uv run wandb login`), offline or "
                        "disabled, or drop wandb_project") from None
    if mode in ("offline", "dryrun", "disabled"):
        return
    try:
        logged_in = wandb.login(prompt=False, verify=False)  # never prompts; no network
    except TypeError:  # a wandb without login(prompt=...): its older key lookup (never prompts)
        logged_in = wandb.api.api_key is not None
    # wandb's test for a terminal
    if not logged_in and not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise UserError(f"wandb_project={cfg.wandb_project} needs a wandb login and none was "
                        "found: run `uv run wandb login` or set WANDB_API_KEY, or log offline "
                        "with WANDB_MODE=offline (upload later with `wandb sync`), or drop "
                        "wandb_project")


@hydra.main(version_base="1.3", config_path="config", config_name="train")
def main(cfg):
    run(train, cfg)


if __name__ == "__main__":
    check_overrides("train", sys.argv[1:])
    main()
