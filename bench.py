"""
What thinking costs, measured side by side: `uv run bench.py [train overrides] [bench.* options]`.

1. Training tokens/s and ms/step at think_steps 0 and K for each energy in bench.energies, interleaved
   (0, K, 0, K, ...) so that a noisy machine slows both alike; the median of bench.repeats windows.
2. Model FLOPs utilisation: the achieved FLOP/s of training at think_steps 0 (the configured energy) as a
   fraction of a matmul peak measured here in train.dtype, on the same machine, a moment before.
3. Training tokens/s of the configured model at think_steps K in float32 eager, compiled
   (train.compile, with bench.compile) and each of bench.dtypes (default bfloat16), interleaved.
4. Generation tokens/s (greedy, batch 1) with and without the KV cache, System 1 and thinking with
   bench.gen_think_steps, eager and (bench.compile) compiled.
5. Peak memory: the process's peak resident set on CPU, peak allocated memory per setting on CUDA.
bench.profile=true prints where the time of a training step goes (torch.profiler, by operator; on CUDA by
kernel time).
Prints tables and writes bench.json (in out_dir).
"""

import copy
import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import hydra
import torch
from hydra.core.config_store import ConfigStore

from ebm import generate
from trainer import DTYPES, RunConfig, check_dtype, compiled, grad_scaler, setup, train_step
from util import UserError, check_overrides, run, sync


@dataclass
class BenchConfig:
    think_steps: int = 2  # training: compared with think_steps 0
    energies: List[str] = field(default_factory=lambda: ["linear", "mixture", "transformer"])
    steps: int = 10  # training steps per timed window
    repeats: int = 5  # timed windows per setting; the median is reported
    warmup: int = 5  # untimed steps first (allocator, caches, compiling)
    gen_think_steps: int = 4  # generation: thinking with this many steps, next to System 1
    gen_tokens: int = 256  # tokens per generation measurement
    compile: bool = True  # also time compiled training and generation (compiling takes a while, once)
    dtypes: List[str] = field(default_factory=lambda: ["bfloat16"])  # mixed precision timed against float32
    profile: bool = False  # print a torch.profiler table of training steps at think_steps 0


@dataclass
class BenchRun(RunConfig):
    bench: BenchConfig = field(default_factory=BenchConfig)


ConfigStore.instance().store(name="bench_schema", node=BenchRun)


