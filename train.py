"""
Train nanoEBM: `uv run train.py [overrides]`, e.g. `uv run train.py model.use_contrastive=true`.
Several processes (DDP): `uv run torchrun --standalone --nproc_per_node=N train.py [overrides]`.
Config: config/train.yaml (schema: RunConfig in trainer.py). Writes only into out_dir.
"""

import json
import math
import signal
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from trainer import Objective, RunConfig, compiled, evaluate, get_lr, grad_scaler, setup, train_step
from util import Processes, UserError, check_overrides, load_checkpoint, run, save_checkpoint

# what a resumed run must share with the checkpoint; any other change (a loss weight, a think option, the
# learning rate, max_steps) is allowed and printed as a note
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "bias", "vocab_size", "block_size", "energy", "mixture_hidden",
                "think_lr_learnable", "cand_embed", "think_step_embed")


class Checkpoints:
    """
    out_dir/ckpt.pt (resumable: optimizer, RNG states and chain state of every process), best.pt and
    final.pt. Every process calls save at the same step (ckpt.pt gathers their state); rank 0 writes.
    """

    def __init__(self, cfg: RunConfig, procs, model, optimizer, state, scaler, batch_gen, vocab):
        self.cfg, self.procs, self.model, self.optimizer, self.state = cfg, procs, model, optimizer, state
        self.scaler, self.batch_gen, self.vocab = scaler, batch_gen, vocab
        self.dir = Path(cfg.out_dir)
        self.cuda = next(model.parameters()).device.type == "cuda"

    def save(self, kind, step, best_val, elapsed):
        if kind == "ckpt.pt":  # per process: its RNG states and chain state (PCD chains, fast weights, replay)
            own = {"torch": torch.get_rng_state()}
            if self.cuda:
                own["cuda"] = torch.cuda.get_rng_state()
            if self.state is not None:
                own["chains"] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in self.state.state_dict().items()}
            ranks = self.procs.gather(own)
        if not self.procs.master:
            return
        ckpt = {"model": self.model.state_dict(), "config": OmegaConf.to_container(OmegaConf.structured(self.cfg)),
                "vocab": self.vocab.chars, "step": step, "best_val": best_val}
        if kind == "ckpt.pt":  # everything needed to continue the run exactly; entry r of each list: rank r
            ckpt["optimizer"] = self.optimizer.state_dict()
            ckpt["rng"] = {"batch": self.batch_gen.get_state(), "torch": [r["torch"] for r in ranks]}
            if self.cuda:
                ckpt["rng"]["cuda"] = [r["cuda"] for r in ranks]
            if self.state is not None:
                ckpt["chains"] = [r["chains"] for r in ranks]
            if self.scaler is not None:
                ckpt["scaler"] = self.scaler.state_dict()
            ckpt["elapsed"] = elapsed
        save_checkpoint(ckpt, self.dir / kind)

    def resume(self):
        """Load ckpt.pt into the run; returns (step, best_val, elapsed) to continue from."""
        path, procs = self.dir / "ckpt.pt", self.procs
        ckpt = load_checkpoint(path, map_location=next(self.model.parameters()).device)
        self.check_compatible(ckpt, path)
        if not isinstance(ckpt.get("rng", {}).get("torch"), list):
            raise UserError(f"{path} has no per-process state (an older train.py wrote it); "
                            "start a new run without train.resume")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        rng, saved = ckpt["rng"], len(ckpt["rng"]["torch"])
        if procs.rank < saved:  # rank r continues the RNG and chains of rank r (one process: those of rank 0)
            torch.set_rng_state(rng["torch"][procs.rank].cpu())  # (map_location moved them to the device)
            if self.cuda and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"][procs.rank].cpu())
            if self.state is not None and "chains" in ckpt:
                self.state.load_state_dict(ckpt["chains"][procs.rank])
        self.batch_gen.set_state(rng["batch"].cpu())
        if procs.master:
            print(f"resuming from {path} at step {ckpt['step']}")
            if procs.world > saved:
                print(f"note: ckpt.pt holds the state of {saved} processes; processes {saved}.. start new "
                      "RNG streams and chains")
        return ckpt["step"], ckpt["best_val"], ckpt["elapsed"]

    def check_compatible(self, ckpt, path):
        """Architecture, vocabulary and data must match the checkpoint; other changes are printed as notes."""
        old, new = ckpt["config"], OmegaConf.to_container(OmegaConf.structured(self.cfg))
        fixed = [f"model.{k}" for k in ARCHITECTURE if old["model"].get(k) != new["model"][k]]
        if new["model"]["think_step_embed"] and old["model"].get("think_steps") != new["model"]["think_steps"]:
            fixed.append("model.think_steps")  # one step embedding per step
        fixed += [f"data.{k}" for k in ("data_path", "block_size") if old["data"].get(k) != new["data"][k]]
        if fixed or ckpt["vocab"] != self.vocab.chars:
            raise UserError(f"{path} was trained with another {', '.join(fixed) or 'vocabulary'}; resume with the "
                            "same architecture and data, or drop train.resume")
        changed = [f"{group}.{k}={new[group][k]} (was {old[group].get(k)})" for group in ("model", "data", "train")
                   for k in new[group] if k != "resume" and old[group].get(k) != new[group][k]]
        if changed and self.procs.master:
            print("note: resuming with " + ", ".join(changed))


