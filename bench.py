"""
What thinking costs, counted and measured side by side: `uv run bench.py [train overrides] [bench.*
options]`.

1. Per mode (bench.modes: plain = think_steps 0, the three energies at the configured think_steps,
   and the EBT recipes of config/preset): FLOPs per training step, counted by torch's FLOP counter
   over real steps (matmuls and attention, forward, backward and double backward; elementwise work
   counts zero; the model's math, as MFU counts: what EBT's recomputation of its candidate slots
   adds, model.Recompute, is printed below the table), and ms/step and tokens/s, the modes
   interleaved (plain, linear, ..., plain, linear, ...) so that a noisy machine slows all alike;
   the median of bench.repeats windows. Ratios are
   against plain, both counted and timed. With train.compile=true every mode trains compiled
   (engine.compiled) and, with bench.also_eager (the default), eager beside it in the same
   interleaving (rows "ebt eager": ratios against "plain eager").
2. Model FLOPs utilisation: plain's counted FLOP/s as a fraction of a matmul peak measured here in
   train.dtype, on the same machine, a moment before.
3. Training tokens/s of the command's model (the config as composed, no mode applied) in float32
   eager, compiled (train.compile, with bench.compile) and each of bench.dtypes (default bfloat16),
   interleaved.
4. Generation (greedy, batch 1, KV cache, eager), per mode: tokens/s, and counted FLOPs and aten
   ops per token, thinking bench.gen_think_steps steps (plain: none); and the command's model
   without the cache and compiled.
5. Peak memory of a training step per mode, on every device: the most bytes of live tensors at once,
   counted at dispatch as CUDA's max_memory_allocated counts them (MemoryCount; eager), and its
   ratio to plain's; with bench.profile, where they go. On CUDA also the allocator's own peak per
   setting; elsewhere the process's peak resident set for the run.
The modes apply their model keys on top of the command's config: give shapes and training keys, not
a preset of the recipes. bench.profile=true prints where the time of each mode's training step and
of a generated token goes (torch.profiler, by operator; on CUDA by kernel time), and where each
mode's peak memory goes (by the op and shape that made each tensor). Prints tables and writes
bench.json (in out_dir).
"""

import copy
import json
import resource
import statistics
import sys
import time
import weakref
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import List

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from ebm import generate, system2_logits
from engine import (DTYPES, Objective, RunConfig, check_dtype, compiled, grad_scaler, setup,
                    train_step)
from util import UserError, check_overrides, run, sync


def preset_model_keys(name):
    """The model keys of config/preset/NAME.yaml."""
    return OmegaConf.to_container(OmegaConf.load(Path(__file__).parent / "config" / "preset"
                                                 / f"{name}.yaml"))["model"]


# what each mode sets in the command's config (model keys)
MODES = {"plain": {"think_steps": 0}, "linear": {"energy": "linear"},
         "mixture": {"energy": "mixture"},
         "transformer": {"energy": "transformer"}, "ebt": preset_model_keys("ebt"),
         "ebt_s2": preset_model_keys("ebt_s2")}


@dataclass
class BenchConfig:
    # plain is always measured: the ratios' base
    modes: List[str] = field(default_factory=lambda: list(MODES))
    steps: int = 10  # training steps per timed window
    repeats: int = 5  # timed windows per setting; the median is reported
    warmup: int = 5  # untimed steps first (allocator, caches, compiling)
    gen_think_steps: int = 4  # generation: every mode but plain thinks this many steps per token
    gen_tokens: int = 256  # tokens per generation measurement
    # also time compiled training and generation (compiling takes a while, once)
    compile: bool = True
    # with train.compile=true, time each mode eager too, beside its compiled steps
    also_eager: bool = True
    # mixed precision timed against float32
    dtypes: List[str] = field(default_factory=lambda: ["bfloat16"])
    # print torch.profiler tables of each mode's training steps and of the command's model generating
    profile: bool = False


@dataclass
class BenchRun(RunConfig):
    bench: BenchConfig = field(default_factory=BenchConfig)


ConfigStore.instance().store(name="bench_schema", node=BenchRun)


