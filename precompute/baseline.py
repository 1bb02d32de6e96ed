"""The null baseline for born and lost features, and the choice of the matching score
(METHODS.md section 7). Pure numpy/scipy over precompute/weights.py's PairScores.

Two SAEs trained on the same model with different seeds do not learn the same dictionary, so
"no match above the threshold" happens without any finetuning. The base SAE's seed twin (the
same model, data and hyperparameters, another seed) is matched with the base SAE exactly as the
finetuned SAE is; at each threshold s:

    lost_rate(s)       share of the base SAE's alive features whose best match in the finetuned SAE is below s
    lost_rate_twin(s)  the same against the twin
    born_rate(s)       share of the finetuned SAE's alive features whose best match in the base SAE is below s
    born_rate_twin(s)  share of the twin's alive features whose best match in the base SAE is below s
                       (the reference for born: the base twin's rate, as no finetuned-SAE twin ships)
    excess = rate - twin rate

Choosing the score: for each candidate score, the base SAE and the twin are assigned one-to-one
on that score (alive features only); the assigned pairs ("same feature") are compared with
random pairs (each alive base feature with a random alive twin feature: `random_pair_keys`) by
the AUC, the probability that an assigned pair outscores a random one (ties count one half).
The run uses the score with the highest AUC (ties: the earlier in weights.SCORE_KINDS).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from precompute.weights import SCORE_KINDS, PairScores, _values_at, assignment, best_matches

THRESHOLDS = np.round(np.linspace(0.0, 1.0, 101), 2)  # the Dead & born page's slider steps
HIST_RANGE = (-1.0, 1.0)
HIST_BINS = 40


def random_pair_keys(d_a: int, d_b: int, seed: int) -> np.ndarray:
    """Sorted keys i * d_b + j of the random pairs: each feature i of A with j = perm[i mod d_b],
    a seeded permutation of B's features (the dead ones are dropped at finalize)."""
    perm = np.random.default_rng(np.random.SeedSequence([seed, 0x7A1])).permutation(d_b)
    i = np.arange(d_a, dtype=np.int64)
    return np.unique(i * d_b + perm[i % d_b])


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(pos > neg) + P(pos = neg) / 2 over all pairs (the Mann-Whitney U statistic / (n_pos n_neg)); NaN if a side is empty."""
    from scipy.stats import rankdata

    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


@dataclass
class Separation:
    """How well one score tells the twin's assigned pairs from random pairs."""

    kind: str
    auc: float
    assigned: np.ndarray  # scores of the assigned pairs
    random: np.ndarray  # scores of the random pairs

    def histograms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(edges, counts of assigned, counts of random) on HIST_BINS bins of HIST_RANGE (clipped into it)."""
        edges = np.linspace(*HIST_RANGE, HIST_BINS + 1)
        h = lambda v: np.histogram(np.clip(v, *HIST_RANGE), bins=edges)[0].astype(np.int64)  # noqa: E731
        return edges, h(self.assigned), h(self.random)


def separations(ps_twin: PairScores, alive_a: np.ndarray, alive_twin: np.ndarray, random_keys: np.ndarray) -> dict[str, Separation]:
    """For each candidate score: the twin's assignment on it, and its AUC against random pairs."""
    ra_, rb_ = random_keys // ps_twin.d_b, random_keys % ps_twin.d_b
    keep = alive_a[ra_] & alive_twin[rb_]
    ra_, rb_ = ra_[keep], rb_[keep]
    out = {}
    for kind in SCORE_KINDS:
        score = ps_twin.score(kind)
        to_b, _ = assignment(ps_twin, kind, alive_a, alive_twin)
        ia = np.flatnonzero(to_b >= 0)
        assigned = _values_at(ps_twin, ia, to_b[ia], score)
        rand = _values_at(ps_twin, ra_, rb_, score)
        rand = rand[np.isfinite(rand)]
        out[kind] = Separation(kind, auc(assigned, rand), assigned, rand)
    return out


def choose(seps: dict[str, Separation]) -> str:
    """The score with the highest AUC (ties: the earlier in SCORE_KINDS)."""
    best, best_auc = None, -np.inf
    for kind in SCORE_KINDS:
        a = seps[kind].auc if kind in seps else np.nan
        if np.isfinite(a) and a > best_auc + 1e-12:
            best, best_auc = kind, a
    return best or SCORE_KINDS[0]


def below(scores: np.ndarray, alive: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> np.ndarray:
    """For each threshold, how many alive features have a best-match score below it (none counts as below)."""
    s = np.nan_to_num(np.asarray(scores, np.float64)[np.asarray(alive, bool)], nan=-np.inf)
    s = np.sort(s)
    return np.searchsorted(s, thresholds, side="left").astype(np.int64)


def curves(pairs: dict[str, tuple[PairScores, np.ndarray, np.ndarray]], kind: str) -> dict[str, np.ndarray]:
    """Born/lost counts at THRESHOLDS on score `kind` for each matched pair of SAEs:
    pairs = {"finetuned_sae" | "base_sae_twin": (PairScores of base_sae x other, alive base_sae, alive other)}."""
    out: dict[str, np.ndarray] = {}
    for other, (ps, alive_a, alive_b) in pairs.items():
        _, best_a, _, best_b = best_matches(ps, kind, alive_a, alive_b)
        suffix = "" if other == "finetuned_sae" else "_twin"
        out[f"n_lost{suffix}"] = below(best_a, alive_a)
        out[f"n_born{suffix}"] = below(best_b, alive_b)
        out[f"n_alive_base_sae{suffix}"] = np.full(len(THRESHOLDS), int(alive_a.sum()))
        out[f"n_alive_other{suffix}"] = np.full(len(THRESHOLDS), int(alive_b.sum()))
    return out
