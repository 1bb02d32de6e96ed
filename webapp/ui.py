"""Small rendering helpers shared by the pages (links, example lists, number formats, pagers).

Every label these put into Streamlit Markdown goes through explorer.render.inert."""

from __future__ import annotations

import html
import math
from types import SimpleNamespace
from typing import Any, Sequence
from urllib.parse import urlencode

import pandas as pd
import streamlit as st

from explorer import render
from explorer.figures import SAE_LABELS
from explorer.render import inert
from webapp import data, urlstate
from webapp.state import HASH_FUNCS, Run

FEATURE_PAGE = "pages/3_feature.py"
PROBE_PAGE = "pages/6_live_probe.py"
OTHER_SAE = {"base_sae": "finetuned_sae", "finetuned_sae": "base_sae"}


def feature_params(run: Run, sae: str, feature_id: int) -> dict[str, str]:
    return {"run": run.run_id, "sae": sae, "feature": str(int(feature_id))}


def feature_url(run: Run, sae: str, feature_id: int) -> str:
    return "/feature?" + urlencode(feature_params(run, sae, feature_id))


def feature_url_prefix(run: Run, sae: str) -> str:
    """feature_url up to the feature id ("/feature?run=..&sae=..&feature="), for many links."""
    return "/feature?" + urlencode({"run": run.run_id, "sae": sae}) + "&feature="


def sae_label(sae: str) -> str:
    """An SAE's name for Markdown ("base SAE"; an unknown name as inert text)."""
    return inert(SAE_LABELS.get(sae, sae))


def feature_link(run: Run, sae: str, feature_id: int, label: str | None = None, **kw: Any) -> None:
    text = label or f"{SAE_LABELS.get(sae, sae)} feature {int(feature_id)}"
    st.page_link(FEATURE_PAGE, label=inert(text), query_params=feature_params(run, sae, feature_id), icon=":material/open_in_new:", **kw)


def probe_link(run: Run, sae: str, feature_id: int, label: str | None = None, **kw: Any) -> None:
    """The Live probe with this feature preselected (its activations on a prompt, and steering)."""
    text = label or f"Probe and steer {SAE_LABELS.get(sae, sae)} feature {int(feature_id)} live"
    st.page_link(PROBE_PAGE, label=inert(text), query_params=feature_params(run, sae, feature_id), icon=":material/science:", **kw)


def open_feature(run: Run, sae: str, feature_id: int) -> None:
    """Go to a feature's page from a table row or a chart point. The current page's selection
    rides along in the query: Streamlit's switch_page first writes the new query under the OLD
    page's path (one history entry), then changes the page (another), so Back lands on
    "this page + the new query"; with this page's own parameters still in it, that restores
    this page as it was (the feature page ignores parameters it does not use)."""
    here = {k: st.query_params.get_all(k)[0] for k in st.query_params}
    st.switch_page(FEATURE_PAGE, query_params={**here, **feature_params(run, sae, feature_id)})


def legend() -> None:
    items = "".join(
        f'<span style="display:inline-block;width:0.9em;height:0.9em;background:{c};border-radius:2px;margin:0 4px 0 12px;vertical-align:-1px"></span>{html.escape(render.MODEL_LABELS[m])}'
        for m, c in render.MODEL_COLORS.items()
    )
    st.html(f'<div style="font-size:0.85rem;color:#444">Colours:{items}</div>')


def num(v: Any, default: float | None = None) -> float | None:
    """A number from a run file (a hand-edited manifest may hold anything): finite float, else `default`."""
    if isinstance(v, bool):
        return default
    try:
        f = float(v)
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default


def alert(level: str, bold: str, text: str) -> None:
    """A coloured box by level ("yes" success, "partly" warning, "no" error, else info): `bold`
    in bold, then `text`, both shown as text."""
    if level == "yes":
        st.success("**" + inert(bold) + "** " + inert(text))
    elif level == "partly":
        st.warning("**" + inert(bold) + "** " + inert(text))
    elif level == "no":
        st.error("**" + inert(bold) + "** " + inert(text))
    else:
        st.info("**" + inert(bold) + "** " + inert(text))


def fmt(v: Any, spec: str = ".3g", nan: str = "n/a") -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return nan
    if not math.isfinite(f):
        return nan
    return format(int(f), spec) if spec.endswith("d") else format(f, spec)


def pct(v: Any, digits: int = 2) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return f"{100 * f:.{digits}f}%" if math.isfinite(f) else "n/a"


