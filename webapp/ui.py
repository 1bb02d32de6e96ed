"""Small rendering helpers shared by the pages (links, example lists, number formats)."""

from __future__ import annotations

import hashlib
import html
import math
from typing import Any, Sequence
from urllib.parse import urlencode

import pandas as pd
import streamlit as st

from explorer import render
from explorer.figures import SAE_LABELS
from webapp import data
from webapp.state import Run

FEATURE_PAGE = "pages/3_feature.py"
OTHER_SAE = {"base_sae": "finetuned_sae", "finetuned_sae": "base_sae"}


def feature_params(run: Run, sae: str, feature_id: int) -> dict[str, str]:
    return {"run": run.run_id, "sae": sae, "feature": str(int(feature_id))}


def feature_url(run: Run, sae: str, feature_id: int) -> str:
    return "/feature?" + urlencode(feature_params(run, sae, feature_id))


def feature_link(run: Run, sae: str, feature_id: int, label: str | None = None, **kw: Any) -> None:
    st.page_link(FEATURE_PAGE, label=label or f"{SAE_LABELS.get(sae, sae)} feature {int(feature_id)}", query_params=feature_params(run, sae, feature_id), icon=":material/open_in_new:", **kw)


def open_feature(run: Run, sae: str, feature_id: int) -> None:
    st.switch_page(FEATURE_PAGE, query_params=feature_params(run, sae, feature_id))


def legend() -> None:
    items = "".join(
        f'<span style="display:inline-block;width:0.9em;height:0.9em;background:{c};border-radius:2px;margin:0 4px 0 12px;vertical-align:-1px"></span>{html.escape(render.MODEL_LABELS[m])}'
        for m, c in render.MODEL_COLORS.items()
    )
    st.html(f'<div style="font-size:0.85rem;color:#444">Colours:{items}</div>')


def plain(text: Any) -> str:
    """`text` for st.markdown / st.caption shown as text: every Markdown/HTML-special character
    backslash-escaped (source labels and other run strings are untrusted input)."""
    from webapp.state import _MD_SPECIAL

    return "".join("\\" + ch if ch in _MD_SPECIAL else ch for ch in str(text))


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
    blocks = []
    for r in rows.itertuples(index=False):
        tokens = data.token_strings(run, r.token_ids)
        acts = {m: getattr(r, f"acts_{m}") for m in models}
        focus = int(r.position) - int(r.window_start)
        cap = caption_fn(r) if caption_fn else None
        blocks.append(render.example_block(tokens, acts, max_value, focus=focus, caption=cap))
    return blocks


def show_examples(run: Run, rows: pd.DataFrame, max_value: float, title: str | None = None, empty: str = "No examples.", caption_fn=None) -> None:
    if rows is None or len(rows) == 0:
        st.caption(empty)
        return
    st.html(render.examples_html(example_blocks(run, rows, max_value, caption_fn=caption_fn), title))


def inline_example(run: Run, row: Any, max_value: float, model: str) -> str:
    """One short highlighted window (one model) for list rows."""
    tokens = data.token_strings(run, row.token_ids)
    focus = int(row.position) - int(row.window_start)
    return render.CSS + f'<div class="sx-ex">{render.highlight(tokens, getattr(row, f"acts_{model}"), max_value, model, focus)}</div>'


def pager(key: str, n_rows: int, page_size: int, reset_on: object = None) -> int:
    """Page controls (st.pagination); returns the 0-based row offset.

    The widget's key includes a digest of `reset_on` (the filters, sort, page size), so a new
    selection starts again at page 1 without writing widget state by hand.
    """
    n_pages = max(1, math.ceil(n_rows / page_size))
    if n_pages == 1:
        return 0
    digest = hashlib.sha1(repr((reset_on, page_size, n_rows)).encode()).hexdigest()[:12]
    page = st.pagination(n_pages, key=f"{key}_{digest}", max_visible_pages=7)
    return (min(int(page or 1), n_pages) - 1) * page_size