def peak_memory_mb(device):
    """Peak allocated memory since the last reset on CUDA; the process's peak resident set
    elsewhere."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def timed(fn, repeats):
    """Median seconds of fn() over repeats calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(device, dtype="float32", repeats=10):
    """
    FLOP/s of n x n x n matmuls in dtype (train.dtype, the precision training's matmuls run in): the
    device's practical peak for dense math. CPU: n = 1024, one matmul per timing. A GPU needs big
    matmuls (n = 4096) and many per synchronisation (20) to reach its peak, or launch and sync
    overheads would be timed instead.
    """
    gpu = torch.device(device).type != "cpu"
    n, calls = (4096, 20) if gpu else (1024, 1)
    a, b = (torch.randn(n, n, device=device, dtype=DTYPES[dtype]) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)

    def mm():
        for _ in range(calls):
            a @ b
        sync(device)

    return 2 * n**3 * calls / timed(mm, repeats)


class FlopCount(TorchDispatchMode):
    """Counts FLOPs at dispatch with the formulas of torch's FLOP counter
    (torch.utils.flop_counter): every matmul and attention call, forward, backward and the think
    steps' double backward; elementwise work counts zero. (FlopCounterMode itself tracks modules
    with hooks that autograd.grad, used by the transformer energy's dE/dp, refuses.) And the aten
    ops dispatched (ops): a generated token's ops are tiny, and on CPU each costs about a
    microsecond whatever its size, so their number rather than the FLOPs sets the speed."""

    def __init__(self):
        super().__init__()
        self.flops, self.ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        if func.overloadpacket in flop_registry:
            self.flops += flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        return out


def counted_flops(fn):
    """The FLOPs of fn() (FlopCount)."""
    with FlopCount() as counter:
        fn()
    return counter.flops


ALIVE_BEFORE = "alive before"  # MemoryCount's name for the storages a window finds


class MemoryCount(TorchDispatchMode):
    """
    Live tensor bytes, counted as CUDA's max_memory_allocated counts them but on any device (on CPU
    torch keeps no such count, and the resident set holds the allocator's caches and the libraries
    too): each storage once, however many views share it, added when an op returns it and taken off
    when it is freed (a weakref callback on the storage). A storage alive before (parameters,
    optimizer state, the batch) counts from the first op that reads it, and is added to the peak
    too: it was alive all along. peak: the most bytes alive at once; now: those alive;
    at_peak: the bytes alive at the peak by what made them, "op (shape) dtype" -> [storages, bytes],
    the op prefixed in a backward by the node whose backward ran it ("ExpBackward0: mul (...)"),
    and "alive before" for the storages the window found: where the memory goes. Temporaries
    inside one kernel are not tensors and do not count (nor do they on CUDA, but for workspaces).
    """

    def __init__(self):
        super().__init__()
        self.live = {}  # storage id -> (weakref to it, bytes, what made it)
        self.now, self.peak = 0, 0
        self.by_what, self.at_peak = {}, {}

    def add(self, label, nbytes, sign):
        """A storage of `label` made (sign 1) or freed (-1)."""
        count = self.by_what.setdefault(label, [0, 0])
        count[0] += sign
        count[1] += sign * nbytes
        self.now += sign * nbytes

    def count(self, t, label):
        """Count tensor t's storage, made by `label`, unless it is counted already; its bytes if
        new, else 0."""
        if not isinstance(t, torch.Tensor) or t.is_meta or t.layout != torch.strided:
            return 0
        storage = t.untyped_storage()
        key, nbytes = storage._cdata, storage.nbytes()
        if key in self.live or nbytes == 0:
            return 0

        def freed(_):
            if self.live.pop(key, None) is not None:
                self.add(label, nbytes, -1)

        self.live[key] = (weakref.ref(storage, freed), nbytes, label)
        self.add(label, nbytes, 1)
        return nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_flatten((args, kwargs))[0]:
            nbytes = self.count(t, ALIVE_BEFORE)
            if nbytes:  # alive before the window: alive at its peak too
                self.peak += nbytes
                seen = self.at_peak.setdefault(ALIVE_BEFORE, [0, 0])
                seen[0], seen[1] = seen[0] + 1, seen[1] + nbytes
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        node = torch._C._current_autograd_node()  # in a backward: the node whose backward runs
        name = f"{node.name()}: {name}" if node is not None else name
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.count(t, f"{name} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}")
        if self.now > self.peak:
            self.peak = self.now
            self.at_peak = {k: list(v) for k, v in self.by_what.items() if v[0]}
        return out


