"""
Time per training step of the parity ablation's rows, side by side in one process: `uv run python parity_time.py`.

Each row is a train.py configuration at the parity setting (block 64, batch 16, one thread). The rows take turns:
every repeat runs STEPS steps of each row in order, so a busy machine slows them alike; the median over the
repeats is reported, with its ratio to the first row (today's GPT-2 block). Only at this commit: the rows'
architecture switches exist here and nowhere later (docs/parity.md).
"""

import os
import statistics
import sys
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from trainer import setup, train_step

LLAMA = "model.init=xavier model.pos=rope model.norm=rms model.mlp=swiglu model.mlp_hidden=1"
ROWS = {
    "gpt2": "",
    "+xavier": "model.init=xavier",
    "+rope": "model.init=xavier model.pos=rope",
    "+rms (gelu 4d)": "model.init=xavier model.pos=rope model.norm=rms",
    "+swiglu d (llama)": LLAMA,
    "llama, gpt2 init": LLAMA.replace("model.init=xavier", "model.init=gpt2"),
    "llama, learned positions": LLAMA.replace("model.pos=rope", "model.pos=learned"),
    "llama, layernorm": LLAMA.replace("model.norm=rms", "model.norm=layer"),
    "llama, gelu d": LLAMA.replace("model.mlp=swiglu", "model.mlp=gelu"),
    "llama, swiglu 8/3 d": LLAMA.replace("mlp_hidden=1", "mlp_hidden=2.6667"),
    "llama, relu2 4d": LLAMA.replace("model.mlp=swiglu model.mlp_hidden=1", "model.mlp=relu2 model.mlp_hidden=4"),
    "llama, bias": LLAMA + " model.bias=true",
    "llama, tied": LLAMA + " model.tie_embeddings=true",
    "gpt2, tied": "model.tie_embeddings=true",
}
PLAIN = "model.think_steps=0 "
EBT = {
    "ebt gpt2": "preset=ebt",
    "ebt llama, marker, x_t": f"preset=ebt {LLAMA}",
    "ebt llama, x_t": f"preset=ebt {LLAMA} model.slot_input=cand",
    "ebt llama, x_t+1": f"preset=ebt {LLAMA} model.slot_input=cand model.slot_pos=next",
    "ebt llama, time token": f"preset=ebt {LLAMA} model.slot_input=cand model.slot_pos=next model.step_token=true",
    "ebt llama, no step embedding": f"preset=ebt {LLAMA} model.slot_input=cand model.slot_pos=next "
                                    "model.think_step_embed=false",
}
STEPS, REPEATS = 10, 7


def build(overrides):
    base = ["data.block_size=64", "data.batch_size=16", "out_dir=/tmp/parity_time"]
    cfg = OmegaConf.to_object(compose(config_name="train", overrides=base + overrides.split()))
    _, data, model, optimizer, state = setup(cfg)
    return cfg, data, model, optimizer, state, torch.Generator().manual_seed(0)


def seconds_per_step(run, n):
    cfg, data, model, optimizer, state, gen = run
    t0 = time.perf_counter()
    for _ in range(n):
        x, y = data.batch("train", cfg.data.batch_size, gen, "cpu")
        metrics = train_step(model, optimizer, x, y, state, cfg)
    metrics["train_loss"].item()
    return (time.perf_counter() - t0) / n


def main():
    torch.set_num_threads(1)
    rows = {name: PLAIN + o for name, o in ROWS.items()} | EBT
    with initialize_config_dir(config_dir=os.path.abspath("config"), version_base="1.3"):
        runs = {name: build(o) for name, o in rows.items()}
    for run in runs.values():
        seconds_per_step(run, 3)  # warm-up: allocator, first-call costs
    times = {name: [] for name in runs}
    for _ in range(REPEATS):
        for name, run in runs.items():
            times[name].append(seconds_per_step(run, STEPS))
    base = statistics.median(times["gpt2"])
    print(f"| row | ms/step | vs gpt2 | parameters |\n|---|---|---|---|")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"| {name} | {1000 * med:.1f} | {med / base:.2f} | {runs[name][2].num_params():,} |")


if __name__ == "__main__":
    sys.exit(main())
