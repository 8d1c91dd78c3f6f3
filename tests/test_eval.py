"""eval.py: its metrics on cases with known answers, and the report end to end on tiny
checkpoints."""

import hashlib
import json
import math

import pytest
import torch

from conftest import make_model
from helpers import REPO, TINY, compose_cfg, run_train, write_corpus

import ebm
# registers the eval_schema config node; the module, not the builtin
import eval as eval_mod  # noqa: E402
import stats
import viz
from checkpoints import load_model
from data import resolve_path
from util import UserError

PARTS = {"think_sweep", "temperature_control", "self_verification", "exact_verifier", "uncertainty",
         "adaptive",
         "ood", "chains"}
HEADINGS = ["## think sweep", "## temperature-matched control", "## self-verification",
            "## exact verifier",
            "## energy as uncertainty", "## adaptive compute", "## out of distribution",
            "## contrastive chains"]
TIMINGS = {"us_per_token", "eval_seconds"}
# a skewed alphabet (a repeated character is drawn more often), so that a trained model's System 1
# carries information and its best temperature is finite; 9 distinct symbols
ALPHABET = "aaaaaaaabbbbccd efg\n"
OOD_TEXT = "abc defg\nZZ!" * 100  # "Z", "Z", "!" are not in the vocabulary: 300 characters dropped
TRAIN = TINY + ["train.max_steps=30", "train.learning_rate=1e-2", "train.warmup_steps=2",
                "train.eval_interval=100"]
# 20k characters: val is the last 2000, i.e. 124 windows of 16; every 5th (25) tunes, 99 are
# reported
REPORT_TOKENS, TUNE_TOKENS = 99 * 16, 25 * 16
# sha256 of assets/ood.txt, the default ood_text: README.md as of commit 54194fb, the text the
# published EBT OOD figures (docs/results.md) were scored on
OOD_SHA256 = "7528e283f62b87175a63abb1cf2ebe2e4998c0b92046dcf80c623992f7cefa24"