def mode_config(cfg, mode):
    """The command's config with the mode's model keys set."""
    if mode not in MODES:
        raise UserError(f"bench.modes: unknown mode {mode!r}; the modes are {', '.join(MODES)}")
    cfg = copy.deepcopy(cfg)
    for key, value in MODES[mode].items():
        setattr(cfg.model, key, value)
    return cfg


def interleaved(settings, batches, b, device):
    """
    settings: name -> (its objective (engine.Objective), its optimizer, its config). Each first
    runs b.warmup untimed steps (allocator, caches, compiling), then b.repeats windows of b.steps
    steps, the settings taking turns so that a noisy machine slows all alike. Per name: tokens/s
    and ms/step of the median window.
    """
    device_type = torch.device(device).type

    def window(name, n):
        objective, optimizer, cfg = settings[name]
        scaler = grad_scaler(cfg.train.dtype, device_type)
        sync(device)
        t0 = time.perf_counter()
        for i in range(n):
            x, y = batches[i % len(batches)]
            train_step(objective, optimizer, x, y, cfg, scaler)
        sync(device)
        return time.perf_counter() - t0

    out = {name: {"first_steps_s": window(name, b.warmup)} for name in settings}
    times = {name: [] for name in settings}
    for _ in range(b.repeats):
        for name in settings:
            if device_type == "cuda":  # each setting's own peak: reset outside the timed window
                torch.cuda.reset_peak_memory_stats()
            times[name].append(window(name, b.steps))
            if device_type == "cuda":
                out[name]["peak_memory_mb"] = max(out[name].get("peak_memory_mb", 0.0),
                                                  peak_memory_mb(device))
    for name, (_, _, cfg) in settings.items():
        med = statistics.median(times[name])
        tokens = b.steps * cfg.data.batch_size * cfg.data.block_size
        out[name].update({"tokens_per_s": tokens / med, "ms_per_step": 1000 * med / b.steps,
                          "runs_s": times[name]})
    return out


def bench_training(cfg, b):
    """Per mode: counted FLOPs per training step (the mean over b.steps steps: EBT's S2 draws its
    number of think steps; the model's math, model.recompute off), then over b.steps more steps
    the peak bytes of live tensors (MemoryCount) and the FLOPs that run (recomputation included),
    and ms/step, the modes interleaved, compiled with train.compile (the FLOPs and bytes are
    counted eager first: compiled kernels bypass the dispatcher), then with bench.also_eager each
    mode eager too ("ebt eager"); ratios against plain (compiled or eager as the row).
    Returns the table, each mode's setting (its objective, optimizer and config) and model, the
    data, the batches and the device."""
    settings, models, flops, flops_run, memory, batches = {}, {}, {}, {}, {}, None
    for mode in ["plain", *[m for m in b.modes if m != "plain"]]:
        c = mode_config(cfg, mode)
        run = setup(c)
        device, data, model, optimizer = run.device, run.data, run.model, run.optimizer
        if batches is None:
            gen = torch.Generator().manual_seed(cfg.train.seed)
            batches = [data.batch("train", cfg.data.batch_size, gen,
                                  device) for _ in range(b.steps)]
        objective = Objective(model, run.state)

        def steps():
            for x, y in batches:
                train_step(objective, optimizer, x, y, c)

        # the model's FLOPs: its math, without the candidate slots' recomputation (as MFU counts)
        recompute, model.config.recompute = model.config.recompute, False
        try:
            flops[mode] = counted_flops(steps) / len(batches)
        finally:
            model.config.recompute = recompute
        # eager, as the FLOPs; after the first steps, so that AdamW's state exists, as in a run;
        # and the FLOPs that run, recomputation included
        with FlopCount() as ran, MemoryCount() as kept:
            steps()
        memory[mode] = kept.peak, kept.at_peak
        flops_run[mode] = ran.flops / len(batches)
        settings[mode] = (Objective(compiled(model, c), run.state), optimizer, c)
        models[mode] = model
        if c.train.compile and b.also_eager:
            settings[f"{mode} eager"] = eager_setting(c)
    out = interleaved(settings, batches, b, device)
    for name, t in out.items():
        mode, eager = name.removesuffix(" eager"), name.endswith(" eager")
        t.update({"think_steps": settings[name][2].model.think_steps,
                  "params": models[mode].num_params(),
                  "flops_per_step": flops[mode], "flops_run_per_step": flops_run[mode],
                  "memory_bytes": memory[mode][0],
                  "memory_at_peak": memory[mode][1]})
        base = out["plain eager" if eager else "plain"]  # each against plain, compiled or not
        t["flops_ratio"] = t["flops_per_step"] / base["flops_per_step"]
        t["memory_ratio"] = t["memory_bytes"] / base["memory_bytes"]
        t["time_ratio"] = t["ms_per_step"] / base["ms_per_step"]
    return out, settings, models, data, batches, device


