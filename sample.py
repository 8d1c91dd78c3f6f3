"""
Generate text from a trained checkpoint: `uv run sample.py checkpoint=out_ebt/final.pt prompt="HAMLET:"`.
Config: config/sample.yaml (schema: SampleConfig below). The checkpoint carries the vocabulary and model config.
"""

import sys
import time
from dataclasses import dataclass
from typing import Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore

from ebm import generate
from trainer import load_model
from util import UserError, check_overrides, pick_device, run, sync


@dataclass
class SampleConfig:
    checkpoint: str = "out_ebt/final.pt"
    prompt: str = "\n"
    max_new_tokens: int = 500
    use_thinking: bool = True  # false: System 1 only
    think_steps: Optional[int] = None  # default: the model's model.think_steps
    think_samples: Optional[int] = None  # self-verification: M candidates per position (default: the model's)
    topk: int = 0  # think over (and pick from) the System 1 top-k candidates only; 0 = all
    sample: bool = False  # false: greedy argmax (deterministic); true: draw from the distribution
    sample_temp: float = 1.0
    sample_top_p: float = 1.0  # nucleus sampling; 1.0 = off
    seed: int = 1337
    device: str = "auto"
    num_samples: int = 1
    compile: bool = False  # torch.compile each step: ~15 s once, then faster (see README, speed)


ConfigStore.instance().store(name="sample_schema", node=SampleConfig)


def sample(cfg: SampleConfig):
    if cfg.max_new_tokens < 0 or cfg.num_samples < 1 or cfg.topk < 0:
        raise UserError("max_new_tokens and topk must be >= 0 and num_samples >= 1")
    if cfg.sample and (cfg.sample_temp <= 0 or not 0 < cfg.sample_top_p <= 1):
        raise UserError("sample_temp must be > 0 and sample_top_p in (0, 1]")
    if cfg.think_steps is not None and cfg.think_steps < 0:
        raise UserError(f"think_steps={cfg.think_steps} must be >= 0")
    if cfg.think_samples is not None and cfg.think_samples < 1:
        raise UserError(f"think_samples={cfg.think_samples} must be >= 1")
    device = pick_device(cfg.device, key="device")
    model, vocab, _ = load_model(cfg.checkpoint, device)
    steps = 0 if not cfg.use_thinking else (model.config.think_steps if cfg.think_steps is None else cfg.think_steps)
    prompt = vocab.encode(cfg.prompt or "\n")
    idx = torch.tensor([prompt] * cfg.num_samples, dtype=torch.long, device=device)
    samples = model.config.think_samples if cfg.think_samples is None else cfg.think_samples
    if cfg.compile:  # compile first, in a short untimed run, so that tokens/s below is the steady speed
        generate(model, idx, 2, steps, topk=cfg.topk, samples=samples, compile=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    sync(device)
    t0 = time.time()
    out = generate(model, idx, cfg.max_new_tokens, steps, topk=cfg.topk, sample=cfg.sample,
                   temperature=cfg.sample_temp, top_p=cfg.sample_top_p, generator=gen, samples=samples,
                   compile=cfg.compile)
    sync(device)  # CUDA and MPS run ahead of Python: wait before reading the clock
    dt = time.time() - t0
    for row in out.tolist():
        print(vocab.decode(row))
        print("---------------")
    n = cfg.max_new_tokens * cfg.num_samples
    print(f"{n} tokens in {dt:.2f}s ({n / max(dt, 1e-9):.0f} tokens/s), think_steps {steps}, "
          f"{'sampled' if cfg.sample else 'greedy'}")


@hydra.main(version_base="1.3", config_path="config", config_name="sample")
def main(cfg):
    run(sample, cfg)


if __name__ == "__main__":
    check_overrides("sample", sys.argv[1:])
    main()
