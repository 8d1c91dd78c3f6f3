"""
Train nanoEBM: `uv run train.py [overrides]`, e.g. `uv run train.py model.use_contrastive=true`.
Several processes (DDP): `uv run torchrun --standalone --nproc_per_node=N train.py [overrides]`.
Config: config/train.yaml (schema: the dataclasses below). Writes only into out_dir.
"""

import json
import math
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import hydra
import torch
import torch.nn as nn
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import DataConfig, Dataset, load_text
from ebm import ChainState, losses, total_loss
from model import GPT, ModelConfig
from util import Processes, UserError, check_overrides, load_checkpoint, pick_device, run, save_checkpoint


@dataclass
class TrainConfig:
    max_steps: int = 1500
    learning_rate: float = 2e-3
    min_lr: float = 2e-4  # the cosine decay ends here
    warmup_steps: int = 100
    decay_lr: bool = True  # false: constant learning rate after warmup
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    think_lr_lr_mult: float = 10.0  # learning rate of a learned think step size (model.think_lr_learnable), x lr
    eval_interval: int = 250
    eval_iters: int = 20  # val batches per evaluation (the same batches every time)
    log_interval: int = 10  # steps between progress-bar updates (and the NaN check)
    grad_accum_steps: int = 1  # micro-batches of data.batch_size windows per optimizer step (gradients add up)
    dtype: str = "float32"  # float32 | bfloat16 | float16: autocast of the forward; weights stay float32
    device: str = "auto"  # auto = cuda > mps > cpu
    compile: bool = False  # torch.compile the pass over the observed tokens (see compiled())
    seed: int = 1337
    resume: bool = False  # continue from out_dir/ckpt.pt


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "out_ebt"
    wandb_project: Optional[str] = None  # log to wandb only when set (WANDB_MODE=offline works)
    wandb_name: Optional[str] = None


ConfigStore.instance().store(name="train_schema", node=RunConfig)

CONTRASTIVE_TYPES = ("cd", "pcd", "fast_pcd")
ENERGIES = ("linear", "mixture", "transformer")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_config(cfg: RunConfig):
    """Impossible values fail here with one line, before any work is done."""
    m, t = cfg.model, cfg.train
    if m.refine_steps is not None:  # the predecessor's name for think_steps
        m.think_steps = m.refine_steps
    problems = []
    if m.n_layer < 1 or m.n_head < 1 or m.n_embd < 1:
        problems.append("model.n_layer, model.n_head and model.n_embd must be >= 1")
    elif m.n_embd % m.n_head:
        problems.append(f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}")
    if m.energy not in ENERGIES:
        problems.append(f"model.energy={m.energy} must be one of {', '.join(ENERGIES)}")
    if m.contrastive_type not in CONTRASTIVE_TYPES:
        problems.append(f"model.contrastive_type={m.contrastive_type} must be one of {', '.join(CONTRASTIVE_TYPES)}")
    for key in ("think_steps", "contrastive_k"):
        if getattr(m, key) < 0:
            problems.append(f"model.{key}={getattr(m, key)} must be >= 0")
    for key in ("softmax_temperature", "think_lr", "think_max_move", "n_persistent", "think_samples", "mixture_hidden"):
        if getattr(m, key) <= 0:
            problems.append(f"model.{key}={getattr(m, key)} must be > 0")
    if not 0 <= m.dropout < 1:
        problems.append(f"model.dropout={m.dropout} must be in [0, 1)")
    if m.entropy_weight < 0 or m.think_noise < 0 or m.langevin_step_size < 0 or m.langevin_noise_scale < 0:
        problems.append("model.entropy_weight, think_noise, langevin_step_size, langevin_noise_scale must be >= 0")
    if not 0 <= m.energy_layers <= m.n_layer:
        problems.append(f"model.energy_layers={m.energy_layers} must be in 0..model.n_layer (0 = all blocks)")
    if m.replay_size < 0 or not 0 <= m.replay_frac <= 1:
        problems.append("model.replay_size must be >= 0 and model.replay_frac in [0, 1]")
    if not 0 <= m.think_lr_jitter < 1:
        problems.append(f"model.think_lr_jitter={m.think_lr_jitter} must be in [0, 1)")
    if not 0 <= m.pcd_reinit_prob <= 1 or not 0 <= m.fast_weight_decay <= 1:
        problems.append("model.pcd_reinit_prob and model.fast_weight_decay must be in [0, 1]")
    if t.max_steps < 1 or t.eval_interval < 1 or t.eval_iters < 1 or t.log_interval < 1:
        problems.append("train.max_steps, eval_interval, eval_iters and log_interval must be >= 1")
    if t.learning_rate <= 0 or t.min_lr < 0 or t.warmup_steps < 0 or t.think_lr_lr_mult < 0:
        problems.append("train.learning_rate must be > 0; train.min_lr, warmup_steps, think_lr_lr_mult >= 0")
    if t.grad_accum_steps < 1:
        problems.append(f"train.grad_accum_steps={t.grad_accum_steps} must be >= 1")
    if t.dtype not in DTYPES:
        problems.append(f"train.dtype={t.dtype} must be one of {', '.join(DTYPES)}")
    if cfg.data.batch_size < 1 or cfg.data.block_size < 1:
        problems.append("data.batch_size and data.block_size must be >= 1")
    if not m.mixture_stopgrad and m.energy != "mixture":
        print("note: model.mixture_stopgrad applies to model.energy=mixture only; this energy ignores it")
    if problems:
        raise UserError("; ".join(problems))


