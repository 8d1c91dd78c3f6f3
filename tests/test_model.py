"""Tests of model.py's KV cache and of generation (ebm.generate, ebm.pick, ebm.next_logits)."""

import math
from functools import partial

import pytest
import torch
from torch.nn import functional as F

import ebm
from energies import Product
from sample import thinking

pytestmark = pytest.mark.usefixtures("one_thread")

V, BS = 11, 16


def tokens(B, T, seed=0):
    return torch.randint(V, (B, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("prefill", [1, 5, 15, 16])
def test_kv_cache_matches_full_forward(tiny_model, prefill):
    """Prefill of idx[:, :k] then single-token steps gives the hidden states of one full forward
    pass."""
    B = 3
    idx = tokens(B, BS, seed=prefill)
    with torch.no_grad():
        full = tiny_model(idx)
        caches = tiny_model.new_caches(B)
        parts = [tiny_model(idx[:, :prefill], caches)]
        for t in range(prefill, BS):
            parts.append(tiny_model(idx[:, t:t + 1], caches))
    assert caches[0].length == BS
    assert torch.allclose(torch.cat(parts, 1), full, rtol=0, atol=1e-5)
    # float64: essentially exact
    assert torch.allclose(torch.cat(parts, 1), full, rtol=0, atol=1e-10)


def test_kv_cache_multi_token_chunks(tiny_model):
    """Chunks of several tokens after a prefill (the masked path) also match the full forward
    pass."""
    B = 2
    idx = tokens(B, BS, seed=1)
    with torch.no_grad():
        full = tiny_model(idx)
        caches = tiny_model.new_caches(B)
        parts = [tiny_model(idx[:, a:b], caches) for a, b in [(0, 3), (3, 7), (7, 8), (8, 16)]]
    assert torch.allclose(torch.cat(parts, 1), full, rtol=0, atol=1e-10)


def test_kv_cache_float32(tiny_factory):
    """The cache works in the default float32 too (rtol, atol 1e-5)."""
    model = tiny_factory(dtype=torch.float32).eval()
    idx = tokens(2, BS, seed=2)
    with torch.no_grad():
        full = model(idx)
        caches = model.new_caches(2)
        assert caches[0].k.dtype == torch.float32
        parts = [model(idx[:, :4], caches)] + [model(idx[:, t:t + 1], caches) for t in range(4, BS)]
    assert torch.allclose(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_continues_rotary_positions_after_a_rebuild(tiny_model):
    """A new cache filled with a later window (as generate rebuilds it) gives that window's own full
    pass: positions restart at 0 in a new cache and continue from cache.length in single-token
    steps."""
    idx = tokens(2, 40, seed=3)
    with torch.no_grad():
        for start in (0, 8, 24):  # windows of block_size tokens starting anywhere in the text
            window = idx[:, start:start + BS]
            caches = tiny_model.new_caches(2)
            parts = [tiny_model(window[:, :BS // 2], caches)]
            parts += [tiny_model(window[:, t:t + 1], caches) for t in range(BS // 2, BS)]
            assert torch.allclose(torch.cat(parts, 1), tiny_model(window), rtol=0, atol=1e-10)


def test_rotary_attention_sees_relative_positions(tiny_model):
    """Rotary positions: a query at t and a key at s meet in q . k by t - s only (a shift of both
    changes nothing), and the tables' rotation keeps lengths (each pair turns, it does not
    stretch)."""
    from model import rotate
    g = torch.Generator().manual_seed(4)
    # 16 = head size of TINY
    q, k = (torch.randn(3, 16, dtype=torch.float64, generator=g) for _ in range(2))

    def score(t, s):
        return (rotate(q, *tiny_model.rope(t, 1)) * rotate(k, *tiny_model.rope(s, 1))).sum(-1)

    for t, s, shift in [(5, 2, 3), (9, 9, 6), (0, 7, 8)]:
        assert torch.allclose(score(t, s), score(t + shift, s + shift), rtol=0, atol=1e-6)
    # the distance does matter
    assert not torch.allclose(score(5, 2), score(5, 3), rtol=0, atol=1e-3)
    turned = rotate(q, *tiny_model.rope(11, 1))
    assert torch.allclose(turned.norm(dim=-1), q.norm(dim=-1), rtol=1e-6)


def test_hidden_states_have_no_leak(tiny_model):
    """h_t depends on x_0..x_t only: changing the tokens after t leaves every h at positions <= t as
    it was."""
    idx = tokens(2, BS, seed=5)
    with torch.no_grad():
        h = tiny_model(idx)
        for t in (0, 6, 14):
            idx2 = idx.clone()
            idx2[:, t + 1:] = (idx[:, t + 1:] + 1) % V
            h2 = tiny_model(idx2)
            assert torch.allclose(h2[:, :t + 1], h[:, :t + 1], rtol=0, atol=1e-12)
            assert (h2[:, t + 1:] - h[:, t + 1:]).abs().amax(-1).min() > 1e-6


def test_forward_refuses_more_than_block_size(tiny_model):
    """Feeding past block_size (with or without a cache) fails loudly instead of indexing
    garbage."""
    with pytest.raises(AssertionError):
        tiny_model(tokens(1, BS + 1))
    caches = tiny_model.new_caches(1)
    tiny_model(tokens(1, BS), caches)
    with pytest.raises(AssertionError):
        tiny_model(tokens(1, 1), caches)


# --------------------------------------------------------------------------------------------------
# generate


@pytest.mark.parametrize("think_steps", [0, 3])
@pytest.mark.parametrize("topk", [0, 4])
def test_generate_cache_equals_no_cache_within_block(tiny_factory, think_steps, topk):
    """Greedy generation with and without the KV cache gives identical tokens while the context
    fits."""
    model = tiny_factory(seed=3, entropy_weight=0.3).eval()
    for prompt_len in (1, 5):
        prompt = tokens(2, prompt_len, seed=prompt_len)
        n = BS - prompt_len
        a = ebm.generate(model, prompt, n, thinking(think_steps, topk=topk), use_cache=True)
        b = ebm.generate(model, prompt, n, thinking(think_steps, topk=topk), use_cache=False)
        assert a.shape == (2, BS)
        assert torch.equal(a[:, :prompt_len], prompt)
        # tokens: the picks' top-2 logit gaps (> 1e-4) dwarf float64 rounding
        assert torch.equal(a, b)


def reference_logits(model, window, think_steps, topk=0):
    with torch.no_grad():
        # the single model's own System 2, not the product path of generate
        h = model(window)[:, -1:]
        e = model.energies(h)
        return thinking(think_steps, topk=topk)(model, e, ebm.make_energy(model, h, e))[-1][:, -1]


@pytest.mark.parametrize("bs,prompt_len", [(16, 5), (16, 16), (16, 20), (3, 2), (1, 1), (1, 4)])
def test_generate_past_block_size(tiny_factory, bs, prompt_len):
    """Past block_size both paths run; each cached token is the greedy pick of an uncached pass on
    its window."""
    model = tiny_factory(seed=4, entropy_weight=0.2, block_size=bs).eval()
    prompt = tokens(2, prompt_len, seed=7)
    n = 30
    cached = ebm.generate(model, prompt, n, thinking(2), use_cache=True)
    plain = ebm.generate(model, prompt, n, thinking(2), use_cache=False)
    assert cached.shape == plain.shape == (2, prompt_len + n)
    # uncached: every new token is the greedy pick on the last block_size tokens
    for L in range(prompt_len, prompt_len + n):
        z = reference_logits(model, plain[:, max(0, L - bs):L], 2)
        assert torch.equal(plain[:, L], z.argmax(-1))
    # cached: the window starts at max(0, L0 - bs) and, whenever the cache is full, restarts from
    # the last bs // 2 tokens (at least one)
    start, rebuilds = max(0, prompt_len - bs), 0
    for L in range(prompt_len, prompt_len + n):
        # the cache holds tokens start..L-2: a full block, rebuild
        if L > prompt_len and L - 1 - start == bs:
            start, rebuilds = L - max(1, bs // 2), rebuilds + 1
        assert 0 < L - start <= bs
        z = reference_logits(model, cached[:, start:L], 2)
        assert torch.equal(cached[:, L], z.argmax(-1)), (L, start)
    assert rebuilds >= 1
    # up to the first rebuild the two paths agree (always, when a window is a single token)
    first = prompt_len + n if bs == 1 else (bs + 1 if prompt_len <= bs else prompt_len + 1)
    assert torch.equal(cached[:, :first], plain[:, :first])


def test_generate_greedy_is_deterministic(tiny_model):
    """Greedy generation (sample=False) gives the same tokens twice and ignores the global RNG."""
    prompt = tokens(3, 4, seed=8)
    torch.manual_seed(0)
    a = ebm.generate(tiny_model, prompt, 20, thinking(2))
    torch.manual_seed(1)
    b = ebm.generate(tiny_model, prompt, 20, thinking(2))
    assert torch.equal(a, b)


def test_generate_sampling_is_reproducible_with_a_seeded_generator(tiny_factory):
    """sample=True with the same seeded torch.Generator gives the same tokens; another seed gives
    others."""
    model = tiny_factory(seed=5).eval()
    with torch.no_grad():  # a spread-out distribution, so draws differ from the argmax
        model.energy_head.weight.mul_(0.1)
    prompt = tokens(2, 3, seed=9)

    def run(seed):
        torch.manual_seed(1234)  # the global RNG is the same each time: only the generator differs
        choose = partial(ebm.pick, sample=True, generator=torch.Generator().manual_seed(seed))
        return ebm.generate(model, prompt, 25, thinking(1), choose)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    greedy = ebm.generate(model, prompt, 25, thinking(1))
    assert not torch.equal(a, greedy)  # sampling really samples


# --------------------------------------------------------------------------------------------------
# pick and next_logits


def test_pick_tiny_top_p_is_argmax():
    """A tiny top_p keeps only the most likely token, so sampling yields the argmax every time."""
    g = torch.Generator().manual_seed(10)
    z = torch.randn(64, V, generator=g, dtype=torch.float64)
    for _ in range(20):
        got = ebm.pick(z, True, temperature=1.0, top_p=1e-6, generator=g)
        assert got.shape == (64, 1)
        assert torch.equal(got[:, 0], z.argmax(-1))


def test_pick_top_p_samples_within_the_nucleus():
    """top_p draws only from the smallest set of top tokens whose mass reaches top_p, and from all
    of it."""
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]], dtype=torch.float64)
    z = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(11)
    got = ebm.pick(z, True, top_p=0.7, generator=g)[:, 0]
    assert set(got.tolist()) == {1, 3}
    frac = (got == 1).double().mean().item()  # 0.5 / 0.8 within the nucleus
    assert abs(frac - 0.625) < 0.05
    assert set(ebm.pick(z, True, top_p=1.0, generator=g)[:, 0].tolist()) == {0, 1, 2, 3}


def test_pick_greedy_and_temperature():
    """sample=False is the argmax; a very low sampling temperature also gives the argmax."""
    z = torch.randn(32, V, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    assert torch.equal(ebm.pick(z, False)[:, 0], z.argmax(-1))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(ebm.pick(z, True, temperature=1e-4, generator=g)[:, 0], z.argmax(-1))


@pytest.mark.parametrize("k", [1, 3, 7])
def test_next_logits_topk(tiny_factory, k):
    """topk=k: tokens outside the System 1 top-k get -inf, and with tau = 0 the argmax is System
    1's."""
    model = tiny_factory(seed=6, entropy_weight=0.0, think_lr=2.0).eval()
    h = torch.randn(20, 32, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    with torch.no_grad():
        e = model.energies(h)
        z = ebm.next_logits(Product([model], [1.0]), [h[:, None]], [None], thinking(4, topk=k))
    s1_top = e.topk(k, -1, largest=False).indices
    finite = torch.isfinite(z)
    assert (finite.sum(-1) == k).all()
    assert torch.equal(finite, torch.zeros_like(finite).scatter(-1, s1_top, True))
    assert (z[~finite] == -math.inf).all()
    assert torch.equal(z.argmax(-1), e.argmin(-1))
    # the candidates were thought about: their logits moved away from System 1's (tau = 0 sharpens)
    if k > 1:
        z0 = -e / model.config.softmax_temperature
        assert (z[finite] - z0[finite]).abs().max() > 1e-3


def test_next_logits_without_topk_is_system2(tiny_factory):
    """next_logits of one model (a product of one expert) with topk=0 equals system2_logits on its
    energies; think_steps=0 is System 1."""
    model = tiny_factory(seed=7, entropy_weight=0.4).eval()
    h = torch.randn(5, 32, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    with torch.no_grad():
        e = model.energies(h)
        def one(steps, topk=0):
            return ebm.next_logits(Product([model], [1.0]), [h[:, None]], [None],
                                   thinking(steps, topk=topk))

        assert torch.allclose(one(3), ebm.system2_logits(model, e, ebm.linear_energy(e), 3)[-1])
        assert torch.allclose(one(0), -e / model.config.softmax_temperature)
        assert torch.allclose(F.softmax(one(0, topk=V), -1), F.softmax(-e, -1))


@pytest.mark.parametrize("energy", ["linear", pytest.param("mixture", marks=pytest.mark.slow),
                                    pytest.param("transformer", marks=pytest.mark.slow)])
def test_compiled_generation_equals_eager(tiny_factory, energy):
    """generate(compile=True) gives the same greedy tokens and the same logits as the eager path,
    past block_size."""
    model = tiny_factory(seed=4, dtype=torch.float32, energy=energy, think_steps=3).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 5),
                        generator=torch.Generator().manual_seed(0))
    think = partial(ebm.system2_logits, steps=3)
    # 5 + 30 tokens > block_size 16: crosses a cache rebuild
    eager = ebm.generate(model, idx, 30, think)
    compiled = ebm.generate(model, idx, 30, think, compile=True)
    # tokens: the picks' top-2 logit gaps (> 3e-5) dwarf float32 rounding
    assert torch.equal(eager, compiled)
    caches = model.new_caches(2)
    h = model(idx, caches)[:, -1:]
    product = Product([model], [1.0])
    torch.testing.assert_close(torch.compile(ebm.next_logits)(product, [h], [caches], think),
                               ebm.next_logits(product, [h], [caches], think))