# --------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny linear-energy model trained 30 steps on a skewed random corpus: (checkpoint, ood text
    file)."""
    root = tmp_path_factory.mktemp("eval")
    corpus = write_corpus(root / "corpus.txt", n_chars=20_000, alphabet=ALPHABET)
    run_train(TRAIN + [f"data.data_path={corpus}", f"out_dir={root / 'out'}"])
    ood = root / "ood.txt"
    ood.write_text(OOD_TEXT, encoding="utf-8")
    return root / "out" / "final.pt", ood


def eval_cfg(ckpt, ood, *extra):
    """The typed config of `uv run eval.py checkpoint=ckpt ...` at a small, fast size."""
    return compose_cfg("eval", [f"checkpoint={ckpt}", f"ood_text={ood}", "max_tokens=2048",
                                "sweep=[0,1,2]",
                                "samples=[1,2]", "epsilons=[0.01]", "device=cpu", *extra])


def edited_checkpoint(ckpt, out_dir, edit):
    """A copy of ckpt in out_dir/final.pt with edit(state_dict) applied to its weights."""
    obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    edit(obj["model"])
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(obj, out_dir / "final.pt")
    return out_dir / "final.pt", len(obj["vocab"])


@pytest.fixture(scope="module")
def trained_result(trained):
    """evaluate_checkpoint of the trained model, with an adaptive epsilon so large that every token
    stops after one step and one so small that none stops early."""
    ckpt, ood = trained
    return eval_mod.evaluate_checkpoint(eval_cfg(ckpt, ood, "epsilons=[1e9,1e-30]"))


def figures(r, drop=TIMINGS):
    """Every number of a result (nested dicts and lists), keyed by its path, timings left out."""
    if isinstance(r, dict):
        return {f"{k}/{p}": v for k in r if k not in drop for p, v in figures(r[k], drop).items()}
    if isinstance(r, list):
        return {f"{i}/{p}": v for i, x in enumerate(r) for p, v in figures(x, drop).items()}
    return {"": r}


def phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


# --------------------------------------------------------------------------------------------------
# auroc, ranks, correlations


def test_auroc_extremes(one_thread):
    """auroc is 1 for perfectly separated scores, 0 for reversed ones, 1/2 when every score is
    tied."""
    pos = torch.tensor([0, 0, 0, 1, 1, 0, 1], dtype=torch.bool)
    score = pos.double() * 5 + torch.arange(7) * 0.1  # every positive above every negative
    assert stats.auroc(score, pos) == pytest.approx(1.0, abs=1e-12)
    assert stats.auroc(-score, pos) == pytest.approx(0.0, abs=1e-12)
    assert stats.auroc(torch.full((7,), 3.0), pos) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_pairwise_count(seed, one_thread):
    """auroc equals the brute-force fraction of (positive, negative) pairs ordered right, ties
    counting 1/2."""
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 4, (41,), generator=g).double()  # 4 values: many ties
    pos = torch.rand(41, generator=g) < 0.4
    p, n = score[pos], score[~pos]
    wins = (p[:, None] > n[None, :]).double().sum() + 0.5 * (p[:, None]
                                                             == n[None, :]).double().sum()
    expected = (wins / (p.numel() * n.numel())).item()
    assert 0.05 < expected < 0.95  # a non-trivial case
    assert stats.auroc(score, pos) == pytest.approx(expected, abs=1e-12)
    # 0/1 labels work too
    assert stats.auroc(score, pos.long()) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("d", [0.5, 1.0, 2.0])
def test_auroc_of_two_gaussians(d):
    """Scores N(0,1) for negatives and N(d,1) for positives give auroc Phi(d / sqrt 2)."""
    g = torch.Generator().manual_seed(7)
    n = 20_000
    score = torch.cat([torch.randn(n, generator=g), torch.randn(n, generator=g) + d])
    pos = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
    assert stats.auroc(score, pos) == pytest.approx(phi(d / math.sqrt(2)), abs=0.01)


def test_auroc_is_nan_without_both_classes(one_thread):
    """With no positives (or no negatives) auroc is undefined: nan."""
    score = torch.tensor([0.1, 0.5, 0.3])
    assert math.isnan(stats.auroc(score, torch.zeros(3, dtype=torch.bool)))
    assert math.isnan(stats.auroc(score, torch.ones(3, dtype=torch.bool)))


def test_ranks_ties_share_mean_rank(one_thread):
    """ranks are 1..N with tied values sharing their mean rank."""
    assert stats.ranks(torch.tensor([3, 1, 3, 2])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert stats.ranks(torch.tensor([5.0, 5.0, 5.0])).tolist() == [2.0, 2.0, 2.0]
    assert stats.ranks(torch.tensor([0.3, -1.0, 7.0, 2.0])).tolist() == [2.0, 1.0, 4.0, 3.0]


def test_correlations_known_answers(one_thread):
    """spearman(x, exp x) = 1 (monotone, not linear); pearson(x, 2x + 1) = 1, pearson(x, -x) =
    -1."""
    x = torch.linspace(-3, 3, 50, dtype=torch.float64)
    assert stats.spearman(x, x.exp()) == pytest.approx(1.0, abs=1e-12)
    assert stats.pearson(x, x.exp()) < 0.95  # so the spearman check above is not a linear one
    assert stats.spearman(x, -x.exp()) == pytest.approx(-1.0, abs=1e-12)
    assert stats.pearson(x, 2 * x + 1) == pytest.approx(1.0, abs=1e-12)
    assert stats.pearson(x, -x) == pytest.approx(-1.0, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# best_temperature


def calibrated(n=100_000, v=10, seed=0):
    """Logits z_true (n, v) and targets drawn from softmax(z_true): z_true is calibrated (best T =
    1)."""
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(n, v, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    return z, y


@pytest.mark.parametrize("c", [2.0, 0.5, 1e-3, 1e3])  # energies far from the logits' scale too
def test_best_temperature_recovers_scale(c):
    """For z = c * z_true with targets drawn from softmax(z_true), the best temperature is c."""
    z, y = calibrated()
    assert stats.best_temperature(c * z, y) == pytest.approx(c, rel=0.05)


def test_best_temperature_scaling_law(one_thread):
    """best_temperature(a * z, y) = a * best_temperature(z, y)."""
    z, y = calibrated(n=5_000, seed=1)
    t = stats.best_temperature(z, y)
    for a in (3.0, 0.25):
        assert stats.best_temperature(a * z, y) == pytest.approx(a * t, rel=1e-3)


def test_best_temperature_precise_on_float32_logits(one_thread):
    """best_temperature of float32 logits (what Runner.logits returns) matches that of the same
    values in float64 to 1e-6 relative: the search's precision does not depend on the logits'
    dtype."""
    z, y = calibrated(n=5_000, seed=3)
    z32 = (0.4 * z).float()
    best64 = stats.best_temperature(z32.double(), y)
    assert stats.best_temperature(z32, y) == pytest.approx(best64, rel=1e-6)


def test_best_temperature_is_a_minimum(one_thread):
    """The returned T has mean CE below that at T = 1 and no higher than at T * 1.1 and T / 1.1."""
    z, y = calibrated(n=5_000, seed=2)
    z = 2 * z  # over-confident: the best T is near 2, clearly away from 1

    def loss(t):
        return stats.ce(z / t, y).mean().item()

    t = stats.best_temperature(z, y)
    assert loss(t) < loss(1.0) - 1e-3
    assert loss(t) <= loss(t * 1.1)
    assert loss(t) <= loss(t / 1.1)


# --------------------------------------------------------------------------------------------------
# windows, corrupt_ids, summary


def test_windows_cover_every_target_once(one_thread):
    """Windows do not overlap, y is x shifted by one, and ids[1 : n*T + 1] are the targets, each
    once."""
    # distinct ids: positions traceable
    ids = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    T = 8
    x, y = eval_mod.windows(ids, T)
    n = 99 // T
    assert x.shape == y.shape == (n, T)
    assert torch.equal(x.reshape(-1), ids[: n * T])  # consecutive, non-overlapping
    assert torch.equal(y.reshape(-1), ids[1 : n * T + 1])
    assert torch.equal(y[:, :-1], x[:, 1:])  # shifted by one within a window
    # each exactly once
    assert sorted(y.reshape(-1).tolist()) == sorted(ids[1 : n * T + 1].tolist())


@pytest.mark.parametrize("max_tokens, n", [(40, 5), (47, 5), (48, 6), (10_000, 12)])
def test_windows_max_tokens_caps_the_count(max_tokens, n, one_thread):
    """max_tokens caps the number of scored tokens (whole windows only); a large cap changes
    nothing."""
    ids = torch.arange(100)
    x, y = eval_mod.windows(ids, 8, max_tokens)
    assert x.shape == y.shape == (n, 8)
    assert torch.equal(y.reshape(-1), ids[1 : n * 8 + 1])


def test_windows_too_short_text(one_thread):
    """A text without one window plus its next token raises UserError; exactly one window's worth is
    fine."""
    with pytest.raises(UserError):
        eval_mod.windows(torch.arange(8), 8)
    x, y = eval_mod.windows(torch.arange(9), 8)
    assert x.shape == (1, 8) and y[0, -1] == 8


@pytest.mark.parametrize("rate, V", [(0.1, 7), (0.5, 2), (0.3, 5)])
def test_corrupt_ids_rate_and_range(rate, V, one_thread):
    """About `rate` of positions change (binomial tolerance); a hit never keeps its id; ids stay in
    [0, V)."""
    g = torch.Generator().manual_seed(0)
    n = 20_000
    ids = torch.randint(0, V, (n,), generator=g)
    before = ids.clone()
    out = eval_mod.corrupt_ids(ids, rate, V, torch.Generator().manual_seed(1))
    assert torch.equal(ids, before)  # a copy: the input is untouched
    assert out.shape == ids.shape and out.dtype == torch.long
    assert out.min() >= 0 and out.max() < V
    changed = (out != ids).double().mean().item()
    # if a hit could draw its own id again, the changed fraction would be rate * (1 - 1/V): 0.25 for
    # V = 2
    assert abs(changed - rate) < 5 * math.sqrt(rate * (1 - rate) / n)


def test_corrupt_ids_replacement_is_uniform_over_the_others(one_thread):
    """A substituted id is drawn uniformly from the V - 1 other ids."""
    V, n = 5, 40_000
    out = eval_mod.corrupt_ids(torch.zeros(n, dtype=torch.long), 0.5, V,
                               torch.Generator().manual_seed(3))
    counts = torch.bincount(out[out != 0], minlength=V)[1:].double()
    assert counts.sum() > 0.45 * n
    assert (counts / counts.sum() - 1 / (V - 1)).abs().max() < 0.02


def test_corrupt_ids_rate_zero_and_seeded(one_thread):
    """Rate 0 changes nothing; the same seed gives the same copy, another seed another copy."""
    ids = torch.randint(0, 9, (3, 500), generator=torch.Generator().manual_seed(0))
    assert torch.equal(eval_mod.corrupt_ids(ids, 0.0, 9, torch.Generator().manual_seed(1)), ids)
    a = eval_mod.corrupt_ids(ids, 0.2, 9, torch.Generator().manual_seed(1))
    b = eval_mod.corrupt_ids(ids, 0.2, 9, torch.Generator().manual_seed(1))
    c = eval_mod.corrupt_ids(ids, 0.2, 9, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_summary_by_hand(one_thread):
    """summary: mean, bits = loss / ln 2, paired delta; a 1-D tensor is windows of one character,
    whose bootstrap standard errors are near the plug-in std / sqrt(n) (1000 resamples: a few % of
    noise)."""
    losses = torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=torch.float64)
    base = torch.tensor([1.0, 1.0, 2.0, 2.0], dtype=torch.float64)  # differences 0, 1, 2, 5
    s = stats.summary(losses)
    assert set(s) == {"loss", "bits_per_char", "se"}
    assert s["loss"] == pytest.approx(3.5)
    assert s["bits_per_char"] == pytest.approx(3.5 / math.log(2))
    assert s["se"] == pytest.approx(stats.bootstrap_se(losses), rel=1e-12)
    # bootstrap: the variance divides by n
    assert s["se"] == pytest.approx(math.sqrt(21 / 4) / 2, rel=0.1)
    p = stats.summary(losses, base)
    assert p["delta"] == pytest.approx(2.0)
    # not the unpaired sqrt(se_a^2 + se_b^2)
    assert p["delta_se"] == pytest.approx(math.sqrt(14 / 4) / 2, rel=0.1)
    assert p["loss"] == pytest.approx(3.5)


# --------------------------------------------------------------------------------------------------
# standard errors: a bootstrap over windows


def test_bootstrap_se_of_iid_windows_is_analytic(one_thread):
    """With i.i.d. characters the window bootstrap's se agrees with the per-character std /
    sqrt(N)."""
    losses = torch.randn(400, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    analytic = losses.std() / math.sqrt(losses.numel())
    assert stats.summary(losses)["se"] == pytest.approx(analytic.item(), rel=0.1)


def test_bootstrap_se_of_correlated_windows_is_sqrt_t_times_naive(one_thread):
    """When every character of a window has the same loss, the se is sqrt(T) times the naive
    per-character std / sqrt(N): a window, not a character, is the independent unit."""
    T = 16
    per_window = torch.randn(300, 1, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(1))
    losses = per_window.expand(300, T)
    naive = losses.std() / math.sqrt(losses.numel())
    assert stats.summary(losses)["se"] == pytest.approx(math.sqrt(T) * naive.item(), rel=0.1)
    assert stats.summary(losses)["se"] == pytest.approx((per_window.std()
                                                            / math.sqrt(300)).item(), rel=0.1)


def test_bootstrap_delta_se_is_paired(one_thread):
    """delta_se resamples the same windows for both members: a large shared window effect cancels,
    leaving the se of the per-window differences (far below either member's se)."""
    g = torch.Generator().manual_seed(2)
    # window effect, shared by the pair
    shared = 3 * torch.randn(500, 1, dtype=torch.float64, generator=g)
    base = shared + 0.1 * torch.randn(500, 8, dtype=torch.float64, generator=g)
    losses = shared + 0.1 * torch.randn(500, 8, dtype=torch.float64, generator=g)
    s = stats.summary(losses, base)
    expected = ((losses - base).mean(1).std() / math.sqrt(500)).item()  # i.i.d. windows: analytic
    assert s["delta_se"] == pytest.approx(expected, rel=0.15)
    assert s["delta_se"] < s["se"] / 10


def test_bootstrap_is_deterministic(one_thread):
    """The same data gives the same se every time (a seeded generator); another seed gives another
    draw."""
    losses = torch.rand(200, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a, b = stats.summary(losses, losses.flip(0)), stats.summary(losses, losses.flip(0))
    assert a == b
    means = losses.mean(1)
    assert stats.bootstrap_se(means, seed=0) == stats.bootstrap_se(means, seed=0)
    assert stats.bootstrap_se(means, seed=0) != stats.bootstrap_se(means, seed=1)
    se0 = stats.bootstrap_se(means, seed=0)
    assert stats.bootstrap_se(means, seed=1) == pytest.approx(se0, rel=0.15)


# --------------------------------------------------------------------------------------------------
# the report end to end


def test_zero_energies_give_the_uniform_answer(trained, tmp_path, capsys):
    """With every energy 0, System 1 is uniform and thinking keeps it so: every loss is ln V,
    adaptive stops after one step, energies are all tied (auroc 1/2), the chains reach uniform;
    eval.json holds every part, the markdown each heading."""
    ckpt, ood = trained
    zero, V = edited_checkpoint(ckpt, tmp_path / "zero",
                                lambda sd: sd["energy_head.weight"].zero_())
    capsys.readouterr()
    r = eval_mod.main_eval(eval_cfg(zero, ood))
    out = capsys.readouterr().out
    lnV = math.log(V)

    assert V == len(set(ALPHABET))
    assert r["uniform_loss"] == pytest.approx(lnV, abs=1e-12)
    assert r["tokens"] == REPORT_TOKENS and r["tune_tokens"] == TUNE_TOKENS
    assert [row["think_steps"] for row in r["think_sweep"]] == [0, 1, 2]
    for row in r["think_sweep"]:
        assert row["loss"] == pytest.approx(lnV, abs=1e-6)
        assert row["delta"] == pytest.approx(0.0, abs=1e-9)
    t = r["temperature_control"]
    for key in ("s1", "s2", "s1_at_temperature", "s2_at_temperature"):
        assert t[key]["loss"] == pytest.approx(lnV, abs=1e-6), key
    assert [row["samples"] for row in r["self_verification"]] == [1, 2]
    for row in r["self_verification"]:
        assert row["loss"] == pytest.approx(lnV, abs=1e-6)
        # uniform has the lowest free energy -tau H of any start
        assert row["random_start_chosen"] == 0.0
    u = r["uncertainty"]
    for score in ("energy", "free_energy", "max_prob"):
        assert u[score]["auroc"] == pytest.approx(0.5, abs=1e-12), score
    assert 0 < u["error_rate"] < 1
    (row,) = r["adaptive"]
    assert row["mean_steps"] == 1.0 and row["max_steps"] == 2 and row["fixed_steps"] == 1
    assert row["loss"] == pytest.approx(lnV, abs=1e-6)
    o = r["ood"]
    assert o["ood_text"]["dropped_chars"] == 300
    kept = len(OOD_TEXT) - 300
    assert o["ood_text"]["tokens"] == (kept - 1) // 16 * 16
    assert o["corrupted_val"]["tokens"] == REPORT_TOKENS
    for name in ("val", "ood_text", "corrupted_val"):
        for row in o[name]["sweep"]:
            assert row["loss"] == pytest.approx(lnV, abs=1e-6), name

    # the chains descend to the uniform distribution from the data (cd) and from noise (pcd)
    for kind in ("cd", "pcd"):
        kl = [row[kind]["kl"] for row in r["chains"]["rows"]]
        assert kl[0] > 0.1 and all(b < a for a, b in zip(kl, kl[1:])) and kl[-1] < 1e-3, (kind, kl)
    assert "fast_pcd" not in r["chains"]["rows"][0]  # final.pt has no fast weights

    written = json.loads((tmp_path / "zero" / "eval.json").read_text())
    assert {k for k, v in written.items() if isinstance(v, (dict, list))} == PARTS
    assert all(isinstance(v, (str, int, float)) for k, v in written.items() if k not in PARTS)
    assert written["think_sweep"] == r["think_sweep"]
    for heading in HEADINGS:
        assert heading in out, heading


def test_zero_energies_error_rate_is_share_of_non_first_symbol(trained, tmp_path):
    """Uniform logits predict id 0 (argmax takes the first): the error rate is the share of other
    targets."""
    ckpt, ood = trained
    zero, _ = edited_checkpoint(ckpt, tmp_path / "zero",
                                lambda sd: sd["energy_head.weight"].zero_())
    r = eval_mod.evaluate_checkpoint(eval_cfg(zero, ood, "sweep=[0]", "samples=[1]", "epsilons=[]"))
    ck = torch.load(ckpt, weights_only=True)
    text = ck["config"]["data"]["data_path"]
    chars = ck["vocab"]
    ids = torch.tensor([chars.index(c) for c in open(text, encoding="utf-8").read()])
    x, y = eval_mod.windows(ids[int(0.9 * len(ids)):], 16, 2048)
    report = y[torch.arange(x.size(0)) % 5 != 0].reshape(-1)
    assert r["uncertainty"]["error_rate"] == pytest.approx((report != 0).double().mean().item(),
                                                           abs=1e-12)


def test_report_is_consistent_across_parts(trained_result):
    """Known identities between the parts of a trained model's report: K=0 is System 1, M=1 is plain
    thinking, adaptive with a huge epsilon is K=1 and with a tiny one is K=max."""
    r = trained_result
    sweep = {row["think_steps"]: row for row in r["think_sweep"]}
    assert r["tokens"] == REPORT_TOKENS and r["tune_tokens"] == TUNE_TOKENS
    # exact: K = 0 is System 1, the same tensor
    assert sweep[0]["delta"] == 0.0 and sweep[0]["delta_se"] == 0.0
    # thinking does something on this model (not rounding)
    assert abs(sweep[2]["loss"] - sweep[0]["loss"]) > 1e-3
    t = r["temperature_control"]
    assert r["think_steps"] == t["think_steps"] == 2  # the model's think_steps
    assert t["s1"]["loss"] == pytest.approx(sweep[0]["loss"], abs=1e-9)
    assert t["s2"]["loss"] == pytest.approx(sweep[2]["loss"], abs=1e-9)
    assert t["s2"]["delta"] == pytest.approx(sweep[2]["delta"], abs=1e-9)
    # chosen on another slice: near-best
    assert t["s1_at_temperature"]["loss"] <= t["s1"]["loss"] + 0.01
    # each K at its own best temperature: K=0 and K=2 are the temperature control's rows, paired
    # against K=2
    assert (sweep[2]["at_temperature"]["vs_think_steps"] == 2
            and sweep[2]["at_temperature"]["delta"] == 0.0)
    assert sweep[0]["temperature"] == pytest.approx(t["s1_temperature"], rel=1e-9)
    assert sweep[2]["temperature"] == pytest.approx(t["s2_temperature"], rel=1e-9)
    assert sweep[0]["at_temperature"]["loss"] == pytest.approx(t["s1_at_temperature"]["loss"],
                                                               abs=1e-9)
    assert sweep[2]["at_temperature"]["loss"] == pytest.approx(t["s2_at_temperature"]["loss"],
                                                               abs=1e-9)
    assert sweep[0]["at_temperature"]["delta"] == pytest.approx(-t["s2_at_temperature"]["delta"],
                                                                abs=1e-9)
    m1 = r["self_verification"][0]
    assert m1["samples"] == 1 and m1["random_start_chosen"] == 0.0 and m1["delta"] == 0.0
    assert m1["loss"] == pytest.approx(t["s2"]["loss"], abs=1e-9)
    huge, tiny = r["adaptive"]
    assert huge["epsilon"] == 1e9 and huge["mean_steps"] == 1.0 and huge["fixed_steps"] == 1
    assert huge["loss"] == pytest.approx(sweep[1]["loss"], abs=1e-9)
    assert tiny["mean_steps"] == 2.0 and tiny["fixed_steps"] == 2
    assert tiny["loss"] == pytest.approx(sweep[2]["loss"], abs=1e-9)
    assert tiny["fixed"]["loss"] == pytest.approx(sweep[2]["loss"], abs=1e-9)
    assert r["ood"]["val"]["sweep"] == r["think_sweep"]
    for name in ("val", "ood_text", "corrupted_val"):
        o = r["ood"][name]
        best = min(o["sweep"], key=lambda row: row["loss"])
        assert o["best_think_steps"] == best["think_steps"]
        assert o["gain"] == pytest.approx(-best["delta"], abs=1e-12) and o["gain"] >= 0
    # 5% of the inputs substituted: not val (~4e-5 apart on this model, which uses little context;
    # rounding ~1e-7)
    assert abs(r["ood"]["corrupted_val"]["sweep"][0]["loss"] - sweep[0]["loss"]) > 1e-5


def test_exact_verifier_of_linear_energy_is_system1_at_its_temperature(trained_result):
    """Linear energy: E(x, onehot(v)) = e[v], so the exact verifier is System 1 at its best
    temperature, and its argmin is System 1's argmax (which linear thinking keeps)."""
    r = trained_result
    x, t = r["exact_verifier"], r["temperature_control"]
    assert x["temperature"] == pytest.approx(t["s1_temperature"], rel=1e-6)
    assert x["loss"] == pytest.approx(t["s1_at_temperature"]["loss"], abs=1e-6)
    # tau = 0.1, no noise: thinking keeps the argmax
    assert x["argmax_is_argmin"] == pytest.approx(1.0)
    assert x["accuracy"] == pytest.approx(x["think_accuracy"])


def test_self_verification_reports_both_rankings(trained_result):
    """Each self-verification row ranks by the model's verify_by and, under by_<other>, by the
    other."""
    for row in trained_result["self_verification"]:
        # the default ranks by E
        assert row["verify_by"] == "energy" and "loss" in row["by_free_energy"]
    assert (trained_result["self_verification"][0]["by_free_energy"]["loss"]
            == trained_result["self_verification"][0]["loss"])


def test_corrupt_zero_copies_val(trained):
    """corrupt=0: the corrupted copy of val is val itself, so its sweep equals the think sweep."""
    ckpt, ood = trained
    r = eval_mod.evaluate_checkpoint(eval_cfg(ckpt, ood, "corrupt=0.0", "samples=[1]",
                                              "epsilons=[]"))
    # only val's sweep uses the tune slice
    untuned = TIMINGS | {"temperature", "at_temperature", "loss_all_windows"}
    assert figures(r["ood"]["corrupted_val"]["sweep"], untuned) == figures(r["think_sweep"],
                                                                           untuned)


def test_corrupted_val_corrupts_inputs_only(trained, monkeypatch):
    """The corrupted-val runner scores the clean val targets; about `corrupt` of its inputs are
    substituted."""
    ckpt, ood = trained
    built = []

    class Spy(eval_mod.Runner):
        def __init__(self, model, x, y, *args):
            built.append((x, y))
            super().__init__(model, x, y, *args)

    monkeypatch.setattr(eval_mod, "Runner", Spy)
    rate = 0.2
    eval_mod.evaluate_checkpoint(eval_cfg(ckpt, ood, f"corrupt={rate}", "sweep=[0]", "samples=[1]",
                                          "epsilons=[]"))
    (x_report, y_report), (x_corrupt, y_corrupt) = built[0], built[-1]  # built first and last
    assert x_report.numel() == REPORT_TOKENS and x_corrupt.shape == x_report.shape
    assert torch.equal(y_corrupt, y_report)  # the true next characters of the clean text
    changed = (x_corrupt != x_report).double().mean().item()
    assert abs(changed - rate) < 5 * math.sqrt(rate * (1 - rate) / REPORT_TOKENS)


def test_self_verify_returns_the_kept_start(monkeypatch, one_thread):
    """self_verify: per position the index (0 = System 1) of the start whose thought candidate is
    kept; one start gives all zeros; the logits are those of the same starts run again."""
    tau, K, M = 0.1, 3, 4
    model = make_model(entropy_weight=tau, think_lr=1.0, think_max_move=math.inf,
                       verify_by="free_energy").eval()
    e = torch.randn(3, 16, model.config.vocab_size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    calls = []
    real_think = ebm.think
    monkeypatch.setattr(ebm, "think", lambda *a,
                        **k: calls.append(real_think(*a, **k)) or calls[-1])
    torch.manual_seed(0)
    zs, chosen = ebm.self_verify(model, e, ebm.linear_energy(e), K, M)
    torch.manual_seed(0)
    plain = ebm.self_verify(model, e, ebm.linear_energy(e), K, M)[0]
    candidates = calls[0][-1]  # (M, 3, 16, V): every start after K steps
    assert chosen.shape == (3, 16) and chosen.dtype == torch.long
    # System 1 wins somewhere, a random start elsewhere
    assert 0 < (chosen != 0).sum() < chosen.numel()
    kept = candidates.gather(0, chosen[None, ..., None].expand(1, 3, 16, e.size(-1)))[0]
    assert torch.equal(zs[-1], kept)  # the returned logits are the chosen candidate's
    free = ebm.free_energy(candidates, ebm.linear_energy(e), tau)[1]  # (M, 3, 16)
    assert (free.gather(0, chosen[None])[0] <= free.min(0).values + 1e-12).all()  # the lowest F
    assert all(torch.equal(a, b) for a, b in zip(zs, plain))
    zs1, chosen1 = ebm.self_verify(model, e, ebm.linear_energy(e), K, 1)
    assert torch.equal(chosen1, torch.zeros(3, 16, dtype=torch.long)) and len(zs1) == K + 1


def test_random_start_chosen_counts_chosen_indices(trained, monkeypatch):
    """random_start_chosen is the share of report tokens whose kept start index is not 0, read from
    self_verify (here forced to odd positions: exactly 1/2), never from comparing logits."""
    ckpt, ood = trained
    real = eval_mod.self_verify

    def forced(*args, **kwargs):
        zs, chosen = real(*args, **kwargs)
        if args[4] == 1:  # one start
            return zs, chosen
        return zs, torch.arange(chosen.size(-1)).expand_as(chosen) % 2

    monkeypatch.setattr(eval_mod, "self_verify", forced)
    r = eval_mod.evaluate_checkpoint(eval_cfg(ckpt, ood, "sweep=[0]", "samples=[1,2]",
                                              "epsilons=[]"))
    m1, m2 = r["self_verification"]
    assert m1["random_start_chosen"] == 0.0 and m2["random_start_chosen"] == 0.5


def test_markdown_says_what_plus_minus_is(trained_result):
    """The report's header names the bootstrap, its resamples and windows; the sweep shows loss ±
    se."""
    r = trained_result
    assert (r["report_windows"] == REPORT_TOKENS // 16
            and r["bootstrap_resamples"] == stats.BOOTSTRAP)
    head = viz.eval_markdown(r).split("## think sweep")[0]
    assert ("bootstrap" in head and f"{stats.BOOTSTRAP} " in head
            and f"{r['report_windows']} report windows" in head)
    row = r["think_sweep"][0]
    assert f"{row['loss']:.4f} ± {row['se']:.4f}" in viz.eval_markdown(r)


def test_two_runs_give_identical_figures(trained, trained_result):
    """Two evaluations of the same checkpoint agree exactly in every figure but the timings."""
    ckpt, ood = trained
    again = eval_mod.evaluate_checkpoint(eval_cfg(ckpt, ood, "epsilons=[1e9,1e-30]"))
    a, b = figures(trained_result), figures(again)
    assert a.keys() == b.keys()
    assert len(a) > 100
    assert {k: v for k, v in a.items() if a[k] != b[k]} == {}


def test_doubling_energies_doubles_the_s1_temperature(trained, trained_result, tmp_path):
    """2 * energy_head.weight doubles System 1's chosen temperature and leaves its tempered loss
    unchanged."""
    ckpt, ood = trained
    doubled, _ = edited_checkpoint(ckpt, tmp_path / "x2",
                                   lambda sd: sd["energy_head.weight"].mul_(2))
    r = eval_mod.evaluate_checkpoint(eval_cfg(doubled, ood, "sweep=[0]", "samples=[1]",
                                              "epsilons=[]"))
    a, b = trained_result["temperature_control"], r["temperature_control"]
    assert 0.05 < a["s1_temperature"] < 20  # an interior optimum, not the search's bound
    assert b["s1_temperature"] == pytest.approx(2 * a["s1_temperature"], rel=1e-3)
    assert b["s1_at_temperature"]["loss"] == pytest.approx(a["s1_at_temperature"]["loss"], abs=1e-6)
    assert abs(b["s1"]["loss"] - a["s1"]["loss"]) > 1e-3  # the raw System 1 did change


# --------------------------------------------------------------------------------------------------
# bad input and side effects


@pytest.mark.parametrize("override", ["sweep=[-1]", "samples=[0]", "sweep=[]", "samples=[]"])
def test_bad_sweep_or_samples(override, trained):
    """A negative think_steps in sweep, samples < 1 or an empty list is a UserError."""
    ckpt, ood = trained
    with pytest.raises(UserError):
        eval_mod.evaluate_checkpoint(eval_cfg(ckpt, ood, override))


def test_missing_ood_text_names_it(trained, tmp_path):
    """A missing ood_text is a UserError naming the file, and no eval.json is written."""
    ckpt, _ = trained
    missing = tmp_path / "no_such_file.txt"
    run = tmp_path / "run"
    copy, _ = edited_checkpoint(ckpt, run, lambda sd: None)
    with pytest.raises(UserError, match="no_such_file.txt"):
        eval_mod.main_eval(eval_cfg(copy, missing, "sweep=[0]", "samples=[1]", "epsilons=[]"))
    assert not (run / "eval.json").exists()


def test_default_ood_text_is_the_pinned_file(tmp_path, monkeypatch):
    """The default ood_text is assets/ood.txt, found from any working directory, and its content is
    pinned: editing it (or pointing the default at a file that moves, like README.md) would move
    every published OOD figure."""
    monkeypatch.chdir(tmp_path)  # not the repo root: the default still resolves there
    default = compose_cfg("eval", []).ood_text
    assert default == "assets/ood.txt"
    path = resolve_path(default)
    assert path.resolve() == (REPO / "assets" / "ood.txt").resolve()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == OOD_SHA256


def test_eval_json_records_the_ood_sha256(trained, trained_result):
    """eval.json's ood part names the text it scored and records its sha256 (of the file's bytes,
    as sha256sum prints it), so a figure can be traced to its exact text."""
    _, ood = trained
    o = trained_result["ood"]
    assert o["ood_path"] == str(ood)
    assert o["ood_sha256"] == hashlib.sha256(ood.read_bytes()).hexdigest()


def test_evaluate_leaves_grad_mode_alone(trained):
    """evaluate_checkpoint leaves torch's global grad mode as it found it (a caller may train
    afterwards)."""
    ckpt, ood = trained
    torch.set_grad_enabled(True)
    try:
        eval_mod.evaluate_checkpoint(eval_cfg(ckpt, ood, "sweep=[0]", "samples=[1]", "epsilons=[]"))
        assert torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)


def test_chains_part_reads_fast_weights_from_ckpt_pt(trained, tmp_path):
    """A fast_pcd run's ckpt.pt gives a fast_pcd row (chains under W_E + fast weights, farther from
    the model than pcd's at every k >= 1); final.pt has none; at k = 0 pcd and fast_pcd are the same
    noise."""
    ckpt, ood = trained
    corpus = write_corpus(tmp_path / "corpus.txt", n_chars=20_000, alphabet=ALPHABET)
    run_train(TRAIN + [f"data.data_path={corpus}", f"out_dir={tmp_path / 'out'}",
                       "model.use_contrastive=true",
                       "model.contrastive_type=fast_pcd", "model.fast_weight_lr=5.0"])
    rows = eval_mod.evaluate_checkpoint(eval_cfg(tmp_path / "out" / "ckpt.pt", ood,
                                                 "chain_steps=[0,1,4]",
                                                 "epsilons=[]"))["chains"]["rows"]
    assert rows[0]["fast_pcd"]["kl"] == pytest.approx(rows[0]["pcd"]["kl"], rel=1e-6)
    assert all(r["fast_pcd"]["kl"] > r["pcd"]["kl"] + 1e-4 for r in rows[1:]), rows
    final = eval_mod.evaluate_checkpoint(eval_cfg(tmp_path / "out" / "final.pt", ood,
                                                  "chain_steps=[0,1]",
                                                  "epsilons=[]"))["chains"]
    assert ("fast_pcd" not in final["rows"][0] and final["step_size"] == 0.5
            and final["temperature"] == 1.0)


def test_loss_all_windows_scores_every_window(trained, trained_result):
    """loss_all_windows is the mean loss of the prediction over every window of the first max_tokens
    val characters, the tune slice's too, as another program scoring those characters would compute
    it."""
    ckpt, _ = trained
    model, vocab, cfg = load_model(ckpt, "cpu")
    x, y, tune = eval_mod.val_windows(cfg, vocab, model.config.block_size, 2048)
    assert tune.any() and (~tune).any()
    for row in trained_result["think_sweep"]:
        with torch.no_grad():
            ce = ebm.losses(model, x, y, think_steps=row["think_steps"])["ce"]
        assert abs(row["loss_all_windows"] - ce.mean().item()) < 1e-5


def test_a_run_with_its_own_val_text_is_scored_on_it(tmp_path):
    """A run trained with data.val_path is scored on that file, not on the last 10% of data_path:
    its windows are the val file's, and the tokens reported and tuned are all of the val file's
    whole windows of block_size (187 windows of 16 in 3000 characters, where the last 10% of
    data_path would give 124)."""
    corpus = write_corpus(tmp_path / "corpus.txt", n_chars=20_000, alphabet=ALPHABET)
    val = write_corpus(tmp_path / "val.txt", n_chars=3000, alphabet=ALPHABET, seed=1)
    run_train(TINY + [f"data.data_path={corpus}", f"data.val_path={val}",
                      f"out_dir={tmp_path / 'out'}"])
    ckpt = tmp_path / "out" / "final.pt"
    model, vocab, cfg = load_model(ckpt, "cpu")
    assert cfg["data"]["val_path"] == str(val)
    x, y, _ = eval_mod.val_windows(cfg, vocab, 16, 0)
    ids = torch.tensor(vocab.encode(val.read_text(encoding="utf-8")))
    assert x.shape == (187, 16) and torch.equal(x.flatten(), ids[: 187 * 16])
    assert torch.equal(y.flatten(), ids[1 : 187 * 16 + 1])
    ood = tmp_path / "ood.txt"
    ood.write_text(OOD_TEXT, encoding="utf-8")
    r = eval_mod.evaluate_checkpoint(compose_cfg("eval", [
        f"checkpoint={ckpt}", f"ood_text={ood}", "sweep=[0,1]", "samples=[1]", "epsilons=[]",
        "chain_steps=[]", "device=cpu"]))
    assert r["tokens"] + r["tune_tokens"] == (3000 - 1) // 16 * 16 != (2000 - 1) // 16 * 16
    assert r["tune_tokens"] == 38 * 16 and r["report_windows"] == 187 - 38


def test_sweep_only_scores_the_sweep_alone_with_the_same_figures(tmp_path, capsys):
    """sweep_only=true: eval.json holds the think sweep (the same figures as a whole evaluation's)
    and none of the other parts, and its report prints."""
    out = tmp_path / "run"
    run_train(TINY + [f"data.data_path={write_corpus(tmp_path / 'c.txt')}", f"out_dir={out}"])
    args = [f"checkpoint={out / 'final.pt'}", "max_tokens=1024", "sweep=[0,2]", "samples=[1]",
            "epsilons=[]", "chain_steps=[]"]
    whole = eval_mod.evaluate_checkpoint(compose_cfg("eval", args))
    alone = eval_mod.evaluate_checkpoint(compose_cfg("eval", args + ["sweep_only=true"]))
    assert [row["loss"] for row in alone["think_sweep"]] == [row["loss"] for row in whole["think_sweep"]]
    assert not {"temperature_control", "exact_verifier", "ood", "uncertainty"} & alone.keys()
    assert "think sweep" in viz.eval_markdown(alone)