def get_lr(step, t: TrainConfig):
    """Linear warmup, then cosine decay from learning_rate to min_lr at max_steps (or constant)."""
    if step < t.warmup_steps:
        return t.learning_rate * (step + 1) / t.warmup_steps
    if not t.decay_lr:
        return t.learning_rate
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (t.learning_rate - t.min_lr)


# ---------------------------------------------------------------------------------------------------
# mixed precision and torch.compile (bench.py uses these too)


def check_dtype(dtype, device_type):
    """The mixed precision this device can train in, or one line of cause and remedy."""
    if dtype == "float16" and device_type != "cuda":
        raise UserError(f"train.dtype=float16 needs loss scaling, which nanoEBM does on CUDA only; on {device_type} "
                        "use train.dtype=bfloat16 (float32's range, no scaling needed) or float32")
    if dtype == "bfloat16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bfloat16: use train.dtype=float16 (with loss scaling) or float32")


def autocast_context(dtype, device_type):
    """Autocast the forward: matmuls in dtype, reductions and softmaxes in float32; weights and AdamW stay
    float32 (the master weights, which checkpoints save). float32: no autocast."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type, dtype=DTYPES[dtype])


def grad_scaler(dtype, device_type):
    """float16 gradients underflow without loss scaling; bfloat16 has float32's range and needs none."""
    return torch.amp.GradScaler(device_type) if dtype == "float16" and device_type == "cuda" else None


def compiled(model, cfg: RunConfig):
    """
    What the training step calls: model, or with train.compile a torch.compile of its forward, the pass over
    the observed tokens. The rest stays eager: the energy head, the think steps, and the transformer
    energy's candidate pass (model.candidate_energy), because training differentiates its dE/dp again
    (double backward), which AOTAutograd, the autograd of torch.compile, does not support. The observed pass
    needs only a first backward: for dE/dp its keys and values are constants. Checkpoints save `model`
    itself, so their keys stay clean (no `_orig_mod.`).
    """
    if not cfg.train.compile:
        return model
    device_type = next(model.parameters()).device.type
    if device_type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise UserError("train.compile=true on CPU needs a C++ compiler (torch.compile's inductor builds C++): "
                        "install g++ or clang, or drop train.compile")
    try:
        return torch.compile(model)
    except RuntimeError as err:  # e.g. a Python version that torch.compile does not support yet
        raise UserError(f"torch.compile is not available here ({err}); drop train.compile") from None


# ---------------------------------------------------------------------------------------------------
# the training step and evaluation