def eager_setting(cfg):
    """A mode's eager setting beside its compiled one: a model of its own (compiled() gave the
    other a compiled dE/dp, which its eager calls would take too), the same initial weights."""
    cfg = copy.deepcopy(cfg)
    cfg.train.compile = False
    run = setup(cfg)
    return Objective(run.model, run.state), run.optimizer, cfg


def bench_variants(cfg, b, batches, device):
    """Training tokens/s of the command's model: float32 eager, compiled, and each of b.dtypes.
    Returns the table and the model (generation times it next)."""
    run = setup(cfg)
    model, objective = run.model, Objective(run.model, run.state)
    f32 = copy.deepcopy(cfg)
    f32.train.dtype = "float32"  # the rows named float32 are float32 whatever train.dtype says
    settings = {"float32 eager": (objective, run.optimizer, f32)}
    # a model of its own: compiled() gives a transformer energy's model a compiled dE/dp
    if b.compile:
        c = copy.deepcopy(f32)
        c.train.compile = True
        c_run = setup(c)
        c_objective = Objective(compiled(c_run.model, c), c_run.state)
        settings["float32 compiled"] = (c_objective, c_run.optimizer, f32)
    for dtype in b.dtypes:
        c = copy.deepcopy(cfg)
        c.train.dtype = dtype
        # one line if this device cannot
        check_dtype(dtype, torch.device(device).type, cfg.model.energy)
        settings[f"{dtype} eager"] = (objective, run.optimizer, c)
    return interleaved(settings, batches, b, device), model


def profiled(fn, device):
    """Where the time of fn() goes, by operator (torch.profiler). On CUDA the kernels are recorded
    too and the table is sorted by their time (the CPU side only queues them)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    return prof.key_averages().table(sort_by="self_cuda_time_total" if cuda
                                     else "self_cpu_time_total", row_limit=20)


def profile_training(objective, optimizer, cfg, batches, steps=5):
    """Where the time of a setting's training steps goes (profiled)."""
    scaler = grad_scaler(cfg.train.dtype, batches[0][0].device.type)

    def train():
        for i in range(steps):
            x, y = batches[i % len(batches)]
            train_step(objective, optimizer, x, y, cfg, scaler)

    return profiled(train, batches[0][0].device)


PROFILED_TOKENS = 64  # new tokens in bench.profile's generation profile


def profile_generation(model, prompt, b):
    """Where the time of the command's model generating goes (profiled): greedy, batch 1, cached,
    thinking b.gen_think_steps steps, PROFILED_TOKENS new tokens after a warm-up."""
    model.eval()
    think = partial(system2_logits, steps=b.gen_think_steps)
    generate(model, prompt, 8, think)
    return profiled(lambda: generate(model, prompt, PROFILED_TOKENS, think), prompt.device)


