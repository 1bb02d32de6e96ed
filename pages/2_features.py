"""Features: every feature of one SAE, filtered, searched, sorted and paged in memory
(store.FeatureTable, loaded once per run and SAE; one page of rows reaches the browser).
Every selection is in the URL (webapp.urlstate). Selecting a row opens its feature page."""

import shlex

import streamlit as st

from explorer import features_view, figures, render, schema, store
from explorer.render import inert
from webapp import data, state, ui, urlstate

run = state.run_picker()
st.title("Features")

PAGE = "page"  # the query parameter of the page number: every other selection resets it
SORT_LABELS = features_view.SORT_LABELS
SEARCH_LABELS = features_view.SEARCH_LABELS
PAGE_SIZES = [25, 50, 100, 200]
ROW_PX, HEADER_PX = 35, 38


def bound(fn, param, *args, key, default, codec, **kw):
    """A widget bound to `param`; a change starts the list again at page 1."""
    return urlstate.widget(fn, param, *args, key=key, default=default, codec=codec, resets=(PAGE,), **kw)


view_values: dict = {}  # the view's selections (explorer.features_view.PARAMS): its filter and its export's --view


def view(fn, param, *args, key, **kw):
    """A widget bound to the view parameter `param` (its codec and default from features_view.PARAMS)."""
    codec, default = features_view.PARAMS[param]
    value = bound(fn, param, *args, key=key, default=default, codec=codec, **kw)
    if codec.norm(value) != codec.norm(default):
        view_values[param] = codec.norm(value)
    return value


DENSITY, SIMILARITY = features_view.DENSITY_RANGE, features_view.SIMILARITY_RANGE

