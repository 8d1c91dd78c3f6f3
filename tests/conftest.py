"""Shared fixtures: the repo root on sys.path, a tiny seeded GPT, and the leak check of the loss
terms."""

import copy
import math
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import contrastive  # noqa: E402
import ebm  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402

TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=11, block_size=16, dropout=0.0)


def make_model(seed=0, dtype=torch.float64, **overrides):
    """A tiny GPT with the given config overrides, seeded, in the given dtype."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**TINY, **overrides})
    return GPT(cfg).to(dtype)


def free_energy_rule(lr, tau, max_move=math.inf, clip="hard"):
    """The free-energy step rule with these parameters bound, for ebm.think (ebm.step_rule binds the
    model's own)."""
    bound = partial(ebm.CLIPS[clip], m=max_move) if math.isfinite(max_move) else None
    return partial(ebm.free_energy_step, lr=lr, tau=tau, clip=bound)


def linear_logits(model, e, steps):
    """[z_0, ..., z_K] of the model thinking on the linear energy of e (ebm.system2_logits)."""
    return ebm.system2_logits(model, e, ebm.linear_energy(e), steps)


def perturb(model, scale=0.15, seed=0):
    """Add N(0, scale^2) to every parameter: attention stops being uniform, and the energies' own
    parameters (mixture g, the energy readout, step embeddings) stop being ~0, so that they
    matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, dtype=p.dtype, generator=g))
    return model


def assert_no_leak(model, seq, positions, expected=None):
    """
    The per-position loss terms of ebm.losses at positions <= t do not change when the tokens after
    x_{t+1} change (a consistent new sequence), nor when the inputs from x_{t+1} on change while the
    targets stay (position t must not see its own target); those after t do change. Train and eval
    mode, the same seeds and chain state every call. seq (B, T + 1) of token ids; expected: the loss
    terms in training mode.
    """
    state0 = contrastive.ReplayState(model.config).to(model.energy_head.weight.dtype)
    g = torch.Generator().manual_seed(7)

    def run(idx, targets, training):
        model.train(training)
        torch.manual_seed(123)
        with torch.no_grad():
            return contrastive.losses(model, idx, targets, copy.deepcopy(state0))

    def changed(x, start):
        x2 = x.clone()
        x2[:, start:] = (x[:, start:] + 1 + torch.randint(model.config.vocab_size - 1,
                                                          x[:, start:].shape,
                                                          generator=g)) % model.config.vocab_size
        return x2

    for t in positions:
        seq2, idx3 = changed(seq, t + 2), changed(seq[:, :-1], t + 1)
        for training in (True, False):
            a = run(seq[:, :-1], seq[:, 1:], training)
            if expected is not None:
                assert set(a) == (expected if training else {"ce", "ce_s1"})
            for b in (run(seq2[:, :-1], seq2[:, 1:], training), run(idx3, seq[:, 1:], training)):
                for name in a:  # the same computation on the same shapes: equal up to rounding
                    assert torch.allclose(a[name][:, : t + 1], b[name][:, : t + 1], rtol=0,
                                          atol=1e-12), (name, t)
                    assert not torch.allclose(a[name][:, t + 1:], b[name][:, t + 1:]), (name, t)


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread: tiny tensors gain nothing from more, and lose a lot on a
    busy box."""
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
