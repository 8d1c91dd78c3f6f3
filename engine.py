"""
What train.py's loop and bench.py's timings drive: a training run's config schema (RunConfig) and
the checks of that config, setup (data, model, optimizer, chain state), the learning rate, one
training step, the val loss, mixed precision and torch.compile. (Checkpoint files, and a trained
model loaded from one, are checkpoints.py's.)
"""

import math
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from hydra.core.config_store import ConfigStore
from torch.nn.parallel import DistributedDataParallel as DDP

import contrastive
import corpora  # noqa: F401  (adds its corpora to data.WRITERS)
import dyck  # noqa: F401  (adds dyck.txt to data.WRITERS)
from contrastive import ReplayState, replay_windows
from data import DataConfig, Dataset, load_text
from ebm import losses, total_loss
from energies import compile_dE_dp  # importing energies adds its energies to ebm.ENERGIES
from model import GPT, ModelConfig
from util import UserError, pick_device


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
    # learning rate of a learned think step size (model.think_lr_learnable), x lr
    think_lr_lr_mult: float = 10.0
    eval_interval: int = 250
    eval_iters: int = 20  # val batches per evaluation (the same batches every time)
    log_interval: int = 10  # steps between progress-bar updates (and the NaN check)
    # micro-batches of data.batch_size windows per optimizer step (gradients add up)
    grad_accum_steps: int = 1
    # float32 | bfloat16 | float16: autocast of the forward; weights stay float32
    dtype: str = "float32"
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