class Log:
    """The progress bar, out_dir/metrics.jsonl (one JSON object per eval) and wandb; rank 0 only."""

    def __init__(self, cfg: RunConfig, master, step):
        self.master, self.wandb = master, None
        self.bar = tqdm(total=cfg.train.max_steps, initial=step, dynamic_ncols=True, desc="train", disable=not master)
        self.metrics = open(Path(cfg.out_dir) / "metrics.jsonl", "a" if cfg.train.resume else "w") if master else None
        if cfg.wandb_project and master:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_name, dir=cfg.out_dir,
                                    config=OmegaConf.to_container(OmegaConf.structured(cfg)))

    def progress(self, step, train_loss, lr, tokens_per_s):
        self.bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
        self.bar.update(step - self.bar.n)

    def eval(self, row):
        if self.master:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
            if self.wandb is not None:
                self.wandb.log(row, step=row["step"])
            self.bar.write(f"step {row['step']}: train {row['train_loss']:.4f}, val {row['val_loss']:.4f} "
                           f"(System 1 {row['val_loss_s1']:.4f})")

    def close(self):
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop saves a resumable checkpoint at the next step boundary."""

    def __init__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.signal = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def check_finite(loss, what, step, out_dir):
    if not math.isfinite(loss):
        raise UserError(f"the {what} became {loss} at step {step}; the last good checkpoint "
                        f"({Path(out_dir) / 'ckpt.pt'}) is kept: lower train.learning_rate")


def wrap(model, cfg: RunConfig, procs):
    """What the training step calls: the model (compiled with train.compile), under DDP with several processes."""
    fwd = compiled(model, cfg)  # checkpoints always save `model`: clean keys
    if procs.world == 1:
        return fwd
    # with no think step the energy's own parameters (mixture g, candidate slots, a learned step size) get no
    # gradient, and DDP must be told to look for them
    device = next(model.parameters()).device
    return DDP(Objective(fwd), device_ids=[device] if device.type == "cuda" else None,
               find_unused_parameters=cfg.model.think_steps == 0)


def train(cfg: RunConfig):
    """Train in this process; under torchrun every process runs this, with DDP."""
    procs = Processes(cfg.train.device)
    try:
        return train_processes(cfg, procs)
    finally:
        procs.close()  # the process group goes, however the run ends


def train_processes(cfg: RunConfig, procs: Processes):
    device, data, model, optimizer, state = setup(cfg, procs.device, procs.rank, procs.world)
    t = cfg.train
    batch_gen = torch.Generator().manual_seed(t.seed)  # the same on every process
    scaler = grad_scaler(t.dtype, torch.device(device).type)
    ckpts = Checkpoints(cfg, procs, model, optimizer, state, scaler, batch_gen, data.vocab)
    step, best_val, elapsed = ckpts.resume() if t.resume else (0, math.inf, 0.0)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    fwd = wrap(model, cfg, procs)
    rows = cfg.data.batch_size * t.grad_accum_steps  # windows per optimizer step, all processes
    if procs.master:
        print(f"{model.num_params() / 1e6:.2f}M parameters, vocab {len(data.vocab)}, device {device}"
              f"{f' x {procs.world} processes' if procs.world > 1 else ''}, {rows} windows per step, "
              f"{t.dtype}, think_steps {cfg.model.think_steps}, out_dir {cfg.out_dir}")
    log, stop = Log(cfg, procs.master, step), StopRequest()
    t_start, t_log = time.time() - elapsed, time.time()  # the run's clock continues across resumes
    loss_sum, n_sum = torch.zeros((), device=device), 0
    try:
        # training loop
        while step < t.max_steps:
            if procs.any(stop.signal is not None):  # every process stops at the same step
                ckpts.save("ckpt.pt", step, best_val, time.time() - t_start)
                raise UserError(f"interrupted at step {step}; saved {Path(cfg.out_dir) / 'ckpt.pt'}: "
                                "continue with the same command plus train.resume=true")
            lr = get_lr(step, t)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_mult", 1.0)
            x, y = data.batch("train", rows, batch_gen, device, procs.rank, procs.world)
            loss_sum += train_step(fwd, optimizer, x, y, state, cfg, scaler=scaler)  # a tensor: no sync
            step, n_sum = step + 1, n_sum + 1
            last = step == t.max_steps

            if step % t.log_interval == 0 or last:  # the only sync between evals; a NaN on any process stops all
                train_loss = procs.mean(loss_sum).item() / n_sum
                check_finite(train_loss, "training loss", step, cfg.out_dir)
                log.progress(step, train_loss, lr, t.log_interval * rows * cfg.data.block_size / (time.time() - t_log))
                t_log = time.time()

            if step % t.eval_interval == 0 or last:
                val, val_s1 = evaluate(model, data, cfg, device, procs)
                check_finite(val, "val loss", step, cfg.out_dir)
                train_loss = procs.mean(loss_sum).item() / n_sum
                log.eval({"step": step, "val_loss": val, "val_loss_s1": val_s1, "train_loss": train_loss,
                          "lr": lr, "time_s": round(time.time() - t_start, 2)})
                loss_sum.zero_()
                n_sum = 0
                if val < best_val:  # val is the same on every process: they agree
                    best_val = val
                    ckpts.save("best.pt", step, best_val, time.time() - t_start)
                ckpts.save("ckpt.pt", step, best_val, time.time() - t_start)
        ckpts.save("final.pt", step, best_val, time.time() - t_start)
    finally:
        fwd = None  # the DDP wrapper goes before its process group (train() destroys that next): a reducer
        # outliving its group can abort the process at exit, and an exception's traceback would keep it alive
        log.close()
        stop.restore()
    if procs.master:
        print(f"done: {step} steps in {time.time() - t_start:.1f}s, best val loss {best_val:.4f}, "
              f"saved {Path(cfg.out_dir) / 'final.pt'}")
    return best_val


@hydra.main(version_base="1.3", config_path="config", config_name="train")
def main(cfg):
    run(train, cfg)


if __name__ == "__main__":
    check_overrides("train", sys.argv[1:])
    main()
