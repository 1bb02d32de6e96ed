"""The Overview page's plain-words verdict: does the base SAE transfer to the finetuned model?

Pure (no streamlit), so it is unit-tested. The thresholds are stated in the verdict text.
References (METHODS.md): Study K measured CE recovered 0.9886 for Mistral-instruct with the
base SAE (transfers) and 0.253 for Gemma-it (does not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

# thresholds (stated to the user)
GOOD_CE_RECOVERED = 0.90  # CE recovered on the finetuned model at or above this: the reconstruction keeps the model's behaviour
POOR_CE_RECOVERED = 0.70  # below this: it does not
MAX_CE_RECOVERED_DROP = 0.05  # finetuned may lose at most this much CE recovered vs base for a full "yes"
MAX_EV_DROP = 0.10  # and at most this much explained variance
MAX_DIED_SHARE = 0.05  # and at most this share of the features alive on base may die


@dataclass(frozen=True)
class Verdict:
    level: str  # "yes" | "partly" | "no" | "unknown"
    headline: str
    details: list[str]


def _get(metrics: pd.DataFrame, sae: str, model: str, column: str, outliers: str = "included") -> float:
    sub = metrics[(metrics["sae"] == sae) & (metrics["model"] == model) & (metrics["outliers"] == outliers)]
    if sub.empty:
        return float("nan")
    v = sub[column].iloc[0]
    return float(v) if v is not None else float("nan")


def verdict(metrics: pd.DataFrame, cross_counts: dict[str, int], outliers: str = "included") -> Verdict:
    r_ft = _get(metrics, "base_sae", "finetuned", "ce_recovered", outliers)
    r_b = _get(metrics, "base_sae", "base", "ce_recovered", outliers)
    ev_ft = _get(metrics, "base_sae", "finetuned", "explained_variance", outliers)
    ev_b = _get(metrics, "base_sae", "base", "explained_variance", outliers)
    alive_base = cross_counts.get("both_alive", 0) + cross_counts.get("died", 0)
    died_share = cross_counts.get("died", 0) / alive_base if alive_base else float("nan")
    woke = cross_counts.get("woke", 0)

    facts = [
        f"CE recovered by the base SAE: {r_b:.3f} on the base model, {r_ft:.3f} on the finetuned model.",
        f"Explained variance: {ev_b:.3f} on base, {ev_ft:.3f} on finetuned.",
        f"{cross_counts.get('died', 0)} features alive on base are dead on the finetuned model ({died_share:.1%} of those alive on base); {woke} dead on base fire on the finetuned model.",
        (
            f"Thresholds used: “yes” needs CE recovered ≥ {GOOD_CE_RECOVERED} on the finetuned model, within {MAX_CE_RECOVERED_DROP} of base, "
            f"explained variance within {MAX_EV_DROP} of base, and at most {MAX_DIED_SHARE:.0%} of features dying; "
            f"CE recovered below {POOR_CE_RECOVERED} means “no”. For scale: Study K found 0.989 (Mistral → instruct, transfers) "
            "and 0.253 (Gemma → it, does not)."
        ),
    ]
    if not math.isfinite(r_ft):
        return Verdict("unknown", "Not enough data for a verdict: CE recovered on the finetuned model is undefined (zero-ablation barely changes the loss).", facts)
    if r_ft < POOR_CE_RECOVERED:
        return Verdict("no", f"No: the base SAE does not transfer. Splicing its reconstruction into the finetuned model recovers only {r_ft:.0%} of the loss gap.", facts)
    reasons = []
    if r_ft < GOOD_CE_RECOVERED:
        reasons.append(f"CE recovered on the finetuned model is {r_ft:.3f}, below {GOOD_CE_RECOVERED}")
    if math.isfinite(r_b) and r_ft < r_b - MAX_CE_RECOVERED_DROP:
        reasons.append(f"it drops by {r_b - r_ft:.3f} from base (more than {MAX_CE_RECOVERED_DROP})")
    if math.isfinite(ev_ft) and math.isfinite(ev_b) and ev_ft < ev_b - MAX_EV_DROP:
        reasons.append(f"explained variance drops by {ev_b - ev_ft:.3f} (more than {MAX_EV_DROP})")
    if math.isfinite(died_share) and died_share > MAX_DIED_SHARE:
        reasons.append(f"{died_share:.1%} of the features alive on base die (more than {MAX_DIED_SHARE:.0%})")
    if not reasons:
        return Verdict("yes", f"Yes: the base SAE transfers. On the finetuned model it recovers {r_ft:.1%} of the loss gap (on base: {r_b:.1%}).", facts)
    return Verdict("partly", f"Partly: the base SAE still reconstructs the finetuned model ({r_ft:.1%} of the loss gap recovered), but " + "; ".join(reasons) + ".", facts)