CHOICES = {  # model.* keys that name one of a few options
    "energy": ("linear", "mixture", "transformer"), "contrastive_type": ("cd", "pcd", "fast_pcd"),
    "think_rule": ("free_energy", "ebt"), "think_start": ("s1", "noise", "zeros"),
    "think_clip": ("hard", "smooth"), "verify_by": ("free_energy", "energy"),
    "cand_embed": ("wte", "linear")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_config(cfg: RunConfig):
    """Impossible values fail here with one line, before any work is done."""
    if cfg.model.refine_steps is not None:  # the predecessor's name for think_steps
        cfg.model.think_steps = cfg.model.refine_steps
    problems = model_problems(cfg.model) + train_problems(cfg)
    problems += inert_options(cfg)
    if problems:
        raise UserError("; ".join(problems))


def model_problems(m):
    """What is impossible in the model keys, one phrase each."""
    problems = []
    if m.n_layer < 1 or m.n_head < 1 or m.n_embd < 1:
        problems.append("model.n_layer, model.n_head and model.n_embd must be >= 1")
    elif m.n_embd % m.n_head:
        problems.append(f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}")
    for key, allowed in CHOICES.items():
        if getattr(m, key) not in allowed:
            problems.append(f"model.{key}={getattr(m, key)} must be one of {', '.join(allowed)}")
    for key in ("think_steps", "contrastive_k"):
        if getattr(m, key) < 0:
            problems.append(f"model.{key}={getattr(m, key)} must be >= 0")
    for key in ("softmax_temperature", "think_lr", "think_max_move", "n_persistent",
                "think_samples", "mixture_hidden"):
        if getattr(m, key) <= 0:
            problems.append(f"model.{key}={getattr(m, key)} must be > 0")
    if not 0 <= m.dropout < 1:
        problems.append(f"model.dropout={m.dropout} must be in [0, 1)")
    return problems + thinking_problems(m)


def thinking_problems(m):
    """What is impossible in the thinking, energy, replay and contrastive keys, one phrase each."""
    problems = []
    if (m.entropy_weight < 0 or m.think_noise < 0 or m.langevin_step_size < 0
            or m.langevin_noise_scale < 0):
        problems.append("model.entropy_weight, think_noise, langevin_step_size, "
                        "langevin_noise_scale must be >= 0")
    if m.langevin_temperature is not None and m.langevin_temperature < 0:
        problems.append(f"model.langevin_temperature={m.langevin_temperature} must be >= 0 "
                        "(or null: the model's T)")
    if m.use_contrastive and m.contrastive_type == "fast_pcd" and m.energy == "transformer":
        problems.append("model.contrastive_type=fast_pcd adds fast weights to the linear head W_E, "
                        "which the transformer energy does not use: use pcd, or energy linear or "
                        "mixture")
    if not 0 <= m.energy_layers <= m.n_layer:
        problems.append(f"model.energy_layers={m.energy_layers} must be in 0..model.n_layer "
                        "(0 = all blocks)")
    if m.replay_size < 0 or not 0 <= m.replay_frac <= 1:
        problems.append("model.replay_size must be >= 0 and model.replay_frac in [0, 1]")
    if m.think_lr_spread < 1:
        problems.append(f"model.think_lr_spread={m.think_lr_spread} must be >= 1 (1 = off)")
    if not 1 <= m.think_steps_min <= max(1, m.think_steps):
        problems.append(f"model.think_steps_min={m.think_steps_min} must be in "
                        "1..model.think_steps")
    if not 0 <= m.think_lr_jitter < 1:
        problems.append(f"model.think_lr_jitter={m.think_lr_jitter} must be in [0, 1)")
    if not 0 <= m.pcd_reinit_prob <= 1 or not 0 <= m.fast_weight_decay <= 1:
        problems.append("model.pcd_reinit_prob and model.fast_weight_decay must be in [0, 1]")
    return problems


def train_problems(cfg: RunConfig):
    """What is impossible in the train and data keys, one phrase each."""
    t, problems = cfg.train, []
    if t.max_steps < 1 or t.eval_interval < 1 or t.eval_iters < 1 or t.log_interval < 1:
        problems.append("train.max_steps, eval_interval, eval_iters and log_interval must be >= 1")
    if t.learning_rate <= 0 or t.min_lr < 0 or t.warmup_steps < 0 or t.think_lr_lr_mult < 0:
        problems.append("train.learning_rate must be > 0; train.min_lr, warmup_steps, "
                        "think_lr_lr_mult >= 0")
    if t.grad_accum_steps < 1:
        problems.append(f"train.grad_accum_steps={t.grad_accum_steps} must be >= 1")
    if t.dtype not in DTYPES:
        problems.append(f"train.dtype={t.dtype} must be one of {', '.join(DTYPES)}")
    if cfg.data.batch_size < 1 or cfg.data.block_size < 1:
        problems.append("data.batch_size and data.block_size must be >= 1")
    return problems


def inert_options(cfg: RunConfig):
    """Options set away from their default where they would do nothing: one problem each."""
    m, t, default = cfg.model, cfg.train, ModelConfig()
    thinking = ("think_steps_random", "think_lr_jitter", "think_noise", "think_truncate",
                "ce_all_steps", "think_lr_learnable", "replay_size", "replay_frac", "think_rule",
                "think_start", "think_detach", "think_lr_spread", "think_step_embed")
    contrastive = ("contrastive_type", "contrastive_weight", "contrastive_k", "contrastive_reg",
                   "langevin_step_size", "langevin_noise_scale", "langevin_temperature",
                   "n_persistent", "pcd_reinit_prob", "fast_weight_lr", "fast_weight_decay")
    no_graph = "model.think_truncate=true (the earlier steps carry no graph)"
    rules = [  # (keys, whether they act, the setting under which they do nothing)
        (thinking, m.think_steps > 0, "model.think_steps=0 (no thinking)"),
        (("ce_all_steps",), not m.think_truncate, no_graph),
        (("replay_frac",), replay_windows(m) > 0,
         "model.replay_size=0 and no PCD (no replay buffer)"),
        (("think_steps_min",), m.think_steps_random, "model.think_steps_random=false"),
        (("think_detach",), not m.think_truncate, no_graph),
        (("think_max_move", "think_clip"), m.think_rule == "free_energy",
         f"model.think_rule={m.think_rule}"),
        (("cand_embed", "think_step_embed"), m.energy == "transformer", f"model.energy={m.energy}"),
        (("mixture_hidden", "mixture_stopgrad"), m.energy == "mixture", f"model.energy={m.energy}"),
        (("energy_layers",), m.energy == "transformer", f"model.energy={m.energy}"),
        (contrastive, m.use_contrastive, "model.use_contrastive=false"),
        (("n_persistent", "pcd_reinit_prob"), m.contrastive_type != "cd",
         "model.contrastive_type=cd (chains start at the data)"),
        (("n_persistent",), m.replay_size == 0,
         f"model.replay_size={m.replay_size} (the replay buffer's size)"),
        (("fast_weight_lr", "fast_weight_decay"), m.contrastive_type == "fast_pcd",
         f"model.contrastive_type={m.contrastive_type}"),
    ]
    inert = {}  # key -> the first reason it does nothing
    for keys, acts, why in rules:
        for k in keys:
            if not acts and getattr(m, k) != getattr(default, k):
                inert.setdefault(k, why)
    problems = [f"model.{k}={str(getattr(m, k)).lower()} does nothing with {why}: drop it"
                for k, why in inert.items()]
    if not m.think_lr_learnable and t.think_lr_lr_mult != TrainConfig().think_lr_lr_mult:
        problems.append(f"train.think_lr_lr_mult={t.think_lr_lr_mult} does nothing without "
                        "model.think_lr_learnable=true: drop it")
    return problems


def get_lr(step, t: TrainConfig):
    """Linear warmup, then cosine decay from learning_rate to min_lr at max_steps (or constant)."""
    if step < t.warmup_steps:
        return t.learning_rate * (step + 1) / t.warmup_steps
    if not t.decay_lr:
        return t.learning_rate
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    decay = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return t.min_lr + decay * (t.learning_rate - t.min_lr)


# -------------------------------------------------------------------------------------------------
# mixed precision and torch.compile (bench.py uses these too)


def check_dtype(dtype, device_type, energy="linear"):
    """The mixed precision this device (and energy) can train in, or one line of cause and
    remedy."""
    if dtype == "float16" and device_type != "cuda":
        raise UserError(f"train.dtype=float16 needs loss scaling, which nanoEBM does on CUDA only; "
                        f"on {device_type} use train.dtype=bfloat16 (float32's range, no scaling "
                        "needed) or float32")
    if dtype == "float16" and energy == "transformer":
        # the think steps take dE/dp with an inner torch.autograd.grad under autocast; the
        # GradScaler scales the loss, not that inner gradient, whose float16 backward through the
        # candidate slots can underflow
        raise UserError("train.dtype=float16 with model.energy=transformer would take dE/dp in "
                        "float16 without loss scaling (it can underflow): use train.dtype=bfloat16 "
                        "(float32's range) or float32")
    if dtype == "bfloat16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bfloat16: use train.dtype=float16 (with loss scaling) or "
                        "float32")


