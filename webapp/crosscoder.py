"""The crosscoder's data for the pages (cached) and its URL state (issue 16).

Queries are explorer/crosscoder_store.py's, cached with st.cache_data keyed on the run (its
identity and manifest version). URL parameters of the crosscoder page: `latent` (a latent id) and
the relative-norm bands `base_only_max`, `shared_min`, `shared_max`, `finetune_only_min`
(defaults: the run config's [crosscoder] values). The feature page calls `feature_links` for its
links to the crosscoder page.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from explorer import crosscoder_store as cs
from explorer.render import inert
from webapp import state
from webapp.state import HASH_FUNCS, QueryParamError, Run

PAGE = "pages/7_crosscoder.py"
LATENT_PARAM = "latent"
BAND_PARAMS = ("base_only_max", "shared_min", "shared_max", "finetune_only_min")

_cache = lambda **kw: st.cache_data(show_spinner=False, hash_funcs=HASH_FUNCS, **kw)  # noqa: E731


def has_crosscoder(run: Run) -> bool:
    return cs.has_crosscoder(run.dir, run.manifest)


def summary(run: Run) -> dict[str, Any]:
    return (run.manifest.get("summary") or {}).get("crosscoder") or {}


@_cache(max_entries=16)
def latents(run: Run) -> pd.DataFrame:
    return cs.latents(run.dir)


@_cache(max_entries=1024)
def latent(run: Run, latent_id: int) -> dict[str, Any] | None:
    return cs.latent(run.dir, latent_id)


@_cache(max_entries=16)
def metrics(run: Run) -> pd.DataFrame:
    return cs.metrics(run.dir)


@_cache(max_entries=256)
def latent_examples(run: Run, ids: tuple[int, ...], kind: str | None = None, rank: int | None = None) -> pd.DataFrame:
    return cs.latent_examples(run.dir, ids, kind, rank)


@st.cache_resource(show_spinner=False, max_entries=8)
def _links_index(path: str, token: tuple[int, int]) -> cs.LinksIndex:
    return cs.LinksIndex(path)


def feature_links_table(run: Run, sae: str, feature_id: int) -> pd.DataFrame:
    """The crosscoder latents nearest to one SAE feature, from the run's links held in memory."""
    return _links_index(run.path, run.token).links(sae, feature_id)


def default_bands(run: Run) -> cs.Bands:
    return cs.Bands.from_config(run.config.get("crosscoder"))


def parse_band(raw: Any, name: str) -> float | None:
    """A band edge from the URL: a number in [0, 1], None when absent; QueryParamError otherwise."""
    if raw is None or str(raw).strip() == "":
        return None
    try:
        v = float(str(raw).strip())
    except ValueError:
        raise QueryParamError(f"{name} {state._clip(raw)} is not a number: use a relative norm between 0 and 1.") from None
    if not 0.0 <= v <= 1.0:
        raise QueryParamError(f"{name} {state._clip(raw)} is outside [0, 1], the range of the relative norm.")
    return v


def bands_param(run: Run) -> cs.Bands:
    """The bands in the URL (each edge defaulting to the run config's); bad values are shown and replaced."""
    d = default_bands(run)
    vals = {}
    for name in BAND_PARAMS:
        try:
            v = parse_band(st.query_params.get(name), name)
        except QueryParamError as exc:
            state.show_error(exc)
            v = None
        vals[name] = getattr(d, name) if v is None else v
    return cs.Bands(**vals)


def latent_param(run: Run) -> int | None:
    n = int(summary(run).get("d_sae") or len(latents(run)))
    raw = st.query_params.get(LATENT_PARAM)
    try:
        return state.parse_feature_id(raw, n)
    except QueryParamError:
        state.show_error(QueryParamError(f"Latent {state._clip(raw)} is not a latent of this crosscoder: use a whole number from 0 to {n - 1}."))
        return None


def page_params(run: Run, latent: int | None = None, bands: cs.Bands | None = None) -> dict[str, str]:
    out = {"run": run.run_id}
    if bands is not None:
        out.update({k: f"{getattr(bands, k):g}" for k in BAND_PARAMS})
    if latent is not None:
        out[LATENT_PARAM] = str(int(latent))
    return out


def latent_link(run: Run, latent: int, label: str, bands: cs.Bands | None = None, **kw: Any) -> None:
    st.page_link(PAGE, label=inert(label), query_params=page_params(run, latent, bands), icon=":material/open_in_new:", **kw)


def feature_links(run: Run, sae: str, feature_id: int) -> None:
    """The feature page's section: the crosscoder latents nearest to this feature, linked (nothing without a crosscoder)."""
    if not has_crosscoder(run):
        return
    from webapp import ui

    side = "base" if sae == "base_sae" else "finetuned"
    st.markdown("### Nearest crosscoder latents")
    st.caption(f"By cosine of this feature's decoder with the latent's {inert(side)} decoder row. Relative norm ||d_F|| / (||d_B|| + ||d_F||): ~0 base-only, ~1 finetune-only.")
    df = feature_links_table(run, sae, feature_id)
    if df.empty:
        st.caption("No crosscoder latent is linked to this feature.")
        return
    for r in df.itertuples(index=False):
        latent_link(run, int(r.latent_id), f"latent {int(r.latent_id)} · cos {float(r.dec_cos):.3f} · relative norm {ui.fmt(r.relative_norm, '.2f')} · density {ui.density(r.density)}")
