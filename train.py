"""
Train nanoEBM: `uv run train.py [overrides]`, e.g. `uv run train.py model.use_contrastive=true`.
Config: config/train.yaml (schema: the dataclasses below). Writes only into out_dir.
"""

import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from tqdm import tqdm

from data import DataConfig, Dataset, load_text
from ebm import ChainState, losses, total_loss
from model import GPT, ModelConfig
from util import UserError, check_overrides, load_checkpoint, pick_device, run, save_checkpoint


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
    device: str = "auto"  # auto = cuda > mps > cpu
    compile: bool = False  # torch.compile the model
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


def train_step(model, optimizer, x, y, state, cfg: RunConfig, think_steps=None):
    """One optimizer step on batch (x, y); returns the CE of the prediction as a tensor (no sync)."""
    terms = losses(model, x, y, state, think_steps)
    loss = total_loss(cfg.model, terms, think_steps)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()
    return terms["ce"].detach().mean()  # train_loss is the CE of the prediction, as val_loss


@torch.no_grad()
def evaluate(model, data, cfg: RunConfig, device):
    """Mean val cross-entropy after thinking (the prediction) and of System 1, on fixed val batches."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.train.seed)  # same batches each eval; the training RNG is untouched
    total = torch.zeros(2, device=device)
    for _ in range(cfg.train.eval_iters):
        x, y = data.batch("val", cfg.data.batch_size, gen, device)
        terms = losses(model, x, y)
        total += torch.stack([terms["ce"].mean(), terms["ce_s1"].mean()])
    model.train()
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


def setup(cfg: RunConfig):
    """Check the config, pick the device, load the data, build the model, its optimizer and chain state."""
    check_config(cfg)
    device = pick_device(cfg.train.device)
    device_type = torch.device(device).type
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
    use_chains = (cfg.model.use_contrastive and cfg.model.contrastive_type != "cd") or cfg.model.replay_size > 0
    state = ChainState(cfg.model).to(device) if use_chains else None
    return device, data, model, optimizer, state


def train(cfg: RunConfig):
    device, data, model, optimizer, state = setup(cfg)
    device_type = torch.device(device).type
    out_dir = Path(cfg.out_dir)
    batch_gen = torch.Generator().manual_seed(cfg.train.seed)

    step, best_val, elapsed = 0, math.inf, 0.0
    if cfg.train.resume:
        ckpt = load_checkpoint(out_dir / "ckpt.pt", map_location=device)
        if ckpt["config"]["model"] != asdict(cfg.model) or ckpt["vocab"] != data.vocab.chars:
            raise UserError(f"{out_dir / 'ckpt.pt'} was trained with another model config or data; "
                            "resume with the same model.* and data.*, or drop train.resume")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if state is not None:
            state.load_state_dict(ckpt["chains"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device_type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        batch_gen.set_state(ckpt["rng"]["batch"])
        step, best_val, elapsed = ckpt["step"], ckpt["best_val"], ckpt["elapsed"]
        print(f"resuming from {out_dir / 'ckpt.pt'} at step {step}")
    out_dir.mkdir(parents=True, exist_ok=True)

    def checkpoint(kind):
        ckpt = {"model": model.state_dict(), "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
                "vocab": data.vocab.chars, "step": step, "best_val": best_val}
        if kind == "ckpt.pt":  # everything needed to continue the run exactly
            ckpt["optimizer"] = optimizer.state_dict()
            ckpt["rng"] = {"torch": torch.get_rng_state(), "batch": batch_gen.get_state()}
            if device_type == "cuda":
                ckpt["rng"]["cuda"] = torch.cuda.get_rng_state()
            ckpt["elapsed"] = elapsed + time.time() - t0
            if state is not None:
                ckpt["chains"] = state.state_dict()
        save_checkpoint(ckpt, out_dir / kind)

    run = None
    if cfg.wandb_project:
        import wandb

        run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_name, dir=str(out_dir),
                         config=OmegaConf.to_container(OmegaConf.structured(cfg)))

    fwd = torch.compile(model) if cfg.train.compile else model  # checkpoints always save `model`: clean keys
    tokens_per_step = cfg.data.batch_size * cfg.data.block_size
    print(f"{model.num_params() / 1e6:.2f}M parameters, vocab {len(data.vocab)}, device {device}, "
          f"think_steps {cfg.model.think_steps}, out_dir {out_dir}")
    metrics_file = open(out_dir / "metrics.jsonl", "a" if cfg.train.resume else "w")
    stop = StopRequest()
    bar = tqdm(total=cfg.train.max_steps, initial=step, dynamic_ncols=True, desc="train")
    t0 = time.time()
    t_log, loss_sum, n_sum = time.time(), torch.zeros((), device=device), 0
    try:
        while step < cfg.train.max_steps:
            if stop.signal is not None:
                checkpoint("ckpt.pt")
                bar.close()
                raise UserError(f"interrupted at step {step}; saved {out_dir / 'ckpt.pt'}: "
                                "continue with the same command plus train.resume=true")
            lr = get_lr(step, cfg.train)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_mult", 1.0)
            x, y = data.batch("train", cfg.data.batch_size, batch_gen, device)
            loss_sum += train_step(fwd, optimizer, x, y, state, cfg)
            step += 1
            n_sum += 1

            if step % cfg.train.log_interval == 0 or step == cfg.train.max_steps:
                train_loss = loss_sum.item() / n_sum  # the only sync between evals
                if not math.isfinite(train_loss):
                    raise UserError(f"the training loss became {train_loss} before step {step}; the last good "
                                    f"checkpoint ({out_dir / 'ckpt.pt'}) is kept: lower train.learning_rate")
                dt = time.time() - t_log
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{cfg.train.log_interval * tokens_per_step / dt:.0f}")
                bar.update(step - bar.n)
                t_log = time.time()

            if step % cfg.train.eval_interval == 0 or step == cfg.train.max_steps:
                val, val_s1 = evaluate(model, data, cfg, device)
                train_loss = loss_sum.item() / n_sum
                loss_sum.zero_()
                n_sum = 0
                if not math.isfinite(val):
                    raise UserError(f"the val loss became {val} at step {step}; the last good checkpoint "
                                    f"({out_dir / 'ckpt.pt'}) is kept: lower train.learning_rate")
                row = {"step": step, "val_loss": val, "val_loss_s1": val_s1, "train_loss": train_loss,
                       "lr": lr, "time_s": round(elapsed + time.time() - t0, 2)}
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                if run is not None:
                    run.log(row, step=step)
                bar.write(f"step {step}: train {train_loss:.4f}, val {val:.4f} (System 1 {val_s1:.4f})")
                if val < best_val:
                    best_val = val
                    checkpoint("best.pt")
                checkpoint("ckpt.pt")
        checkpoint("final.pt")
    finally:
        bar.close()
        stop.restore()
        metrics_file.close()
        if run is not None:
            run.finish()
    print(f"done: {step} steps in {elapsed + time.time() - t0:.1f}s, best val loss {best_val:.4f}, "
          f"saved {out_dir / 'final.pt'}")
    return best_val


@hydra.main(version_base="1.3", config_path="config", config_name="train")
def main(cfg):
    run(train, cfg)


if __name__ == "__main__":
    check_overrides("train", sys.argv[1:])
    main()