def allow_tf32():
    """float32 matmuls on CUDA may use TF32 tensor cores (10-bit mantissa, float32 range; Ampere
    and newer): the float32 parts of training (train.dtype=float32, the energy head, the val loss)
    run several times faster. torch >= 2.9 sets this per backend with fp32_precision and deprecates
    allow_tf32; older torch has only allow_tf32. The model has no convolutions, so cuDNN's setting
    does not matter."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True


def autocast_context(dtype, device_type):
    """Autocast the forward: matmuls in dtype, reductions and softmaxes in float32; weights and
    AdamW stay float32 (the master weights, which checkpoints save). float32: no autocast."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type, dtype=DTYPES[dtype])


def grad_scaler(dtype, device_type):
    """float16 gradients underflow without loss scaling; bfloat16 has float32's range and needs
    none."""
    if dtype == "float16" and device_type == "cuda":
        return torch.amp.GradScaler(device_type)
    return None


def compiled(model, cfg: RunConfig):
    """
    What the training step calls: model, or with train.compile a torch.compile of its forward, the
    pass over the observed tokens, and for the transformer energy the candidate pass with its dE/dp
    as one compiled function (energies.compile_dE_dp; training differentiates dE/dp again, and
    AOTAutograd, the autograd of torch.compile, supports no double backward, so the inner gradient
    is traced into the graph instead; the steps without a graph, S2's truncated ones, use it too).
    The energy head and the think steps stay eager, and so does evaluation. It sets
    model.compiled_dE_dp: a model trained compiled keeps it. Checkpoints save `model` itself, so
    their keys stay clean (no `_orig_mod.`).
    """
    if not cfg.train.compile:
        return model
    device_type = next(model.parameters()).device.type
    if device_type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        print("note: train.compile=true on CPU needs a C++ compiler (torch.compile's inductor "
              "builds C++) and none is on PATH: training eager (install g++ or clang to compile)")
        return model
    if device_type == "cuda" and not (os.environ.get("CC")
                                      or any(shutil.which(c) for c in ("gcc", "clang"))):
        # Triton builds a small C launcher with $CC, else gcc or clang (triton/runtime/build.py)
        print("note: train.compile=true on CUDA needs a C compiler (Triton builds a small C "
              "helper when it first compiles) and none is on PATH: training eager (install gcc or "
              "clang, or set CC, to compile)")
        return model
    # inductor's Metal backend is experimental; eager MPS is the tested path
    if device_type == "mps":
        print("note: train.compile=true is not used on MPS (torch.compile's MPS backend is "
              "experimental): training eager")
        return model
    try:
        if cfg.model.energy == "transformer":
            compile_dE_dp(model)
        return torch.compile(model)
    except RuntimeError as err:  # e.g. a Python version that torch.compile does not support yet
        raise UserError(f"torch.compile is not available here ({err}); drop "
                        "train.compile") from None


# -------------------------------------------------------------------------------------------------
# the training step and evaluation


