"""
The statistics the studies report, on plain tensors (tests/test_eval.py checks each on cases with
known answers): bootstrap means and standard errors (over windows or tasks, never characters:
neighbours are correlated), the loss summary of eval.py, the best temperature, rank correlations and
AUROC.
"""

import math

import torch
from torch.nn import functional as F

LN2 = math.log(2)
BOOTSTRAP = 1000  # resamples of windows behind every standard error


def bootstrap_means(values, resamples=1000, seed=0):
    """The means (resamples,) of `resamples` draws of len(values) values with replacement, in
    float64; seeded, so the same data always gives the same figures (eval.py's standard errors,
    dyck.py's intervals)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.as_tensor(values, dtype=torch.float64)
    return v[torch.randint(0, v.numel(), (resamples, v.numel()), generator=g)].mean(1)


def ce(z, y):
    """Per-token cross-entropy (N,) of logits z (N, V) for targets y (N,)."""
    return F.cross_entropy(z.double(), y, reduction="none")


def bootstrap_se(window_means, resamples=BOOTSTRAP, seed=0):
    """Standard error of the mean of window_means (n,): the std of the means of `resamples` draws of
    n windows with replacement. Seeded, so the same data always gives the same figure."""
    return bootstrap_means(window_means, resamples, seed).std().item()


def summary(losses, base=None):
    """Mean loss, bits per char and its standard error of per-character losses (n_windows, T) (1-D:
    windows of one character); with base (the same characters), the paired difference and its
    standard error. Windows, not characters, are resampled: all windows have T characters, so a
    resample's mean loss is the mean of its window means."""
    losses = losses.double().view(losses.size(0), -1)
    out = {"loss": losses.mean().item(), "bits_per_char": losses.mean().item() / LN2,
           "se": bootstrap_se(losses.mean(1))}
    if base is not None:
        diff = losses - base.double().view_as(losses)  # paired: the same windows for both members
        out["delta"] = diff.mean().item()
        out["delta_se"] = bootstrap_se(diff.mean(1))
    return out


def best_temperature(z, y, lo=1e-4, hi=1e4, iters=100):
    """The temperature T minimising mean CE(z / T): golden-section search on log T. CE is convex in
    1/T (a log-sum-exp of a linear function of 1/T), so it has one minimum and the search finds it.
    The range is wide because energies need not be on the logits' scale: an EBT's one-hot energies
    differ by ~0.01."""
    def loss(log_t):
        return ce(z.double() / math.exp(log_t), y).mean().item()  # float64: T is found to ~1e-8

    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    return math.exp((a + b) / 2)


def ranks(x):
    """Ranks 1..N of x, ties sharing their mean rank: c equal values whose last rank is r hold the
    ranks r - c + 1 .. r, whose mean is r - (c - 1) / 2."""
    _, inverse, counts = x.double().unique(return_inverse=True, return_counts=True)
    counts = counts.double()
    return (counts.cumsum(0) - (counts - 1) / 2)[inverse]


def pearson(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return ((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300)).item()


def spearman(a, b):
    return pearson(ranks(a), ranks(b))


def auroc(score, positive):
    """P(score of a random positive > score of a random negative), ties counting 1/2 (Mann-Whitney
    U)."""
    positive = positive.bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = ranks(score)
    return ((r[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def as_uncertainty(score, losses, wrong):
    return {"pearson": pearson(score, losses), "spearman": spearman(score, losses),
            "auroc": auroc(score, wrong)}