def generation_speed(model, prompt, b, k, cache=True, compile=False):
    """Greedy batch-1 tokens/s (median of 3) thinking k steps, and the first call's seconds
    (compiling)."""
    device = str(prompt.device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    think = partial(system2_logits, steps=k)
    t0 = time.perf_counter()
    generate(model, prompt, 8, think, use_cache=cache, compile=compile)  # warm-up (and compiling)
    sync(device)
    warmup_s = time.perf_counter() - t0

    def gen():
        generate(model, prompt, b.gen_tokens, think, use_cache=cache, compile=compile)
        sync(device)

    return {"tokens_per_s": b.gen_tokens / timed(gen, 3), "warmup_s": warmup_s,
            "peak_memory_mb": peak_memory_mb(device)}


def bench_generation(models, model, prompt, b):
    """Per mode: greedy batch-1 tokens/s with the KV cache and FLOPs per generated token (counted
    over b.gen_tokens new tokens, cache rebuilds included, the prompt's pass not), thinking
    b.gen_think_steps steps (plain: none). Then the command's model (model) without the cache and,
    with b.compile, compiled."""
    out = {}
    for mode, mode_model in models.items():
        mode_model.eval()
        k = 0 if mode == "plain" else b.gen_think_steps
        out[f"{mode} K={k}"] = generation_speed(mode_model, prompt, b, k)
        n, think, counts = b.gen_tokens, partial(system2_logits, steps=k), []
        for tokens in (1, n + 1):
            with FlopCount() as count:
                generate(mode_model, prompt, tokens, think)
            counts.append(count)
        out[f"{mode} K={k}"].update({"flops_per_token": (counts[1].flops - counts[0].flops) / n,
                                     "ops_per_token": (counts[1].ops - counts[0].ops) / n})
    model.eval()
    K = b.gen_think_steps
    out[f"command's model K={K} uncached"] = generation_speed(model, prompt, b, K, cache=False)
    if b.compile:
        out[f"command's model K={K} compiled"] = generation_speed(model, prompt, b, K, compile=True)
    return out


def bench(cfg: BenchRun):
    b = cfg.bench
    if min(b.steps, b.repeats, b.gen_tokens) < 1 or b.warmup < 0 or b.gen_think_steps < 0:
        raise UserError("bench.steps, repeats and gen_tokens must be >= 1; warmup and "
                        "gen_think_steps >= 0")
    result = {}
    result["train"], settings, models, data, batches, device = bench_training(cfg, b)
    peak = matmul_peak(device, cfg.train.dtype)
    t = result["train"]["plain"]
    achieved = t["flops_per_step"] / (t["ms_per_step"] / 1000)
    result.update({
        "device": device, "threads": torch.get_num_threads(), "batch_size": cfg.data.batch_size,
        "block_size": cfg.data.block_size,
        "mfu": {"flops_per_step": t["flops_per_step"], "achieved_flops": achieved,
                "matmul_peak_flops": peak,
                "matmul_peak_dtype": cfg.train.dtype, "fraction_of_peak": achieved / peak},
    })
    result["variants"], model = bench_variants(cfg, b, batches, device)
    # generation's prompt: the first half window of the val split
    prompt = data.splits["val"][: cfg.data.block_size // 2].view(1, -1).to(device)
    if b.profile:
        result["profile"] = {mode: profile_training(*s, batches) for mode, s in settings.items()}
        result["profile_generation"] = profile_generation(model, prompt, b)
    result["generate"] = bench_generation(models, model, prompt, b)
    # the run's peak: on CUDA each setting reset it, so the largest of theirs
    result["peak_memory_mb"] = max([peak_memory_mb(device)] + [
        t["peak_memory_mb"] for part in ("train", "variants", "generate")
        for t in result[part].values() if "peak_memory_mb" in t])
    print(report(result, b))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'bench.json'}")
    return result


def peak_cell(t):
    """A training table's peak memory cell (CUDA only: elsewhere the peak is the process's)."""
    return f" {t['peak_memory_mb']:.0f} |" if "peak_memory_mb" in t else ""


def memory_table(at_peak, rows=12):
    """The largest entries of MemoryCount.at_peak as a table: what made them, how many, MB."""
    top = sorted(at_peak.items(), key=lambda kv: -kv[1][1])
    lines = ["| made by ([backward of:] op, shape, dtype) | tensors | MB | share |",
             "|---|---|---|---|"]
    total = sum(nbytes for _, nbytes in at_peak.values())
    for what, (n, nbytes) in top[:rows]:
        lines.append(f"| {what} | {n} | {nbytes / 2**20:.1f} | {nbytes / total:.1%} |")
    if len(top) > rows:
        rest = sum(nbytes for _, (_, nbytes) in top[rows:])
        lines.append(f"| the other {len(top) - rows} | | {rest / 2**20:.1f} | {rest / total:.1%} |")
    return "\n".join(lines)


def report(r, b):
    m = r["mfu"]
    peak = "peak_memory_mb" in r["train"]["plain"]  # CUDA: a peak memory column
    peak_head = " peak memory MB |" if peak else ""
    out = [f"device {r['device']}, {r['threads']} threads, batch {r['batch_size']} x block "
           f"{r['block_size']}, "
           f"median of {b.repeats} x {b.steps} steps", "",
           "| training | K | parameters | GFLOP/step (counted) | x plain | ms/step | x plain | "
           "tokens/s | first steps s | peak MB (counted) | x plain |" + peak_head,
           "|---" * (11 + peak) + "|"]
    for mode, t in r["train"].items():
        out.append(f"| {mode} | {t['think_steps']} | {t['params'] / 1e6:.2f}M | "
                   f"{t['flops_per_step'] / 1e9:.3f} | "
                   f"{t['flops_ratio']:.2f} | {t['ms_per_step']:.1f} | {t['time_ratio']:.2f} | "
                   f"{t['tokens_per_s']:.0f} | {t['first_steps_s']:.1f} | "
                   f"{t['memory_bytes'] / 2**20:.1f} | {t['memory_ratio']:.2f} |" + peak_cell(t))
    ran = [f"{mode} {t['flops_run_per_step'] / 1e9:.3f} "
           f"({t['flops_run_per_step'] / t['flops_per_step'] - 1:+.1%})"
           for mode, t in r["train"].items() if t["flops_run_per_step"] > 1.001 * t["flops_per_step"]]
    if ran:
        out += ["", "GFLOP/step that run, recomputation included (counted; model.Recompute): "
                + ", ".join(ran)]
    out += ["", f"model FLOPs utilisation (plain): {m['achieved_flops'] / 1e9:.1f} GFLOP/s "
                f"achieved "
            f"({m['flops_per_step'] / 1e9:.3f} GFLOP/step, counted) of a measured "
            f"{m['matmul_peak_flops'] / 1e9:.1f} "
            f"GFLOP/s {m['matmul_peak_dtype']} matmul peak = {m['fraction_of_peak']:.1%}"]
    out += ["", "| training (the command's model) | tokens/s | ms/step | first steps s |" + peak_head,
            "|---" * (4 + peak) + "|"]
    for name, v in r["variants"].items():
        out.append(f"| {name} | {v['tokens_per_s']:.0f} | {v['ms_per_step']:.1f} | "
                   f"{v['first_steps_s']:.1f} |" + peak_cell(v))
    if "profile" in r:
        for mode, table in r["profile"].items():
            out += ["", f"where a training step's time goes ({mode}):", table]
        for mode, t in r["train"].items():
            out += ["", f"where a training step's peak memory goes ({mode}; counted, eager):",
                    memory_table(t["memory_at_peak"])]
        out += ["", f"where generating {PROFILED_TOKENS} tokens' time goes (the command's model, "
                    f"K={b.gen_think_steps}):", r["profile_generation"]]
    out += ["", "| generation (greedy, batch 1) | tokens/s | MFLOP/token (counted) | "
                "aten ops/token | first call s | peak memory MB |",
            "|---|---|---|---|---|---|"]
    for name, g in r["generate"].items():
        flops = f"{g['flops_per_token'] / 1e6:.2f}" if "flops_per_token" in g else ""
        ops = f"{g['ops_per_token']:.0f}" if "ops_per_token" in g else ""
        out.append(f"| {name} | {g['tokens_per_s']:.0f} | {flops} | {ops} | {g['warmup_s']:.2f} | "
                   f"{g['peak_memory_mb']:.0f} |")
    return "\n".join(out)


@hydra.main(version_base="1.3", config_path="config", config_name="bench")
def main(cfg):
    run(bench, cfg)


if __name__ == "__main__":
    check_overrides("bench", sys.argv[1:])
    main()
