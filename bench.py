"""
What thinking costs, measured side by side: `uv run bench.py [train overrides]`.

Training tokens/s at think_steps 0 and K on the same model, interleaved (0, K, 0, K, ...) so that a noisy
machine slows both alike; the median of `bench.repeats` timed windows of `bench.steps` steps each.
Then generation tokens/s with the KV cache, System 1 and System 2, and without the cache.
Prints a table and writes bench.json (in out_dir).
"""

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore

from ebm import generate
from train import RunConfig, setup, train_step
from util import check_overrides, run


@dataclass
class BenchConfig:
    think_steps: int = 2  # compared with think_steps 0
    steps: int = 10  # training steps per timed window
    repeats: int = 5  # timed windows per setting; the median is reported
    warmup: int = 5  # untimed steps first (allocator, caches)
    gen_tokens: int = 256  # tokens per generation measurement


@dataclass
class BenchRun(RunConfig):
    bench: BenchConfig = field(default_factory=BenchConfig)


ConfigStore.instance().store(name="bench_schema", node=BenchRun)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def bench(cfg: BenchRun):
    b = cfg.bench
    device, data, model, optimizer, state = setup(cfg)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    batches = [data.batch("train", cfg.data.batch_size, gen, device) for _ in range(b.steps)]
    tokens = b.steps * cfg.data.batch_size * cfg.data.block_size

    def window(k, n):
        sync(device)
        t0 = time.perf_counter()
        for i in range(n):
            x, y = batches[i % len(batches)]
            train_step(model, optimizer, x, y, state, cfg, think_steps=k)
        sync(device)
        return time.perf_counter() - t0

    settings = [0, b.think_steps]
    for k in settings:
        window(k, b.warmup)
    times = {k: [] for k in settings}
    for _ in range(b.repeats):
        for k in settings:
            times[k].append(window(k, b.steps))
    result = {"device": device, "params": model.num_params(), "threads": torch.get_num_threads(),
              "batch_size": cfg.data.batch_size, "block_size": cfg.data.block_size, "train": {}, "generate": {}}
    for k in settings:
        med = statistics.median(times[k])
        result["train"][f"think_steps={k}"] = {"tokens_per_s": tokens / med, "ms_per_step": 1000 * med / b.steps,
                                               "runs_s": times[k]}
    ratio = result["train"][f"think_steps={b.think_steps}"]["tokens_per_s"] / result["train"]["think_steps=0"]["tokens_per_s"]
    result["train"]["ratio"] = ratio

    model.eval()
    prompt = data.splits["val"][: cfg.data.block_size // 2].view(1, -1).to(device)
    for name, k, cache in (("S1 cached", 0, True), (f"S2 K={cfg.model.think_steps} cached", cfg.model.think_steps, True),
                           (f"S2 K={cfg.model.think_steps} uncached", cfg.model.think_steps, False)):
        generate(model, prompt, 8, k, use_cache=cache)  # warm-up
        runs = []
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            generate(model, prompt, b.gen_tokens, k, use_cache=cache)
            sync(device)
            runs.append(time.perf_counter() - t0)
        result["generate"][name] = {"tokens_per_s": b.gen_tokens / statistics.median(runs)}

    print(f"device {device}, {torch.get_num_threads()} threads, {model.num_params() / 1e6:.2f}M parameters, "
          f"batch {cfg.data.batch_size} x block {cfg.data.block_size}, median of {b.repeats} x {b.steps} steps")
    print("| training | tokens/s | ms/step |\n|---|---|---|")
    for k in settings:
        r = result["train"][f"think_steps={k}"]
        print(f"| think_steps={k} | {r['tokens_per_s']:.0f} | {r['ms_per_step']:.1f} |")
    print(f"throughput ratio think_steps={b.think_steps} / think_steps=0: {ratio:.3f}")
    print("| generation (greedy, batch 1) | tokens/s |\n|---|---|")
    for name, r in result["generate"].items():
        print(f"| {name} | {r['tokens_per_s']:.0f} |")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'bench.json'}")
    return result


@hydra.main(version_base="1.3", config_path="config", config_name="bench")
def main(cfg):
    run(bench, cfg)


if __name__ == "__main__":
    check_overrides("bench", sys.argv[1:])
    main()