def peak_memory_mb(device):
    """Peak allocated memory since the last reset on CUDA; the process's peak resident set elsewhere."""
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
    FLOP/s of n x n x n matmuls in dtype (train.dtype, the precision training's matmuls run in): the device's
    practical peak for dense math. CPU: n = 1024, one matmul per timing. A GPU needs big matmuls (n = 4096) and
    many per synchronisation (20) to reach its peak, or launch and sync overheads would be timed instead.
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


def train_flops_per_token(model, T):
    """Forward + backward FLOPs per token, as nanoGPT's estimate: 6 per weight of every matmul (embedding
    lookups are not matmuls) plus 12 * n_layer * n_embd * T for attention's two T x T products."""
    c = model.config
    embeddings = model.transformer.wte.weight.numel()
    return 6 * (model.num_params() - embeddings) + 12 * c.n_layer * c.n_embd * T


def interleaved(settings, optimizer, state, batches, b, device):
    """
    settings: name -> (model to step, its config, think_steps). Each first runs b.warmup untimed steps
    (allocator, caches, compiling), then b.repeats windows of b.steps steps, the settings taking turns so
    that a noisy machine slows all alike. Per name: tokens/s and ms/step of the median window.
    """
    device_type = torch.device(device).type

    def window(name, n):
        fwd, cfg, k = settings[name]
        scaler = grad_scaler(cfg.train.dtype, device_type)
        sync(device)
        t0 = time.perf_counter()
        for i in range(n):
            x, y = batches[i % len(batches)]
            train_step(fwd, optimizer, x, y, state, cfg, think_steps=k, scaler=scaler)
        sync(device)
        return time.perf_counter() - t0

    out = {name: {"first_steps_s": window(name, b.warmup)} for name in settings}
    times = {name: [] for name in settings}
    for _ in range(b.repeats):
        for name in settings:
            times[name].append(window(name, b.steps))
    for name, (_, cfg, _) in settings.items():
        med = statistics.median(times[name])
        tokens = b.steps * cfg.data.batch_size * cfg.data.block_size
        out[name].update({"tokens_per_s": tokens / med, "ms_per_step": 1000 * med / b.steps, "runs_s": times[name]})
    return out


def bench_training(cfg, energy, b):
    """tokens/s and ms/step at think_steps 0 and b.think_steps for one energy."""
    cfg = copy.deepcopy(cfg)
    cfg.model.energy = energy
    device, data, model, optimizer, state = setup(cfg)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator().manual_seed(cfg.train.seed)
    batches = [data.batch("train", cfg.data.batch_size, gen, device) for _ in range(b.steps)]
    settings = {f"think_steps={k}": (model, cfg, k) for k in (0, b.think_steps)}
    out = interleaved(settings, optimizer, state, batches, b, device)
    out["ratio"] = out[f"think_steps={b.think_steps}"]["tokens_per_s"] / out["think_steps=0"]["tokens_per_s"]
    out["peak_memory_mb"] = peak_memory_mb(device)
    return out, (device, data, model, optimizer, state, batches)


def bench_variants(cfg, b, model, optimizer, state, batches, device):
    """Training tokens/s at think_steps b.think_steps: float32 eager, compiled, and each of b.dtypes."""
    f32 = copy.deepcopy(cfg)
    f32.train.dtype = "float32"  # the rows named float32 are float32 whatever train.dtype says
    settings = {"float32 eager": (model, f32, b.think_steps)}
    if b.compile:
        c = copy.deepcopy(f32)
        c.train.compile = True
        settings["float32 compiled"] = (compiled(model, c), f32, b.think_steps)
    for dtype in b.dtypes:
        c = copy.deepcopy(cfg)
        c.train.dtype = dtype
        check_dtype(dtype, torch.device(device).type, cfg.model.energy)  # one line if this device cannot
        settings[f"{dtype} eager"] = (model, c, b.think_steps)
    return interleaved(settings, optimizer, state, batches, b, device)


def profile_training(model, optimizer, state, cfg, batches, steps=5):
    """Where a training step's time goes, by operator (torch.profiler), at think_steps 0. On CUDA the kernels
    are recorded too and the table is sorted by their time (the CPU side only queues them)."""
    from torch.profiler import ProfilerActivity, profile

    device = batches[0][0].device
    cuda = device.type == "cuda"
    scaler = grad_scaler(cfg.train.dtype, device.type)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for i in range(steps):
            x, y = batches[i % len(batches)]
            train_step(model, optimizer, x, y, state, cfg, think_steps=0, scaler=scaler)
        sync(device)
    return prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=20)


