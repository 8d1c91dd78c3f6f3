"""Tests of products of experts (energies.Product, generate with several models, sample.py and
eval.py with experts=[...]) and of a ban, the hand-written expert whose energy is infinite on some
characters."""

from functools import partial

import pytest
import torch
from torch.nn import functional as F

import ebm
import eval as eval_mod
from conftest import perturb
from energies import Product, restrict
from helpers import TINY, compose_cfg, error_lines, run_main, run_sample, run_train
from sample import thinking

ENERGIES = ["linear", "mixture", "transformer"]


def tokens(b, t, seed, vocab=11):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def product_zs(models, weights, idx, steps, banned=()):
    """System 1 and the think steps [z_0, ..., z_K] of the product of models at weights on tokens
    idx."""
    seen = [ebm.observe(m, idx) for m in models]
    e, energy = Product(models, weights)([h for h, _, _ in seen], [c for _, _, c in seen])
    return restrict(partial(ebm.system2_logits, steps=steps), banned=banned)(models[0], e, energy)


@pytest.mark.parametrize("energy", ENERGIES)
def test_product_of_one_expert_is_that_expert(tiny_factory, energy):
    """A product of one expert at weight 1 gives that model's own System 1 and thinking logits, and
    its greedy generation is the model's own System 2 pick at every token."""
    model = perturb(tiny_factory(seed=1, energy=energy, entropy_weight=0.3)).eval()
    idx = tokens(2, 9, seed=2)
    with torch.no_grad():
        h, e, caches = ebm.observe(model, idx)
        own = ebm.system2_logits(model, e, ebm.make_energy(model, h, e, caches), 3)
        one = product_zs([model], [1.0], idx, 3)
        for a, b in zip(own, one):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
        out = ebm.generate(Product([model], [1.0]), idx[:, :3], 10, thinking(3))
        # 13 <= block_size 16: no cache rebuild, the whole prefix is the context
        for L in range(3, 13):
            h, e, caches = ebm.observe(model, out[:, :L])
            z = ebm.system2_logits(model, e[:, -1:], ebm.make_energy(model, h[:, -1:], e[:, -1:],
                                                                     caches), 3)[-1][:, -1]
            assert torch.equal(out[:, L], z.argmax(-1)), L


@pytest.mark.parametrize("energy", ENERGIES)
def test_weights_scale_energies(tiny_factory, energy):
    """Energies add with their weights: expert A twice at weights [a, b] is A at weight a + b
    (System 1 and every think step), and A at weight w has System 1 logits w times A's."""
    model = perturb(tiny_factory(seed=3, energy=energy, entropy_weight=0.2)).eval()
    idx = tokens(2, 8, seed=4)
    with torch.no_grad():
        twice = product_zs([model, model], [0.7, 1.8], idx, 3)
        once = product_zs([model], [2.5], idx, 3)
        for a, b in zip(twice, once):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(once[0], 2.5 * product_zs([model], [1.0], idx, 0)[0], rtol=1e-12,
                                   atol=1e-12)
        # the weight matters
        assert not torch.allclose(once[-1], product_zs([model], [1.0], idx, 3)[-1])


def test_product_generation_adds_energies_each_in_its_own_block(tiny_factory):
    """Generating from two linear experts with different block sizes picks, at every token, the
    argmax of thinking on w_a e_a + w_b e_b, each expert reading at most its own block_size tokens;
    the KV-cached run agrees with the uncached one until an expert's cache is first rebuilt."""
    a = perturb(tiny_factory(seed=5, entropy_weight=0.3), seed=1).eval()
    b = perturb(tiny_factory(seed=6, entropy_weight=0.1, block_size=8), seed=2).eval()
    prompt, n, weights = tokens(2, 3, seed=7), 20, [1.0, 0.6]
    plain = ebm.generate(Product([a, b], weights), prompt, n, thinking(2), use_cache=False)
    cached = ebm.generate(Product([a, b], weights), prompt, n, thinking(2))
    with torch.no_grad():
        for L in range(3, 3 + n):
            # each expert: at most its own block
            e_a = a.energies(a(plain[:, max(0, L - 16):L])[:, -1])
            e_b = b.energies(b(plain[:, max(0, L - 8):L])[:, -1])
            e = weights[0] * e_a + weights[1] * e_b
            assert torch.equal(plain[:, L], ebm.system2_logits(a, e, ebm.linear_energy(e),
                                                               2)[-1].argmax(-1)), L
    # b's cache holds 8 tokens at L = 9: rebuilt after that
    assert torch.equal(cached[:, :9], plain[:, :9])


