"""
Train nanoEBM: `uv run train.py [overrides]`, e.g. `uv run train.py model.use_contrastive=true`.
Several processes (DDP): `uv run torchrun --standalone --nproc_per_node=N train.py [overrides]`.
Config: config/train.yaml (schema: RunConfig in trainer.py). Writes only into out_dir.
"""

import json
import math
import os
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
# (model.block_size and model.vocab_size follow data.block_size and the vocabulary, checked beside these)
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "energy", "mixture_hidden", "think_lr_learnable",
                "cand_embed", "think_step_embed")


class Checkpoints:
    """
    out_dir/ckpt.pt (resumable: optimizer, RNG states and chain state of every process), best.pt and
    final.pt. Every process calls save at the same step (ckpt.pt gathers their state); rank 0 writes.
    """

    def __init__(self, cfg: RunConfig, procs, model, optimizer, state, scaler, batch_gen, vocab):
        self.cfg, self.procs, self.model, self.optimizer, self.state = cfg, procs, model, optimizer, state
        self.scaler, self.batch_gen, self.vocab = scaler, batch_gen, vocab
        self.dir = Path(cfg.out_dir)
        device_type = next(model.parameters()).device.type
        # the device's own RNG (dropout, think noise and chains draw from it on CUDA and MPS): "cuda" or "mps",
        # whose torch modules both have get_rng_state / set_rng_state
        self.device_rng = device_type if device_type in ("cuda", "mps") else None

    def save(self, kind, step, best_val, elapsed):
        if kind == "ckpt.pt":  # per process: its RNG states and chain state (PCD chains, fast weights, replay)
            own = {"torch": torch.get_rng_state()}
            if self.device_rng:
                own[self.device_rng] = getattr(torch, self.device_rng).get_rng_state()
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
            if self.device_rng:
                ckpt["rng"][self.device_rng] = [r[self.device_rng] for r in ranks]
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
            if self.device_rng in rng:
                getattr(torch, self.device_rng).set_rng_state(rng[self.device_rng][procs.rank].cpu())
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

            try:
                self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_name, dir=cfg.out_dir,
                                        config=OmegaConf.to_container(OmegaConf.structured(cfg)))
            except wandb.errors.Error as err:  # e.g. the server cannot be reached (check_wandb found a login)
                raise UserError(f"wandb could not start the run ({str(err).splitlines()[0]}): check the network "
                                "and the login, or log offline with WANDB_MODE=offline") from None

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


def check_finite(loss, what, when, out_dir):
    """A NaN or infinite loss stops the run with one line; ckpt.pt from the last evaluation is kept."""
    if not math.isfinite(loss):
        raise UserError(f"the {what} became {loss} {when}; the last good checkpoint "
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


WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")  # what wandb's settings accept


def check_wandb(cfg: RunConfig):
    """
    wandb_project set: wandb needs a login, unless WANDB_MODE is offline or disabled. Without one and without a
    terminal to ask on (a notebook's `!uv run`, a batch job) wandb.init would fail after the setup, with a
    traceback; ask wandb's own lookup (WANDB_API_KEY, ~/.netrc, its settings files) first, before any work.
    In a terminal wandb.init asks for a key itself (or offers offline). Rank 0 alone logs to wandb, so it alone
    checks.
    """
    if not cfg.wandb_project or int(os.environ.get("RANK", "0")) > 0:
        return
    if os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled"):  # no login needed (read first: wandb's
        return  # own settings are a per-process singleton that may predate this environment)
    import wandb

    try:
        mode = wandb.setup().settings.mode  # the mode wandb.init will use (WANDB_MODE or wandb's settings)
    except Exception as err:  # wandb validates its settings, e.g. WANDB_MODE
        env = os.environ.get("WANDB_MODE")
        cause = (f"WANDB_MODE={env!r} is not a wandb mode" if env not in (None, *WANDB_MODES) else
                 f"wandb cannot start ({type(err).__name__}: {str(err).splitlines()[0]})")
        raise UserError(f"{cause}: use WANDB_MODE=online (after `uv run wandb login`), offline or disabled, "
                        "or drop wandb_project") from None
    if mode in ("offline", "dryrun", "disabled"):
        return
    try:
        logged_in = wandb.login(prompt=False, verify=False)  # never prompts; no network
    except TypeError:  # a wandb without login(prompt=...): its older key lookup, which never prompts either
        logged_in = wandb.api.api_key is not None
    if not logged_in and not (sys.stdin.isatty() and sys.stderr.isatty()):  # wandb's test for a terminal
        raise UserError(f"wandb_project={cfg.wandb_project} needs a wandb login and none was found: run "
                        "`uv run wandb login` or set WANDB_API_KEY, or log offline with WANDB_MODE=offline "
                        "(upload later with `wandb sync`), or drop wandb_project")


def train(cfg: RunConfig):
    """Train in this process; under torchrun every process runs this, with DDP."""
    check_wandb(cfg)
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
    sums, n_sum = {}, 0  # tensors summed over the steps since the last eval: train_loss (energy_gap)
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
            for name, value in train_step(fwd, optimizer, x, y, state, cfg, scaler=scaler).items():
                sums[name] = sums.get(name, 0.0) + value  # tensors: no sync
            step, n_sum = step + 1, n_sum + 1
            last = step == t.max_steps

            if step % t.log_interval == 0 or last:  # the only sync between evals; a NaN on any process stops all
                train_loss = procs.mean(sums["train_loss"]).item() / n_sum
                check_finite(train_loss, "training loss", f"before step {step}", cfg.out_dir)
                log.progress(step, train_loss, lr, t.log_interval * rows * cfg.data.block_size / (time.time() - t_log))
                t_log = time.time()

            if step % t.eval_interval == 0 or last:
                val, val_s1 = evaluate(model, data, cfg, device, procs)
                check_finite(val, "val loss", f"at step {step}", cfg.out_dir)
                means = {name: procs.mean(total).item() / n_sum for name, total in sums.items()}
                log.eval({"step": step, "val_loss": val, "val_loss_s1": val_s1, **means,
                          "lr": lr, "time_s": round(time.time() - t_start, 2)})
                sums, n_sum = {}, 0
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