with state.guard():
    source = state.source_picker(run, "features_source", resets=(PAGE,))
    top = st.columns([1, 1, 1, 1])
    sae = state.sae_picker(run, "features_sae", top[0], resets=(PAGE,))
    state.set_params(feature=None)  # a feature id means nothing on this page: not in its links
    sort_by = view(top[1].selectbox, "sort", "Sort by", list(SORT_LABELS), key="features_sort", format_func=SORT_LABELS.get)
    descending = view(top[2].toggle, "desc", "Descending", key="features_desc")
    page_size = bound(top[3].selectbox, "rows", "Rows per page", PAGE_SIZES, key="features_page_size", default=50, codec=urlstate.choice(PAGE_SIZES))

    with st.expander("Filters and search", expanded=True):
        c1, c2, c3 = st.columns(3)
        view(c1.multiselect, "status_base", "Status on base", schema.STATUSES, key="f_status_base")
        view(c2.multiselect, "status_finetuned", "Status on finetuned", schema.STATUSES, key="f_status_ft")
        view(c3.multiselect, "class", "Cross-model class", schema.CROSS_CLASSES, key="f_class", format_func=lambda c: c.replace("_", " "))
        view(c3.multiselect, "change", f"Change class (paired test, q < {schema.SIGNIFICANCE_ALPHA})", schema.CHANGE_CLASSES, key="f_change", format_func=lambda c: c.replace("_", " "))
        c1, c2, c3 = st.columns(3)
        view(c1.radio, "density_on", "Density on", list(figures.MODELS), key="f_density_model", horizontal=True, format_func=render.MODEL_LABELS.get)
        view(c1.slider, "density", "log10(density + 1e-10)", *DENSITY, key="f_density", step=0.25)
        view(c2.slider, "similarity", "Activation similarity", *SIMILARITY, key="f_sim", step=0.05)
        view(c2.checkbox, "nan_similarity", "Include features with no similarity (constant on a model)", key="f_sim_nan")
        view(c3.text_input, "q", "Search top-example tokens", key="f_search", max_chars=store.MAX_SEARCH_CHARS, placeholder="e.g. def, import, the")
        view(c3.radio, "mode", "Match", list(SEARCH_LABELS), key="f_search_mode", horizontal=True, format_func=SEARCH_LABELS.get,
             help="Substring: anywhere in a top token, any case. Exact token: a top token equal to one of the space-separated words (surrounding spaces ignored). Regular expression: RE2 syntax (linear time; no back-references), matched against each token.")
        view(c3.checkbox, "contexts", "Also search the top examples' contexts", key="f_search_contexts",
             help="Each top example's window of tokens, joined as text, is searched too.")

    n_both_dead = data.cross_class_counts(run, sae, source).get("both_dead", 0)
    show_dead = view(st.toggle, "both_dead", f"Show the {n_both_dead:,} features dead on both models", key="f_both_dead",
                     help="Hidden by default: they never fire on either model in the run's token sample, so every statistic of theirs is empty.")

    flt = features_view.feature_filter(view_values)
    try:
        n = data.count_features(run, sae, flt, source)
    except store.SearchError as exc:
        st.warning(inert(str(exc)), icon=":material/search_off:")
        st.stop()
    if source:
        st.caption("Densities, activations, similarities, classes and tests are those of the " + inert(source) + " tokens alone; logits, neighbours and matches are pooled.")

    @state.fragment
    def table(flt: store.FeatureFilter, n: int) -> None:
        st.markdown(f"**{n:,}** of {run.d_sae(sae):,} features match" + ("" if show_dead or n_both_dead == 0 else f" ({n_both_dead:,} dead on both models hidden)") + ".")
        if n == 0:
            st.info("No feature matches these filters.")
            return
        offset = ui.pager(PAGE, n, page_size)
        page = data.features_page(run, sae, flt, sort_by, descending, page_size, offset, source)
        st.caption(f"Rows {offset + 1:,}–{offset + len(page):,}. Select a row to open its feature page.")
        event = st.dataframe(
            page,
            hide_index=True,
            on_select="rerun",
            selection_mode="single-row",
            key=f"features_table_{offset}_{sort_by}_{descending}_{source}",
            height=HEADER_PX + ROW_PX * len(page),  # every row of the page, no inner scrolling
            column_order=["feature_id", "top_tokens", *[c for c in page.columns if c not in ("feature_id", "top_tokens")]],
            column_config={
                "feature_id": st.column_config.NumberColumn("feature", format="%d"),
                "status_base": "status base",
                "status_finetuned": "status finetuned",
                "cross_class": "class",
                "density_base": st.column_config.NumberColumn("density base", format="%.2e"),
                "density_finetuned": st.column_config.NumberColumn("density finetuned", format="%.2e"),
                "max_act_base": st.column_config.NumberColumn("max act base", format="%.3g"),
                "max_act_finetuned": st.column_config.NumberColumn("max act finetuned", format="%.3g"),
                "mean_active_act_base": st.column_config.NumberColumn("mean act base", format="%.3g"),
                "mean_active_act_finetuned": st.column_config.NumberColumn("mean act finetuned", format="%.3g"),
                "act_similarity": st.column_config.NumberColumn("act. similarity", format="%.3f"),
                "act_error": st.column_config.NumberColumn("act. error", format="%.3g"),
                "logit_similarity": st.column_config.NumberColumn("logit similarity", format="%.4f"),
                "match_feature_id": st.column_config.NumberColumn("best match", format="%d"),
                "match_score": st.column_config.NumberColumn("match score", format="%.3f"),
                "change_class": "change class",
                "q_value": st.column_config.NumberColumn("q-value", format="%.2g", help="Benjamini-Hochberg q of the exact McNemar test of the density change"),
                "log_density_ratio": st.column_config.NumberColumn("log10 density ratio", format="%.2f"),
                "delta_mean_active_act": st.column_config.NumberColumn("Δ mean act", format="%.3g"),
                "logit_effect_max_abs": st.column_config.NumberColumn("logit effect", format="%.3g"),
                "kl_corr": st.column_config.NumberColumn("corr. |Δf| vs KL", format="%.3f"),
                "top_tokens": st.column_config.TextColumn("top-example tokens", width="large"),
            },
        )
        rows = event.selection.rows if event is not None else []
        if rows:
            ui.open_feature(run, sae, int(page.iloc[rows[0]]["feature_id"]))

    table(flt, n)

    d1, d2, d3 = st.columns([1, 1, 2])
    for col, fmt, label, mime, tip in (
        (d1, "csv", f"Download the {n:,} matching rows as CSV", "text/csv",
         "Text cells that begin with =, +, -, @, a tab or a carriage return get a leading ' so that spreadsheets show them as text, never run them as formulas."),
        (d2, "parquet", "… or as Parquet", "application/vnd.apache.parquet", "The same rows and columns with their types (zstd-compressed Parquet)."),
    ):
        col.download_button(
            inert(label), data=lambda fmt=fmt: data.features_export(run, sae, flt, sort_by, descending, source, fmt), file_name=f"{run.run_id}_{sae}_features.{fmt}",
            mime=mime, on_click="ignore", key=f"features_{fmt}", icon=":material/download:", help=inert(tip),
        )
    with d3:  # the same rows from the command line (st.code shows its text as it is)
        st.code(f"sae-transfer export features --run {shlex.quote(run.run_id)} --view {shlex.quote(features_view.FeaturesView(sae, source, view_values).query())} --out FILE.parquet",
                language="bash", wrap_lines=True)