class Objective(nn.Module):
    """The loss terms of a batch as one module call: DDP synchronises gradients of what its forward runs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y, state=None, think_steps=None):
        return losses(self.model, x, y, state, think_steps)


def train_step(model, optimizer, x, y, state, cfg: RunConfig, think_steps=None, scaler=None):
    """
    One optimizer step on the windows (x, y), in train.grad_accum_steps micro-batches whose gradients add up
    (each loss divided by their number: the step equals one on all the windows at once). model: a GPT,
    compiled or not, or a DDP-wrapped Objective, which averages the gradients over the processes after the
    last micro-batch only. scaler: a GradScaler (float16 on CUDA). Returns the mean CE of the prediction as
    a tensor (no sync).
    """
    ddp = isinstance(model, DDP)
    objective = model if ddp else Objective(model)
    accum = cfg.train.grad_accum_steps
    optimizer.zero_grad(set_to_none=True)
    ce = 0.0
    for i, (xb, yb) in enumerate(zip(x.chunk(accum), y.chunk(accum))):
        with objective.no_sync() if ddp and i < accum - 1 else nullcontext():
            with autocast_context(cfg.train.dtype, x.device.type):
                terms = objective(xb, yb, state, think_steps)
                loss = total_loss(cfg.model, terms, think_steps) / accum
            (loss if scaler is None else scaler.scale(loss)).backward()
        ce = ce + terms["ce"].detach().mean()  # train_loss is the CE of the prediction, as val_loss
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        scaler.update()
    return ce / accum


@torch.no_grad()
def evaluate(model, data, cfg: RunConfig, device, procs=None):
    """
    Mean val cross-entropy after thinking (the prediction) and of System 1, on fixed val batches, in float32.
    With several processes (procs) each evaluates its share of every batch and the means are averaged: the
    same value as one process, on every process.
    """
    model.eval()
    gen = torch.Generator().manual_seed(cfg.train.seed)  # same batches each eval; the training RNG is untouched
    rank, world = (procs.rank, procs.world) if procs else (0, 1)
    total = torch.zeros(2, device=device)
    for _ in range(cfg.train.eval_iters):
        x, y = data.batch("val", cfg.data.batch_size, gen, device, rank, world)
        terms = losses(model, x, y)
        total += torch.stack([terms["ce"].mean(), terms["ce_s1"].mean()])
    model.train()
    if procs:
        total = procs.mean(total)
    val, val_s1 = (total / cfg.train.eval_iters).tolist()
    return val, val_s1


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


def setup(cfg: RunConfig, device=None, rank=0):
    """Check the config, pick the device (unless given), load the data, build the model, its optimizer and
    chain state. rank: this process's rank under torchrun; every rank builds the same weights."""
    check_config(cfg)
    device = device or pick_device(cfg.train.device)
    device_type = torch.device(device).type
    check_dtype(cfg.train.dtype, device_type)
    torch.manual_seed(cfg.train.seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data = Dataset(load_text(cfg.data.data_path), cfg.data.block_size)
    cfg.model.vocab_size = len(data.vocab)
    cfg.model.block_size = cfg.data.block_size
    model = GPT(cfg.model).to(device)
    optimizer = model.configure_optimizers(cfg.train.weight_decay, cfg.train.learning_rate,
                                           (cfg.train.beta1, cfg.train.beta2), device_type, cfg.train.think_lr_lr_mult)
    if rank:  # dropout, think noise and PCD chains differ between processes (rank 0 is a single process)
        torch.manual_seed(cfg.train.seed + rank)
    use_chains = (cfg.model.use_contrastive and cfg.model.contrastive_type != "cd") or cfg.model.replay_size > 0
    state = ChainState(cfg.model).to(device) if use_chains else None
    return device, data, model, optimizer, state


def train(cfg: RunConfig):
    """Train in this process; under torchrun every process runs this, with DDP."""
    procs = Processes(cfg.train.device)
    try:
        return train_processes(cfg, procs)
    finally:
        procs.close()  # the process group goes, however the run ends


def train_processes(cfg: RunConfig, procs: Processes):
    device, data, model, optimizer, state = setup(cfg, procs.device, procs.rank)
    if cfg.data.batch_size % procs.world:
        raise UserError(f"data.batch_size={cfg.data.batch_size} (the windows of a micro-batch, all processes "
                        f"together) is not divisible by the {procs.world} processes: use a multiple of {procs.world}")
    device_type = torch.device(device).type
    master = procs.master  # rank 0 alone logs and writes files
    out_dir = Path(cfg.out_dir)
    batch_gen = torch.Generator().manual_seed(cfg.train.seed)  # the same on every process
    scaler = grad_scaler(cfg.train.dtype, device_type)

    step, best_val, elapsed = 0, math.inf, 0.0
    if cfg.train.resume:
        ckpt = load_checkpoint(out_dir / "ckpt.pt", map_location=device)
        if ckpt["config"]["model"] != asdict(cfg.model) or ckpt["vocab"] != data.vocab.chars:
            raise UserError(f"{out_dir / 'ckpt.pt'} was trained with another model config or data; "
                            "resume with the same model.* and data.*, or drop train.resume")
        if not isinstance(ckpt.get("rng", {}).get("torch"), list):
            raise UserError(f"{out_dir / 'ckpt.pt'} has no per-process state (an older train.py wrote it); "
                            "start a new run without train.resume")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        rng, saved = ckpt["rng"], len(ckpt["rng"]["torch"])
        if procs.rank < saved:  # rank r continues the RNG and chains of rank r (one process: those of rank 0)
            torch.set_rng_state(rng["torch"][procs.rank].cpu())  # (map_location moved them to the device)
            if device_type == "cuda" and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"][procs.rank].cpu())
            if state is not None:
                state.load_state_dict(ckpt["chains"][procs.rank])
        batch_gen.set_state(rng["batch"].cpu())
        step, best_val, elapsed = ckpt["step"], ckpt["best_val"], ckpt["elapsed"]
        if master:
            print(f"resuming from {out_dir / 'ckpt.pt'} at step {step}")
            if procs.world > saved:
                print(f"note: ckpt.pt holds the state of {saved} processes; processes {saved}.. start new "
                      "RNG streams and chains")
    out_dir.mkdir(parents=True, exist_ok=True)

    def checkpoint(kind):
        """Every process calls this at the same step (ckpt.pt gathers their state); rank 0 writes."""
        if kind == "ckpt.pt":  # per process: its RNG states and chain state (PCD chains, fast weights, replay)
            own = {"torch": torch.get_rng_state()}
            if device_type == "cuda":
                own["cuda"] = torch.cuda.get_rng_state()
            if state is not None:
                own["chains"] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in state.state_dict().items()}
            ranks = procs.gather(own)
        if not master:
            return
        ckpt = {"model": model.state_dict(), "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
                "vocab": data.vocab.chars, "step": step, "best_val": best_val}
        if kind == "ckpt.pt":  # everything needed to continue the run exactly; entry r of each list: rank r
            ckpt["optimizer"] = optimizer.state_dict()
            ckpt["rng"] = {"batch": batch_gen.get_state(), "torch": [r["torch"] for r in ranks]}
            if device_type == "cuda":
                ckpt["rng"]["cuda"] = [r["cuda"] for r in ranks]
            if state is not None:
                ckpt["chains"] = [r["chains"] for r in ranks]
            if scaler is not None:
                ckpt["scaler"] = scaler.state_dict()
            ckpt["elapsed"] = elapsed + time.time() - t0
        save_checkpoint(ckpt, out_dir / kind)

    run = None
    if cfg.wandb_project and master:
        import wandb

        run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_name, dir=str(out_dir),
                         config=OmegaConf.to_container(OmegaConf.structured(cfg)))

    fwd = compiled(model, cfg)  # checkpoints always save `model`: clean keys
    if procs.world > 1:
        # with no think step the energy's own parameters (mixture g, candidate slots, a learned step size)
        # get no gradient, and DDP must be told to look for them
        fwd = DDP(Objective(fwd), device_ids=[torch.device(device)] if device_type == "cuda" else None,
                  find_unused_parameters=cfg.model.think_steps == 0)
    rows = cfg.data.batch_size * cfg.train.grad_accum_steps  # windows per optimizer step, all processes
    tokens_per_step = rows * cfg.data.block_size
    if master:
        print(f"{model.num_params() / 1e6:.2f}M parameters, vocab {len(data.vocab)}, device {device}"
              f"{f' x {procs.world} processes' if procs.world > 1 else ''}, {rows} windows per step, "
              f"{cfg.train.dtype}, think_steps {cfg.model.think_steps}, out_dir {out_dir}")
    metrics_file = open(out_dir / "metrics.jsonl", "a" if cfg.train.resume else "w") if master else None
    stop = StopRequest()
    bar = tqdm(total=cfg.train.max_steps, initial=step, dynamic_ncols=True, desc="train", disable=not master)
    t0 = time.time()
    t_log, loss_sum, n_sum = time.time(), torch.zeros((), device=device), 0
    try:
        while step < cfg.train.max_steps:
            if procs.any(stop.signal is not None):  # every process stops at the same step
                checkpoint("ckpt.pt")
                bar.close()
                raise UserError(f"interrupted at step {step}; saved {out_dir / 'ckpt.pt'}: "
                                "continue with the same command plus train.resume=true")
            lr = get_lr(step, cfg.train)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_mult", 1.0)
            x, y = data.batch("train", rows, batch_gen, device, procs.rank, procs.world)
            loss_sum += train_step(fwd, optimizer, x, y, state, cfg, scaler=scaler)
            step += 1
            n_sum += 1

            if step % cfg.train.log_interval == 0 or step == cfg.train.max_steps:
                # the only sync between evals; averaged over the processes, so a NaN on any one stops all
                train_loss = procs.mean(loss_sum).item() / n_sum
                if not math.isfinite(train_loss):
                    raise UserError(f"the training loss became {train_loss} before step {step}; the last good "
                                    f"checkpoint ({out_dir / 'ckpt.pt'}) is kept: lower train.learning_rate")
                dt = time.time() - t_log
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{cfg.train.log_interval * tokens_per_step / dt:.0f}")
                bar.update(step - bar.n)
                t_log = time.time()

            if step % cfg.train.eval_interval == 0 or step == cfg.train.max_steps:
                val, val_s1 = evaluate(model, data, cfg, device, procs)
                train_loss = procs.mean(loss_sum).item() / n_sum
                loss_sum.zero_()
                n_sum = 0
                if not math.isfinite(val):
                    raise UserError(f"the val loss became {val} at step {step}; the last good checkpoint "
                                    f"({out_dir / 'ckpt.pt'}) is kept: lower train.learning_rate")
                row = {"step": step, "val_loss": val, "val_loss_s1": val_s1, "train_loss": train_loss,
                       "lr": lr, "time_s": round(elapsed + time.time() - t0, 2)}
                if master:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                    if run is not None:
                        run.log(row, step=step)
                    bar.write(f"step {step}: train {train_loss:.4f}, val {val:.4f} (System 1 {val_s1:.4f})")
                if val < best_val:  # val is the same on every process: they agree
                    best_val = val
                    checkpoint("best.pt")
                checkpoint("ckpt.pt")
        checkpoint("final.pt")
    finally:
        fwd = None  # the DDP wrapper goes before its process group (train() destroys that next): a reducer
        # outliving its group can abort the process at exit, and an exception's traceback would keep it alive
        bar.close()
        stop.restore()
        if metrics_file is not None:
            metrics_file.close()
        if run is not None:
            run.finish()
    if master:
        print(f"done: {step} steps in {elapsed + time.time() - t0:.1f}s, best val loss {best_val:.4f}, "
              f"saved {out_dir / 'final.pt'}")
    return best_val


@hydra.main(version_base="1.3", config_path="config", config_name="train")
def main(cfg):
    run(train, cfg)


if __name__ == "__main__":
    check_overrides("train", sys.argv[1:])
    main()
