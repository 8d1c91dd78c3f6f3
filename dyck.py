"""
Balanced brackets (Dyck words over `()` and `[]`), generated locally and deterministically from a
seed: data where a correct answer is easier to check than to produce, and where nesting depth can be
pushed past anything seen in training.

Each line is one task: a prefix of a Dyck word, `=`, then the closing sequence its open brackets
need:

    ([]([=]))          prefix ([]([   opens ( ( [   completion ]))

The completion is determined by the prefix (a stack check), so a model either closes correctly or
not. `uv run train.py data.data_path=dyck.txt` trains on it like on tiny Shakespeare: data.py writes
dyck.txt from `training_text()` when the file is missing (write_training_text, in data.WRITERS).
The evaluation sets (`eval_sets()`) are prefixes in bins: in distribution, depth just past the
training depth, depth far past it, and long opener-closer distance. `score()` completes them
greedily (thinking K steps with M starts, or reading the energy's exact argmin) and reports exact
match and per-character accuracy with bootstrap intervals over tasks, and the compute spent.
"""

import random

import torch

import data
from ebm import make_energy, observe, self_verify, system2_logits
from energies import onehot_energies
from stats import bootstrap_means

PAIRS = {"(": ")", "[": "]"}  # opener -> closer
SEP = "="  # between the prefix and its completion
TRAIN_SEED = 1234  # dyck.txt is training_text(TRAIN_SEED)
TRAIN_CHARS = 1_000_000  # about the size of tiny Shakespeare
MAX_DEPTH = 8  # D_train: the deepest nesting in the training text
MAX_SPAN = 24  # training: an opener and its closer are at most this many characters apart
MAX_LEN = 48  # training: brackets per line (prefix + completion; the line adds its `=`)
# evaluation bins: (depth range, span range, line length limit); every line fits a block of 64
BINS = {
    "in_distribution": ((1, MAX_DEPTH), (1, MAX_SPAN), MAX_LEN),
    "depth_just_past": ((MAX_DEPTH + 1, MAX_DEPTH + 2), (1, 63), 63),
    "depth_far_past": ((MAX_DEPTH + 5, MAX_DEPTH + 8), (1, 63), 63),
    "long_distance": ((1, MAX_DEPTH), (MAX_SPAN + 12, 62), 63),
}


def task(rng, max_depth, max_span, max_len, p_open=0.5):
    """
    One (prefix, completion): a random walk over brackets that opens with probability p_open while
    the depth, the line length and the distance of the oldest open bracket to its closer allow it,
    else closes the innermost, and stops at a random length with at least one bracket open. The
    completion closes every open bracket, innermost first. Lengths count the word prefix +
    completion (the `=` is not part of it).
    """
    word_len = rng.randrange(2, max_len)  # target length of prefix + completion
    prefix, stack = [], []  # stack: (closer, position of its opener)
    while True:
        n, d = len(prefix), len(stack)
        if d and n + d >= word_len:  # long enough: stop here and let the completion close
            break
        # opening now puts the oldest opener's closer at n + d + 1 at the earliest
        span_ok = not d or n + d + 1 - stack[0][1] <= max_span
        can_open = d < max_depth and n + d + 2 <= max_len and span_ok
        if d == 0 or (can_open and rng.random() < p_open):
            opener = rng.choice(list(PAIRS))
            stack.append((PAIRS[opener], n))
            prefix.append(opener)
        else:
            prefix.append(stack.pop()[0])
    return "".join(prefix), "".join(closer for closer, _ in reversed(stack))


def measure(word):
    """(balanced, deepest nesting, longest opener-closer distance) of a bracket string."""
    stack, depth, span = [], 0, 0
    for i, c in enumerate(word):
        if c in PAIRS:
            stack.append((PAIRS[c], i))
            depth = max(depth, len(stack))
        elif not stack or stack[-1][0] != c:
            return False, depth, span
        else:
            span = max(span, i - stack.pop()[1])
    return not stack, depth, span


def training_text(seed=TRAIN_SEED, n_chars=TRAIN_CHARS):
    """Lines `prefix=completion` of depth <= MAX_DEPTH, span <= MAX_SPAN, length <= MAX_LEN,
    ~n_chars in all."""
    rng, lines, total = random.Random(seed), [], 0
    while total < n_chars:
        prefix, completion = task(rng, MAX_DEPTH, MAX_SPAN, MAX_LEN)
        lines.append(prefix + SEP + completion)
        total += len(lines[-1]) + 1
    return "\n".join(lines) + "\n"


def write_training_text(path):
    """dyck.txt: training_text(), written where data.data_path points when the file is missing."""
    print(f"writing balanced-bracket tasks to {path} (dyck.training_text)")
    data.write_atomically(path, training_text().encode())


data.WRITERS["dyck.txt"] = write_training_text