class Objective(nn.Module):
    """
    The loss terms of a batch as one module call (DDP synchronises the gradients of what its forward
    runs), the loss chosen once: ebm.losses, or contrastive.losses where a replay buffer or
    contrastive divergence is configured (state: their ReplayState, not a submodule, so that DDP
    leaves each process's chains its own). model: a GPT or its compiled forward.
    """

    def __init__(self, model, state=None):
        super().__init__()
        self.model = model
        extras = state is not None or model.config.use_contrastive
        self.losses = partial(contrastive.losses, state=state) if extras else losses

    def forward(self, x, y):
        return self.losses(self.model, x, y)


def train_step(objective, optimizer, x, y, cfg: RunConfig, scaler=None):
    """
    One optimizer step on the windows (x, y), in train.grad_accum_steps micro-batches whose
    gradients add up (each loss divided by their number: the step equals one on all the windows at
    once). objective: an Objective, or a DDP-wrapped one, which averages the gradients over the
    processes after the last micro-batch only. scaler: a GradScaler (float16 on CUDA).
    Returns tensors (no sync): train_loss, the mean CE of the prediction, and with contrastive
    divergence energy_gap, the mean E_neg - E_pos.
    """
    ddp = isinstance(objective, DDP)
    accum = cfg.train.grad_accum_steps
    optimizer.zero_grad(set_to_none=True)
    metrics = {}
    for i, (xb, yb) in enumerate(zip(x.chunk(accum), y.chunk(accum))):
        with objective.no_sync() if ddp and i < accum - 1 else nullcontext():
            with autocast_context(cfg.train.dtype, x.device.type):
                terms = objective(xb, yb)
                loss = total_loss(cfg.model, terms) / accum
            (loss if scaler is None else scaler.scale(loss)).backward()
        # train_loss is the CE of the prediction, as val_loss
        for name, term in (("train_loss", "ce"), ("energy_gap", "cd_gap")):
            if term in terms:
                metrics[name] = metrics.get(name, 0.0) + terms[term].detach().mean() / accum
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.train.grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        scaler.update()
    return metrics


@torch.no_grad()
def evaluate(model, data, cfg: RunConfig, device, procs=None):
    """
    Mean val cross-entropy after thinking (the prediction) and of System 1, on fixed val batches,
    in float32. With several processes (procs) each evaluates its share of every batch and the
    means are averaged: the same value as one process, on every process.
    """
    model.eval()
    # the same batches each eval; the training RNG is untouched
    gen = torch.Generator().manual_seed(cfg.train.seed)
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


@dataclass
class Run:
    """A training run's parts, as setup builds them and ckpt.pt saves them."""

    device: str
    data: Dataset
    model: GPT
    optimizer: torch.optim.Optimizer
    state: Optional[ReplayState]  # replay buffer, PCD chains, fast weights (None: none configured)
    scaler: Optional[torch.amp.GradScaler]  # float16 loss scaling on CUDA, else None
    batch_gen: torch.Generator  # draws the training batches: the same on every process


def setup(cfg: RunConfig, device=None, rank=0, world=1):
    """Check the config, pick the device (unless given), load the data, build the model, its
    optimizer and chain state: a Run. rank, world: this process's rank and the number of processes
    under torchrun; every rank builds the same weights."""
    check_config(cfg)
    if cfg.data.batch_size % world:
        raise UserError(f"data.batch_size={cfg.data.batch_size} (the windows of a micro-batch, all "
                        f"processes together) is not divisible by the {world} processes: use a "
                        f"multiple of {world}")
    device = device or pick_device(cfg.train.device)
    device_type = torch.device(device).type
    check_dtype(cfg.train.dtype, device_type, cfg.model.energy)
    torch.manual_seed(cfg.train.seed)
    if device_type == "cuda":
        allow_tf32()
    val = load_text(cfg.data.val_path) if cfg.data.val_path else None
    data = Dataset(load_text(cfg.data.data_path), cfg.data.block_size, val)
    cfg.model.vocab_size = len(data.vocab)
    cfg.model.block_size = cfg.data.block_size
    model = GPT(cfg.model).to(device)
    t = cfg.train
    optimizer = model.configure_optimizers(t.weight_decay, t.learning_rate, (t.beta1, t.beta2),
                                           device_type, t.think_lr_lr_mult)
    # dropout, think noise and PCD chains differ between processes (rank 0 is a single process)
    if rank:
        torch.manual_seed(cfg.train.seed + rank)
    state = ReplayState(cfg.model).to(device) if replay_windows(cfg.model) > 0 else None
    return Run(device, data, model, optimizer, state, grad_scaler(t.dtype, device_type),
               torch.Generator().manual_seed(t.seed))
