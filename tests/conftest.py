"""Shared fixtures: the repo root on sys.path and a tiny seeded GPT."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model import GPT, ModelConfig  # noqa: E402

TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=11, block_size=16, dropout=0.0)


def make_model(seed=0, dtype=torch.float64, **overrides):
    """A tiny GPT with the given config overrides, seeded, in the given dtype."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**TINY, **overrides})
    return GPT(cfg).to(dtype)


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread: tiny tensors gain nothing from more, and lose a lot on a busy box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_model():
    """Tiny float64 GPT (2 layers, 2 heads, width 32, vocab 11, block 16) in eval mode."""
    return make_model().eval()


@pytest.fixture
def tiny_factory():
    """Build a tiny float64 GPT with config overrides: tiny_factory(seed=..., **cfg)."""
    return make_model