def density(v: Any) -> str:
    """A density as a percentage with 3 significant digits (0 -> '0 (never fires)')."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(f):
        return "n/a"
    return "0 (never)" if f == 0 else f"{100 * f:.3g}%"


def example_blocks(run: Run, rows: pd.DataFrame, max_value: float, models: Sequence[str] = ("base", "finetuned"), caption_fn=None) -> list[str]:
    """HTML blocks of example windows: the same tokens on each model, highlighted."""
    if rows is None or len(rows) == 0:
        return []
    vocab = data.vocab_forms(run)  # once: a cache_resource lookup per window was a tenth of the page
    # columns as lists, not itertuples (a frame with list columns makes a row tuple in ~0.3 ms)
    cols = {c: rows[c].tolist() for c in rows.columns if c in _EXAMPLE_FIELDS or c in (f"acts_{m}" for m in models)}
    blocks = []
    for i in range(len(rows)):
        r = SimpleNamespace(**{c: v[i] for c, v in cols.items()})
        ids = r.token_ids
        tokens, titles = vocab.window(ids), vocab.titles(ids)
        acts = {m: getattr(r, f"acts_{m}") for m in models}
        focus = int(r.position) - int(r.window_start)
        cap = caption_fn(r) if caption_fn else None
        blocks.append(render.example_block(tokens, acts, max_value, focus=focus, caption=cap, titles=titles, grouped=True))
    return blocks


_EXAMPLE_FIELDS = ("token_ids", "position", "window_start", "rank", "seq_id", "activation", "bin", "bin_low", "bin_high", "feature_id", "model", "kind")


def _top_caption(r: Any) -> str:
    return f"#{int(r.rank) + 1} · seq {int(r.seq_id)} pos {int(r.position)} · activation {float(r.activation):.3g}"


def _quantile_caption(r: Any) -> str:
    return f"bin {int(r.bin)} [{float(r.bin_low):.3g}, {float(r.bin_high):.3g}) · activation {float(r.activation):.3g}"


@st.cache_data(show_spinner=False, hash_funcs=HASH_FUNCS, max_entries=2048)
def _feature_examples_html(run: Run, sae: str, feature_id: int, model: str, kind: str, max_value: float) -> str | None:
    # ~140 windows of ~17 highlighted tokens on the feature page: built once per feature
    ex = data.feature_examples(run, sae, feature_id)
    rows = ex[(ex["model"] == model) & (ex["kind"] == kind)]
    if len(rows) == 0:
        return None
    return render.examples_html(example_blocks(run, rows, max_value, caption_fn=_top_caption if kind == "top" else _quantile_caption))


def feature_examples(run: Run, sae: str, feature_id: int, model: str, kind: str, max_value: float, empty: str = "No examples.") -> None:
    """One feature's top or quantile examples selected on `model`, each window drawn on both
    models (HTML cached per feature)."""
    body = _feature_examples_html(run, sae, int(feature_id), model, kind, float(max_value))
    if body is None:
        st.caption(inert(empty))
    else:
        st.html(body)


def show_examples(run: Run, rows: pd.DataFrame, max_value: float, title: str | None = None, empty: str = "No examples.", caption_fn=None) -> None:
    if rows is None or len(rows) == 0:
        st.caption(inert(empty))
        return
    st.html(render.examples_html(example_blocks(run, rows, max_value, caption_fn=caption_fn), title))


@st.cache_data(show_spinner=False, hash_funcs=HASH_FUNCS, max_entries=512)
def inline_examples(run: Run, sae: str, ids: tuple[int, ...], model: str) -> dict[int, str]:
    """For list rows: each feature's rank-0 top example on `model`, one short highlighted window
    (HTML, scaled to its own activation), by feature id; features without one are absent."""
    out = {}
    for r in data.top_examples(run, sae, ids, model).itertuples(index=False):
        tokens, titles = data.window_strings(run, r.token_ids)
        focus = int(r.position) - int(r.window_start)
        out[int(r.feature_id)] = render.CSS + f'<div class="sx-ex">{render.highlight(tokens, getattr(r, f"acts_{model}"), float(r.activation) or 1.0, model, focus, titles, grouped=True)}</div>'
    return out


@st.cache_data(show_spinner=False, hash_funcs=HASH_FUNCS, max_entries=256)
def kl_context_blocks(run: Run, limit: int, offset: int, source: str | None = None) -> list[str]:
    """The Where-the-models-differ page's contexts (data.kl_contexts, same order), one HTML block
    each: the window (grouped tokens, hover titles) shaded by the KL of the prediction made at each
    token, the predicting token outlined, with the stylesheet."""
    df, _ = data.kl_contexts(run, limit, offset, source)
    out = []
    for r in df.itertuples(index=False):
        tokens, titles = data.window_strings(run, r.token_ids)
        kl = [float(v) if v is not None and math.isfinite(float(v)) else 0.0 for v in r.kl_window]
        focus = int(r.position) - int(r.window_start)
        peak = max(kl, default=0.0) or 1.0
        cap = f"#{int(r.rank) + 1} · {r.source} · seq {int(r.seq_id)} pos {int(r.position)} · KL {float(r.kl):.3g} nats · loss_finetuned − loss_base {float(r.loss_diff):+.3g}"
        out.append(render.CSS + render.example_block(tokens, {"KL": kl}, peak, focus=focus, caption=cap, titles=titles, grouped=True))  # caption: escaped
    return out


def pager(param: str, n_rows: int, page_size: int) -> int:
    """Page controls (st.pagination) bound to query parameter `param` (1-based page number;
    a page past the end falls back to page 1); returns the 0-based row offset. The widgets
    whose change makes a new list (filters, sort, page size) reset `param` (urlstate resets)."""
    n_pages = max(1, math.ceil(n_rows / page_size))
    if n_pages == 1:
        return 0
    page = urlstate.widget(st.pagination, param, n_pages, key=f"pager_{param}", default=1, codec=urlstate.integer(1, n_pages), quiet=True, max_visible_pages=7)
    return (min(int(page or 1), n_pages) - 1) * page_size
