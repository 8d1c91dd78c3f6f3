"""
Generate text from a trained checkpoint:

    uv run sample.py checkpoint=out_ebt/final.pt prompt="HAMLET:"

Config: config/sample.yaml (schema: SampleConfig below). The checkpoint carries the vocabulary and
model config. A product of experts: `experts='[a.pt,b.pt]' expert_weights='[1,0.5]'` (their
energies add); `ban=e`: the text never contains an e (an infinite energy, a hand-written expert).
docs/experts.md.
"""

import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import List, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore

from checkpoints import load_experts
from ebm import generate, pick, self_verify
from energies import Product, restrict
from util import UserError, check_overrides, pick_device, run, sync


@dataclass
class SampleConfig:
    checkpoint: str = "out_ebt/final.pt"
    # a product of these checkpoints (empty: checkpoint alone)
    experts: List[str] = field(default_factory=list)
    # one weight per expert (empty: 1 each)
    expert_weights: List[float] = field(default_factory=list)
    ban: str = ""  # characters the generated text may not contain (infinite energy)
    prompt: str = "\n"
    max_new_tokens: int = 500
    use_thinking: bool = True  # false: System 1 only
    think_steps: Optional[int] = None  # default: the model's model.think_steps
    # self-verification: M candidates per position (default: the model's)
    think_samples: Optional[int] = None
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
    models, weights, vocab, _ = load_experts(cfg.experts or [cfg.checkpoint], cfg.expert_weights,
                                             device)
    m = models[0].config  # the first expert's thinking options serve the product
    steps = m.think_steps if cfg.think_steps is None else cfg.think_steps
    steps = steps if cfg.use_thinking else 0
    starts = m.think_samples if cfg.think_samples is None else cfg.think_samples
    banned = ban_ids(cfg.ban, vocab)
    think, product = thinking(steps, starts, cfg.topk, banned), Product(models, weights)
    prompt = vocab.encode(cfg.prompt or "\n")
    idx = torch.tensor([prompt] * cfg.num_samples, dtype=torch.long, device=device)
    if cfg.compile:  # compile first, untimed, so that tokens/s below is steady
        compile_ahead(product, idx, cfg.max_new_tokens, think)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    choose = partial(pick, sample=cfg.sample, temperature=cfg.sample_temp, top_p=cfg.sample_top_p,
                     generator=gen)
    sync(device)
    t0 = time.time()
    out = generate(product, idx, cfg.max_new_tokens, think, choose, compile=cfg.compile)
    sync(device)  # CUDA and MPS run ahead of Python: wait before reading the clock
    dt = time.time() - t0
    for row in out.tolist():
        print(vocab.decode(row))
        print("---------------")
    n = cfg.max_new_tokens * cfg.num_samples
    print(f"{n} tokens in {dt:.2f}s ({n / max(dt, 1e-9):.0f} tokens/s), think_steps {steps}, "
          f"{'sampled' if cfg.sample else 'greedy'}"
          + (f", product of {len(models)} experts at weights {weights}" if len(models) > 1 else "")
          + (f", banned {cfg.ban!r}" if banned else ""))


def compile_ahead(product, idx, max_new_tokens, think):
    """Compile every graph that generate(compile=True) will need for max_new_tokens after idx: an
    untimed run as far as that one goes, up to the first token after each expert's cache rebuild
    (the graphs are the prompt's pass, single tokens, a full cache and a rebuilt one)."""
    room = max(m.config.block_size for m in product.models) - idx.size(1)  # until the caches fill
    generate(product, idx, min(max_new_tokens, max(2, room + 2)), think, compile=True)


def thinking(steps, starts=1, topk=0, banned=()):
    """How generate thinks about each token: `steps` think steps from `starts` starts per position
    (self-verification keeps the lowest), over the System 1 top-k candidates only (topk > 0) and
    never on the banned token ids (an infinite energy)."""

    def think(model, e, energy):
        return self_verify(model, e, energy, steps, starts)[0]

    return restrict(think, topk, banned)


def ban_ids(ban, vocab):
    """The token ids of the banned characters: each in the vocabulary, and one must stay allowed."""
    unknown = sorted({c for c in ban if c not in vocab.stoi})
    if unknown:
        names = " ".join(repr(c) for c in unknown)
        raise UserError(f"ban={ban!r}: {names} not in the model's vocabulary, so it could never be "
                        "generated anyway; ban only characters of the training text")
    banned = tuple(sorted({vocab.stoi[c] for c in ban}))
    if len(banned) == len(vocab):
        raise UserError(f"ban={ban!r} bans every character of the vocabulary: leave at least one "
                        f"allowed")
    return banned


@hydra.main(version_base="1.3", config_path="config", config_name="sample")
def main(cfg):
    run(sample, cfg)


if __name__ == "__main__":
    check_overrides("sample", sys.argv[1:])
    main()
