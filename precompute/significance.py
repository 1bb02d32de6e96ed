"""Is a change in a feature's firing real? Paired exact tests, multiple-testing control, and the
log density ratio with its interval (METHODS.md sections 8 and 10). Pure numpy/scipy.

The same tokens go through both models, so each feature gives a paired binary outcome per token:
fires on the base model, fires on the finetuned model. With b = tokens where it fires on base
only and c = tokens where it fires on the finetune only, "the finetune did not change when it
fires" makes b and c exchangeable: the exact McNemar test is the two-sided binomial test of
c out of b + c at 1/2 (`scipy.stats.binomtest(c, b + c, 0.5)`), here vectorised. Benjamini-
Hochberg q-values are taken across the features of one SAE that fire on at least one model.

Classes (`change_class`, with alpha = 0.01 on q):
    died               fires on base, never on the finetune, q < alpha
    rarer              fires on both, q < alpha, b > c
    woke               never on base, fires on the finetune, q < alpha
    commoner           fires on both, q < alpha, c > b
    too_rare_to_tell   fires on one model only, q >= alpha (e.g. 3 firings on base, p = 0.25)
    no_significant_change  fires on both, q >= alpha
    both_dead          fires on neither
"""

from __future__ import annotations

import numpy as np

ALPHA = 0.01
Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def mcnemar_p(b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Exact two-sided McNemar p-values: 2 * P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2),
    capped at 1 (the two-sided binomial test at 1/2, symmetric); 1 where b + c = 0."""
    from scipy.stats import binom

    b = np.asarray(b, np.int64)
    c = np.asarray(c, np.int64)
    n = b + c
    p = np.minimum(1.0, 2.0 * binom.cdf(np.minimum(b, c), n, 0.5))
    return np.where(n > 0, p, 1.0)


def bh_q(p: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Benjamini-Hochberg q-values over the entries where `mask` (all when None); NaN elsewhere.

    q_(i) = min over j >= i of p_(j) * m / j (p sorted ascending, m tested), capped at 1."""
    p = np.asarray(p, np.float64)
    mask = np.ones(p.shape, bool) if mask is None else np.asarray(mask, bool)
    q = np.full(p.shape, np.nan)
    idx = np.flatnonzero(mask)
    m = len(idx)
    if m == 0:
        return q
    order = np.argsort(p[idx], kind="stable")
    ranked = p[idx][order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    q[idx[order]] = np.minimum(ranked, 1.0)
    return q


def change_class(count_base: np.ndarray, count_finetuned: np.ndarray, b: np.ndarray, c: np.ndarray, q: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """The class of each feature (module docstring)."""
    cb, cf = np.asarray(count_base), np.asarray(count_finetuned)
    sig = np.nan_to_num(np.asarray(q, np.float64), nan=1.0) < alpha
    return np.select(
        [
            (cb == 0) & (cf == 0),
            (cb > 0) & (cf == 0) & sig,
            (cb == 0) & (cf > 0) & sig,
            (cb > 0) & (cf > 0) & sig & (np.asarray(b) > np.asarray(c)),
            (cb > 0) & (cf > 0) & sig & (np.asarray(c) > np.asarray(b)),
            (cb > 0) & (cf > 0),
        ],
        ["both_dead", "died", "woke", "rarer", "commoner", "no_significant_change"],
        "too_rare_to_tell",
    ).astype(object)


def bh_cutoff(p: np.ndarray, mask: np.ndarray, alpha: float = ALPHA) -> float:
    """The largest p-value Benjamini-Hochberg accepts at `alpha` among the masked entries; alpha / m
    (what a single discovery needs) when it accepts none."""
    vals = np.sort(np.asarray(p, np.float64)[np.asarray(mask, bool)])
    m = len(vals)
    if m == 0:
        return alpha
    ok = vals <= alpha * np.arange(1, m + 1) / m
    return float(vals[np.flatnonzero(ok)[-1]]) if ok.any() else alpha / m


def detection_floor(p: np.ndarray, mask: np.ndarray, alpha: float = ALPHA) -> int:
    """The smallest firing count on one model that can be called "died" (or "woke"): with c = 0
    the McNemar p-value of n firings is 2 * 0.5**n, and it must reach the run's BH cutoff."""
    cut = bh_cutoff(p, mask, alpha)
    n = max(1, int(np.ceil(np.log2(2.0 / cut))))
    while 2.0 * 0.5**n > cut:  # float safety at the boundary
        n += 1
    while n > 1 and 2.0 * 0.5 ** (n - 1) <= cut:
        n -= 1
    return n


def log_density_ratio(count_base: np.ndarray, count_finetuned: np.ndarray, n_base: int, n_finetuned: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log10 of the density ratio finetuned / base with 0.5 added to each count, and its 95%
    interval from the Poisson approximation (var of the natural log = 1/(c_F + 0.5) + 1/(c_B + 0.5),
    the counts taken as independent: conservative for the paired counts of one token sample).
    Returns (estimate, low, high); NaN without tokens."""
    cb = np.asarray(count_base, np.float64) + 0.5
    cf = np.asarray(count_finetuned, np.float64) + 0.5
    if not n_base or not n_finetuned:
        nan = np.full(cb.shape, np.nan)
        return nan, nan, nan
    est = np.log10((cf / n_finetuned) / (cb / n_base))
    half = Z_95 * np.sqrt(1.0 / cf + 1.0 / cb) / np.log(10.0)
    return est, est - half, est + half