def eval_sets(seed, n_per_bin, exclude=(), tries=10_000):
    """
    {bin: [(prefix, completion), ...]}: n_per_bin distinct tasks for each bin of BINS, none whose
    prefix is in `exclude` (e.g. the training text's prefixes, so that in_distribution is held out).
    Each bin has its own generator, seeded by seed and the bin; a task lands in a bin when its
    deepest nesting and its longest opener-closer distance reach the bin's lower ends (the walk is
    bounded by the upper ends). Deep bins walk with a higher chance of opening, so that such depths
    are found at all.
    """
    exclude, out = set(exclude), {}
    for k, (name, ((d_lo, d_hi), (s_lo, s_hi), max_len)) in enumerate(BINS.items()):
        rng, found = random.Random(seed * 1000 + k), {}
        p_open = 0.5 if d_hi <= MAX_DEPTH else 0.8
        for _ in range(tries * n_per_bin):
            prefix, completion = task(rng, d_hi, s_hi, max_len, p_open)
            _, depth, span = measure(prefix + completion)
            if d_lo <= depth and s_lo <= span and prefix not in exclude:
                found.setdefault(prefix, completion)
                if len(found) == n_per_bin:
                    break
        if len(found) < n_per_bin:
            raise RuntimeError(f"bin {name}: found {len(found)} of {n_per_bin} tasks in "
                               f"{tries * n_per_bin} tries")
        out[name] = list(found.items())
    return out


# --------------------------------------------------------------------------------------------------
# scoring: complete each prefix greedily and check it against the stack's answer


@torch.no_grad()
def complete(model, vocab, prefixes, n, think_steps=0, starts=1, exact=False):
    """
    Greedy continuations (list of str, n characters each) of `"\n" + prefix + "="` for prefixes of
    one length (batched). Each character is the argmax after think_steps steps with `starts` starts
    (self-verification), or with exact=True the argmin of the energy over every vocabulary character
    (the exact verifier). Every step reruns the whole sequence (lines fit one block), so the cost
    per character is one pass plus the thinking.
    """
    idx = torch.tensor([vocab.encode("\n" + p + SEP) for p in prefixes], dtype=torch.long)
    idx = idx.to(next(model.parameters()).device)
    for _ in range(n):
        h, e, caches = observe(model, idx[:, -model.config.block_size:])
        if exact:
            nxt = onehot_energies(model, h, e, caches)[:, -1].argmin(-1)  # (B,)
        else:
            energy = make_energy(model, h, e, caches)
            z = self_verify(model, e, energy, think_steps, starts)[0][-1][:, -1]  # (B, V)
            nxt = z.argmax(-1)  # (B,)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
    return [vocab.decode(row[-n:]) for row in idx.tolist()]


@torch.no_grad()
def beam_complete(model, vocab, prefix, n, width, think_steps=0):
    """
    Beam search: the n-character continuation of `"\n" + prefix + "="` with the highest
    log-likelihood that `width` beams find (width 1 = greedy), under the logits after think_steps
    steps. The usual way for a plain transformer to spend more test-time compute: each character
    costs `width` passes.
    """
    idx = torch.tensor([vocab.encode("\n" + prefix + SEP)], device=next(model.parameters()).device)
    logp = torch.zeros(1, dtype=torch.float64, device=idx.device)  # (beams,) log-likelihood so far
    for _ in range(n):
        h, e, caches = observe(model, idx[:, -model.config.block_size:])
        # (beams, V)
        z = system2_logits(model, e, make_energy(model, h, e, caches), think_steps)[-1][:, -1]
        total = (logp[:, None] + torch.log_softmax(z.double(), -1)).flatten()  # (beams * V,)
        top = total.topk(min(width, total.numel()))
        beam, char = top.indices // z.size(-1), top.indices % z.size(-1)
        idx, logp = torch.cat([idx[beam], char[:, None]], dim=1), top.values
    return vocab.decode(idx[0, -n:].tolist())  # topk sorts: beam 0 is the most likely


def bootstrap_interval(values, resamples=1000, seed=0, level=0.95):
    """The mean of values (n,) and its bootstrap percentile interval: tasks are resampled, not
    characters."""
    v = torch.as_tensor(values, dtype=torch.float64)
    means = bootstrap_means(v, resamples, seed)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2],
                                                dtype=torch.float64)).tolist()
    return {"mean": v.mean().item(), "lo": lo, "hi": hi}


def score(model, vocab, tasks, think_steps=0, starts=1, exact=False, beam=1):
    """
    Exact match (the whole completion and the newline after it) and per-character accuracy of greedy
    (or, with beam > 1, beam-searched) completions of tasks [(prefix, completion), ...], each with a
    95% bootstrap interval over tasks, and the compute per task: transformer passes (one per
    character and beam) and think steps (characters * K * M * beams).
    """
    by_len, match, acc, chars = {}, [], [], 0
    for prefix, completion in tasks:
        by_len.setdefault(len(prefix), []).append((prefix, completion + "\n"))
    for group in by_len.values():
        n = max(len(target) for _, target in group)
        if beam > 1:
            outs = [beam_complete(model, vocab, p, len(target), beam, think_steps) for p,
                    target in group]
        else:
            outs = complete(model, vocab, [p for p, _ in group], n, think_steps, starts, exact)
        for (_, target), out in zip(group, outs):
            hits = [a == b for a, b in zip(out, target)]
            match.append(float(all(hits)))
            acc.append(sum(hits) / len(target))
            chars += len(target)
    per_task = chars / len(tasks)
    return {"exact_match": bootstrap_interval(match), "char_accuracy": bootstrap_interval(acc),
            "tasks": len(tasks),
            "passes_per_task": per_task * beam,
            "think_steps_per_task": 0 if exact else per_task * think_steps * starts * beam,
            "onehot_candidates_per_task": per_task * len(vocab) if exact else 0}
