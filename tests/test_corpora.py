"""The fresh-data corpora (corpora.py): the synthetic language's sampler and entropy estimate, the
natural text's cleaning, and the refusal of a file that is not the pinned one. Every test makes its
own small text: no network, no tiny Shakespeare."""

import math
import random
import string
from collections import Counter, defaultdict

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import corpora
from corpora import NGram, mean_and_se, sample
from helpers import REPO
from util import UserError

TINY_CHARS = sorted("\n !$&',-.3:;?" + string.ascii_letters)  # tiny Shakespeare's 65 characters
WORDS = ("the king queen lord my thy good sir love death night day come go hence speak now "
         "what shall not you and with heart blood crown").split()


def made_up_play(n_lines=2000, seed=0):
    """A small pseudo-play: speaker lines, verse lines of random words (one in ten made of random
    letters, so that every order has counts of 1), blank lines between speeches."""
    rng, out = random.Random(seed), []

    def word():
        if rng.random() < 0.1:
            return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 6)))
        return rng.choice(WORDS)

    for _ in range(n_lines // 4):
        out.append(rng.choice(["KING:", "QUEEN:", "First Lord:"]))
        out += [" ".join(word() for _ in range(rng.randint(3, 8))).capitalize() + ","
                for _ in range(rng.randint(1, 3))]
        out.append("")
    return "\n".join(out) + "\n"


def fitted(text, order):
    chars = sorted(set(text))
    return NGram(chars, corpora.encode(text.encode(), chars), order), chars


def test_same_seed_gives_the_same_text_and_another_seed_another():
    """Sampling is a function of the seed: byte for byte the same text twice, another with another
    seed."""
    model, chars = fitted(made_up_play(), 4)
    a = corpora.decode(sample(model, 20_000, seed=1, streams=20, burn_in=50)[0], chars)
    b = corpora.decode(sample(model, 20_000, seed=1, streams=20, burn_in=50)[0], chars)
    c = corpora.decode(sample(model, 20_000, seed=2, streams=20, burn_in=50)[0], chars)
    assert len(a) == 20_000 and a == b and a != c


def entropy(model, n_chars=100_000, seed=0):
    """The sampler's entropy-rate estimate: mean and bootstrap se over its streams."""
    return mean_and_se(sample(model, n_chars, seed, streams=50, burn_in=20)[1])


def test_entropy_estimate_of_sources_with_a_known_answer():
    """Uniform over V symbols: log V within the interval; deterministic: 0; p = (1/2, 1/4, 1/4):
    its entropy within 3 se."""
    uniform, _ = fitted("abcd\n" * 1000, 1)  # every symbol equally often: P = 1/5 exactly
    mean, se = entropy(uniform)
    assert abs(mean - math.log(5)) <= 3 * se + 1e-9
    cycle, _ = fitted("ab\n" * 1000, 2)  # a -> b -> newline -> a, every count large: no discount
    assert entropy(cycle) == (0.0, 0.0)
    skewed, _ = fitted("aab\n" * 1000, 1)
    mean, se = entropy(skewed)
    truth = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert 0 < se < 0.01 and abs(mean - truth) <= 3 * se


def reference_kn(text, order, context):
    """P(. | context) by interpolated Kneser-Ney written out with dictionaries, over the positions
    t >= order - 1 (as corpora.NGram counts them)."""
    positions = range(order - 1, len(text))
    levels = []
    for k in range(order):
        if k == order - 1:
            counts = Counter((text[t - k:t], text[t]) for t in positions)
        else:  # distinct characters before (context, next)
            left = defaultdict(set)
            for t in positions:
                left[(text[t - k:t], text[t])].add(text[t - k - 1])
            counts = Counter({key: len(s) for key, s in left.items()})
        levels.append(counts)
    chars = sorted(set(text))
    p = {v: 1 / len(chars) for v in chars}
    for k, counts in enumerate(levels):
        n = Counter(counts.values())
        d = n[1] / (n[1] + 2 * n[2]) if n[1] else 0.0
        ctx = context[len(context) - k:] if k else ""
        row = {v: counts.get((ctx, v), 0) for v in chars}
        total, types = sum(row.values()), sum(c > 0 for c in row.values())
        if total:
            p = {v: max(row[v] - d, 0) / total + d * types / total * p[v] for v in chars}
    return np.array([p[v] for v in chars])


def test_sampled_next_characters_follow_the_model():
    """For the most frequent context: the model's row equals Kneser-Ney written out, and the sampled
    next-character counts pass a chi-square test against it."""
    text, order = made_up_play(), 3
    model, chars = fitted(text, order)
    ids = sample(model, 200_000, seed=3, streams=50, burn_in=50)[0].reshape(50, -1)
    contexts = Counter(text[t - order + 1:t] for t in range(order - 1, len(text)))
    context = contexts.most_common(1)[0][0]
    code = sum(chars.index(c) * len(chars) ** j for j, c in enumerate(reversed(context)))
    expected = model.probs[model.rows(np.array([code]))[0]]
    assert np.allclose(expected, reference_kn(text, order, context), rtol=0, atol=1e-12)
    observed = np.zeros(len(chars))
    for row in ids:  # within streams only: a seam joins two streams
        codes = corpora.context_codes(row, order - 1, order, len(chars))
        np.add.at(observed, row[order - 1:][codes == code], 1)
    assert observed.sum() > 1000
    big = expected * observed.sum() >= 5  # pool the cells expected below 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum()) * observed.sum()
    keep = exp > 0
    chi2, df = (((obs - exp) ** 2)[keep] / exp[keep]).sum(), keep.sum() - 1
    critical = df * (1 - 2 / (9 * df) + 3.29 * math.sqrt(2 / (9 * df))) ** 3  # p = 0.0005
    assert chi2 < critical, (chi2, df)


def test_synthetic_writes_checks_and_reuses_its_file(tmp_path, monkeypatch, capsys):
    """corpus=synthetic writes the text and its JSON, the same bytes every time; a second call only
    checks them."""
    play = made_up_play()
    monkeypatch.setattr(corpora, "tiny_shakespeare", lambda: (play, sorted(set(play))))
    path = tmp_path / "syn.txt"
    cfg = corpora.CorporaConfig(order=3, n_chars=100_000, synthetic_path=str(path))
    meta = corpora.synthetic(cfg)
    raw, mtime = path.read_bytes(), path.stat().st_mtime_ns
    assert len(raw) == meta["size"] == 100_000 and corpora.sha256(raw) == meta["sha256"]
    assert 0 < meta["entropy_rate"] < math.log(len(set(play)))
    assert math.isfinite(meta["val_entropy"])
    assert corpora.synthetic(cfg) == meta and path.stat().st_mtime_ns == mtime
    path.unlink()
    (tmp_path / "syn.json").unlink()
    corpora.synthetic(cfg)
    assert path.read_bytes() == raw


def test_a_wrong_or_corrupt_file_is_refused_in_one_line(tmp_path, capsys):
    """A file at a corpus path whose size or sha256 is not the pinned one is refused: one line,
    exit status 2, before any work is done."""
    wrong = tmp_path / "synthetic.txt"
    wrong.write_text("not the corpus\n")
    with pytest.raises(UserError, match="delete it"):
        corpora.check(wrong, 15, "0" * 64, "cmd")
    for corpus, key in (("synthetic", "synthetic_path"), ("natural", "natural_path")):
        with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
            cfg = compose("corpora", overrides=[f"corpus={corpus}", f"{key}={wrong}"])
        with pytest.raises(SystemExit) as exit_:
            corpora.run(corpora.main_corpora, cfg)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
        assert str(wrong) in err and "sha256" in err


def test_gutenberg_header_and_footer_are_stripped():
    """strip_gutenberg keeps what lies between the start and end markers (both forms), and all of a
    text without them."""
    new = ("The Project Gutenberg EBook of X\nlicence...\n"
           "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nACT I.\nWORK.\nText.\n"
           "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nlicence\n")
    old = ("**The Project Gutenberg Etext**\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04"
           "*END*\nWORK.\nText.\nEnd of Project Gutenberg Etext of X\n")
    assert corpora.strip_gutenberg(new) == "\nACT I.\nWORK.\nText.\n"
    assert corpora.strip_gutenberg(old) == "\nWORK.\nText.\n"
    assert corpora.strip_gutenberg("WORK.\nText.\n") == "WORK.\nText.\n"


def test_a_play_is_laid_out_as_tiny_shakespeare():
    """Title block, persons, headings and stage directions go; speakers get a colon (1 Clown. ->
    First Clown:); quotes become apostrophes, parentheses are dropped and counted."""
    raw = ("THE PLAY\n\nby William Shakespeare\n\n\n\nPersons Represented\n\nA KING.\n\n"
           "SCENE: Rome.\n\n\nACT I.\n\nSCENE I. A street.\n\n[Enter KING and two Clowns.]\n\n"
           "KING.\nWhat \"news\",  (friends)?\n\n1 Clown.\nNone, my lord. [Aside.] Alas!\n\n"
           "  Lady Capulet.\nHence.\n\n\n\n[Exeunt.]\n")
    text, outside = corpora.work_text(raw.encode(), TINY_CHARS)
    assert text == ("KING:\nWhat 'news', friends?\n\nFirst Clown:\nNone, my lord. Alas!\n\n"
                    "Lady Capulet:\nHence.\n")
    assert outside == Counter({'"': 2, "(": 1, ")": 1})


def test_one_edition_of_each_work_the_modern_one():
    """pick_editions keeps one text per Gutenberg etext number, the modern edition over the folio's,
    a folio-only work's folio, and The Winter's Tale once."""
    metadata = "\n".join(f"[{name}]\nurl = http://www.gutenberg.org/{url}\nnotes = {notes}\n"
                         for name, url, notes in [
                             ("hamlet_gut", "dirs/etext98/2ws2610.txt", ""),
                             ("hamlet_gut_f", "dirs/etext00/0ws2610.txt", "folio"),
                             ("only_folio_gut_f", "dirs/etext00/0ws9910.txt", "folio"),
                             ("winters_tale_gut", "files/1539/1539.txt", ""),
                             ("winters_tale_gut_f", "dirs/etext00/0ws4010.txt", "folio"),
                             ("sonnets_gut", "dirs/etext97/wssnt10.txt", "")])
    assert corpora.pick_editions(metadata) == ["hamlet_gut", "only_folio_gut_f", "sonnets_gut",
                                               "winters_tale_gut"]


def test_works_the_val_text_draws_on_are_held_out():
    """held_out names the works that share long n-grams with the val text, whatever their case,
    punctuation or line breaks; shared counts the val n-grams found."""
    val = "KING:\nNow is the winter of our discontent\nMade glorious summer by this sun of York;\n"
    works = {"richard": "king.\nNOW IS THE WINTER OF OUR DISCONTENT MADE GLORIOUS SUMMER, BY THIS",
             "other": "Now is the time, and the winter comes; our discontent is made of summer."}
    assert corpora.held_out(works, val) == {"richard": pytest.approx(0.6, abs=0.2)}
    assert corpora.shared("abcdef", "xxabcdxx", 4) == 1 / 3


def test_window_optimum_is_the_model_where_the_window_holds_its_context():
    """The optimum under eval.py's windows: at window positions with the model's whole context it is
    the model's own loss; before that, for an i.i.d. uniform text, the counted conditional is the
    uniform one (log V)."""
    rng = random.Random(0)
    chars = list("abcdefgh")
    text = "".join(rng.choice(chars) for _ in range(200_000))
    ids = corpora.encode(text.encode(), chars)
    model = NGram(chars, ids[:150_000], 3)
    val = ids[150_000:]
    per_window = corpora.window_optimum(model, ids[:150_000], val, block=16)
    full = corpora.score(model, val[: len(per_window) * 16 + 1])
    assert per_window.shape == ((len(val) - 1) // 16,)
    # a window's mean: position 0 from counts (about log 8), positions 1..15 the model's losses
    first = full[np.arange(len(per_window))[:, None] * 16 + np.arange(1, 16) + 1 - 2]
    counted = per_window * 16 - first.sum(1)
    assert counted.mean() == pytest.approx(math.log(8), abs=0.02)
    assert per_window.mean() == pytest.approx(math.log(8), abs=0.02)