def bench_generation(model, data, cfg, b, device):
    """Greedy batch-1 tokens/s: System 1 and thinking, with and without the KV cache, eager and compiled."""
    model.eval()
    prompt = data.splits["val"][: cfg.data.block_size // 2].view(1, -1).to(device)
    K = b.gen_think_steps
    rows = [("S1 cached", 0, True, False), (f"S2 K={K} cached", K, True, False),
            ("S1 uncached", 0, False, False), (f"S2 K={K} uncached", K, False, False)]
    if b.compile:
        rows += [("S1 cached compiled", 0, True, True), (f"S2 K={K} cached compiled", K, True, True)]
    out = {}
    for name, k, cache, compiled in rows:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        generate(model, prompt, 8, k, use_cache=cache, compile=compiled)  # warm-up (and compiling)
        sync(device)
        warmup_s = time.perf_counter() - t0

        def gen():
            generate(model, prompt, b.gen_tokens, k, use_cache=cache, compile=compiled)
            sync(device)

        out[name] = {"tokens_per_s": b.gen_tokens / timed(gen, 3), "warmup_s": warmup_s,
                     "peak_memory_mb": peak_memory_mb(device)}
    return out


def bench(cfg: BenchRun):
    b = cfg.bench
    if min(b.steps, b.repeats, b.gen_tokens) < 1 or b.warmup < 0 or b.think_steps < 0 or b.gen_think_steps < 0:
        raise UserError("bench.steps, repeats and gen_tokens must be >= 1; warmup and the think steps >= 0")
    energies = b.energies if cfg.model.energy in b.energies else [cfg.model.energy, *b.energies]
    device = None
    result = {"train": {}}
    for energy in energies:
        result["train"][energy], ctx = bench_training(cfg, energy, b)
        if energy == cfg.model.energy:  # the configured model: MFU, profile and generation use it
            device, data, model, optimizer, state, batches = ctx
    peak = matmul_peak(device, cfg.train.dtype)
    per_token = train_flops_per_token(model, cfg.data.block_size)
    achieved = per_token * result["train"][cfg.model.energy]["think_steps=0"]["tokens_per_s"]
    result.update({
        "device": device, "threads": torch.get_num_threads(), "energy": cfg.model.energy,
        "params": model.num_params(), "batch_size": cfg.data.batch_size, "block_size": cfg.data.block_size,
        "mfu": {"train_flops_per_token": per_token, "achieved_flops": achieved, "matmul_peak_flops": peak,
                "matmul_peak_dtype": cfg.train.dtype, "fraction_of_peak": achieved / peak},
    })
    result["variants"] = bench_variants(cfg, b, model, optimizer, state, batches, device)
    if b.profile:
        result["profile"] = profile_training(model, optimizer, state, cfg, batches)
    result["generate"] = bench_generation(model, data, cfg, b, device)
    result["peak_memory_mb"] = peak_memory_mb(device)
    print(report(result, b))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'bench.json'}")
    return result


def report(r, b):
    m = r["mfu"]
    out = [f"device {r['device']}, {r['threads']} threads, {r['params'] / 1e6:.2f}M parameters ({r['energy']}), "
           f"batch {r['batch_size']} x block {r['block_size']}, median of {b.repeats} x {b.steps} steps", "",
           f"| training | tokens/s K=0 | ms/step K=0 | tokens/s K={b.think_steps} | ms/step K={b.think_steps} | "
           "ratio | peak memory MB |", "|---|---|---|---|---|---|---|"]
    for energy, t in r["train"].items():
        a, k = t["think_steps=0"], t[f"think_steps={b.think_steps}"]
        out.append(f"| {energy} | {a['tokens_per_s']:.0f} | {a['ms_per_step']:.1f} | {k['tokens_per_s']:.0f} | "
                   f"{k['ms_per_step']:.1f} | {t['ratio']:.3f} | {t['peak_memory_mb']:.0f} |")
    out += ["", f"model FLOPs utilisation at K=0: {m['achieved_flops'] / 1e9:.1f} GFLOP/s achieved "
            f"({m['train_flops_per_token'] / 1e6:.2f} MFLOP/token) of a measured {m['matmul_peak_flops'] / 1e9:.1f} "
            f"GFLOP/s {m['matmul_peak_dtype']} matmul peak = {m['fraction_of_peak']:.1%}"]
    out += ["", f"| training at K={b.think_steps} ({r['energy']}) | tokens/s | ms/step | first steps s |", "|---|---|---|---|"]
    for name, v in r["variants"].items():
        out.append(f"| {name} | {v['tokens_per_s']:.0f} | {v['ms_per_step']:.1f} | {v['first_steps_s']:.1f} |")
    if "profile" in r:
        out += ["", "where a training step's time goes (think_steps=0):", r["profile"]]
    out += ["", "| generation (greedy, batch 1) | tokens/s | first call s | peak memory MB |", "|---|---|---|---|"]
    for name, g in r["generate"].items():
        out.append(f"| {name} | {g['tokens_per_s']:.0f} | {g['warmup_s']:.2f} | {g['peak_memory_mb']:.0f} |")
    return "\n".join(out)


@hydra.main(version_base="1.3", config_path="config", config_name="bench")
def main(cfg):
    run(bench, cfg)


if __name__ == "__main__":
    check_overrides("bench", sys.argv[1:])
    main()