@pytest.mark.parametrize("topk", [0, 4])
def test_ban_holds_in_greedy_and_sampled_text(tiny_factory, topk):
    """Banned tokens never appear in greedy or sampled generation (with thinking, with and without
    topk), although the same model generates them without the ban."""
    model = tiny_factory(seed=8, entropy_weight=0.3).eval()
    with torch.no_grad():  # a spread-out distribution: every token is likely somewhere
        model.energy_head.weight.mul_(0.1)
    prompt, banned = tokens(4, 3, seed=9), (0, 3, 5)

    def run(sample, ban):
        choose = partial(ebm.pick, sample=sample, temperature=2.0,
                         generator=torch.Generator().manual_seed(0))
        product = Product([model, model], [1.0, 0.5])
        return ebm.generate(product, prompt, 60, thinking(2, 1, topk, ban), choose)[:, 3:]

    for sample in (False, True):
        assert not torch.isin(run(sample, banned), torch.tensor(banned)).any()
    assert torch.isin(run(True, ()), torch.tensor(banned)).any()  # the test is not vacuous


def test_ban_is_an_infinite_energy(tiny_factory):
    """A ban composes with the learned energy as an infinite energy would: System 1 gives banned
    tokens -inf and the others the learned distribution renormalised; thinking leaves them at -inf
    and the rest finite."""
    model = perturb(tiny_factory(seed=10, energy="mixture", entropy_weight=0.3)).eval()
    idx, banned = tokens(2, 6, seed=11), (1, 4)
    allowed = torch.tensor([v for v in range(11) if v not in banned])
    with torch.no_grad():
        zs = product_zs([model], [1.0], idx, 3, banned=banned)
        free = product_zs([model], [1.0], idx, 0)[0]
    torch.testing.assert_close(F.log_softmax(zs[0], -1)[..., allowed],
                               F.log_softmax(free[..., allowed], -1))
    for z in zs:
        assert (z[..., list(banned)] == -torch.inf).all() and torch.isfinite(z[..., allowed]).all()


# --------------------------------------------------------------------------------------------------
# sample.py and eval.py with experts=[...]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny models trained on tiny Shakespeare with different seeds."""
    out = tmp_path_factory.mktemp("experts")
    for seed in (1, 2):
        run_train(TINY + ["train.max_steps=6", f"train.seed={seed}", f"out_dir={out / str(seed)}"])
    return out / "1" / "final.pt", out / "2" / "final.pt"


def test_sample_ban_makes_a_lipogram(checkpoints, capsys):
    """sample.py with ban=e and two experts generates text without the letter e (greedy and
    sampled); without the ban the sampled text has e's."""
    experts = f"experts=[{checkpoints[0]},{checkpoints[1]}]"
    base = [experts, "expert_weights=[1,0.5]", "prompt=The", "max_new_tokens=200"]
    for extra in ([], ["sample=true", "seed=3"]):
        text = run_sample(base + ["ban=e"] + extra, capsys)[0]
        assert text.startswith("The") and "e" not in text[3:]  # the prompt may have one
    assert "e" in run_sample(base + ["sample=true", "seed=3"], capsys)[0][3:]


def test_mismatched_vocabularies_get_one_line(checkpoints, tmp_path):
    """Experts with different character lists, or too few weights, stop sample.py with one line
    naming the cause."""
    ckpt = torch.load(checkpoints[1], weights_only=True)
    ckpt["vocab"] = ckpt["vocab"][:-1] + ["#"]
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    cases = {f"experts=[{checkpoints[0]},{other}]": ["vocabularies differ", "'#'"],
             "expert_weights=[1]": ["expert_weights has 1 entries for 2 experts"]}
    for arg, parts in cases.items():
        both = f"experts=[{checkpoints[0]},{checkpoints[1]}]"
        args = [arg] if arg.startswith("experts") else [both, arg]
        r = run_main("sample.py", args)
        lines = error_lines(r.stderr)
        assert (r.returncode != 0 and len(lines) == 1
                and lines[0].startswith("error:")), r.stderr[-2000:]
        assert all(p in lines[0] for p in parts), lines[0]


def test_eval_product_of_an_expert_with_itself(checkpoints):
    """eval.py with experts=[a,a] at weights [0.5,0.5] scores the product as a alone (the energies
    average to a's), beside each expert alone; with [a,b] the product differs from both."""
    a, b = (str(c) for c in checkpoints)
    rows = eval_mod.main_eval(compose_cfg("eval", [f"experts=[{a},{a}]", "expert_weights=[0.5,0.5]",
                                                   "max_tokens=1024"]))["product"]
    assert [r["member"] for r in rows] == [f"{a} alone", f"{a} alone",
                                           "product at weights [0.5, 0.5]"]
    for key in ("s1", "s2", "at_temperature"):
        assert abs(rows[2][key]["loss"] - rows[0][key]["loss"]) < 1e-6
    rows = eval_mod.main_eval(compose_cfg("eval", [f"experts=[{a},{b}]",
                                                   "max_tokens=1024"]))["product"]
    assert rows[2]["s2"]["delta_se"] > 0 and min(abs(rows[2]["s2"]["loss"] - r["s2"]["loss"])
                                                 for r in rows[:2]) > 1e-4
