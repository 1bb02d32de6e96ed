"""Features: every feature of one SAE, filtered, searched, sorted and paged in memory
(store.FeatureTable, loaded once per run and SAE; one page of rows reaches the browser).
Every selection is in the URL (webapp.urlstate). Selecting a row opens its feature page."""

import streamlit as st

from explorer import figures, render, schema, store
from explorer.render import inert
from webapp import data, state, ui, urlstate

run = state.run_picker()
st.title("Features")

PAGE = "page"  # the query parameter of the page number: every other selection resets it
SORT_LABELS = {
    "feature_id": "feature id",
    "density_base": "density on base",
    "density_finetuned": "density on finetuned",
    "max_act_base": "max activation on base",
    "max_act_finetuned": "max activation on finetuned",
    "act_similarity": "activation similarity",
    "logit_similarity": "logit similarity",
    "act_error": "activation error",
    "match_score": "best-match score",
}
SEARCH_LABELS = {"substring": "substring", "exact": "exact token", "regex": "regular expression (RE2)"}
PAGE_SIZES = [25, 50, 100, 200]
ROW_PX, HEADER_PX = 35, 38


def bound(fn, param, *args, key, default, codec, **kw):
    """A widget bound to `param`; a change starts the list again at page 1."""
    return urlstate.widget(fn, param, *args, key=key, default=default, codec=codec, resets=(PAGE,), **kw)


with state.guard():
    top = st.columns([1, 1, 1, 1])
    sae = state.sae_picker(run, "features_sae", top[0], resets=(PAGE,))
    state.set_params(feature=None)  # a feature id means nothing on this page: not in its links
    sort_by = bound(top[1].selectbox, "sort", "Sort by", list(SORT_LABELS), key="features_sort", default="feature_id", codec=urlstate.choice(SORT_LABELS), format_func=SORT_LABELS.get)
    descending = bound(top[2].toggle, "desc", "Descending", key="features_desc", default=False, codec=urlstate.flag())
    page_size = bound(top[3].selectbox, "rows", "Rows per page", PAGE_SIZES, key="features_page_size", default=50, codec=urlstate.choice(PAGE_SIZES))

    with st.expander("Filters and search", expanded=True):
        c1, c2, c3 = st.columns(3)
        status_base = bound(c1.multiselect, "status_base", "Status on base", schema.STATUSES, key="f_status_base", default=(), codec=urlstate.choices(schema.STATUSES))
        status_ft = bound(c2.multiselect, "status_finetuned", "Status on finetuned", schema.STATUSES, key="f_status_ft", default=(), codec=urlstate.choices(schema.STATUSES))
        classes = bound(c3.multiselect, "class", "Cross-model class", schema.CROSS_CLASSES, key="f_class", default=(), codec=urlstate.choices(schema.CROSS_CLASSES), format_func=lambda c: c.replace("_", " "))
        c1, c2, c3 = st.columns(3)
        density_model = bound(c1.radio, "density_on", "Density on", list(figures.MODELS), key="f_density_model", default="base", codec=urlstate.choice(figures.MODELS), horizontal=True, format_func=render.MODEL_LABELS.get)
        d_lo, d_hi = bound(c1.slider, "density", "log10(density + 1e-10)", -10.0, 0.0, key="f_density", default=(-10.0, 0.0), codec=urlstate.span(-10.0, 0.0), step=0.25)
        s_lo, s_hi = bound(c2.slider, "similarity", "Activation similarity", -1.0, 1.0, key="f_sim", default=(-1.0, 1.0), codec=urlstate.span(-1.0, 1.0), step=0.05)
        include_nan = bound(c2.checkbox, "nan_similarity", "Include features with no similarity (constant on a model)", key="f_sim_nan", default=True, codec=urlstate.flag())
        search = bound(c3.text_input, "q", "Search top-example tokens", key="f_search", default="", codec=urlstate.text(store.MAX_SEARCH_CHARS), max_chars=store.MAX_SEARCH_CHARS, placeholder="e.g. def, import, the")
        mode = bound(c3.radio, "mode", "Match", list(SEARCH_LABELS), key="f_search_mode", default="substring", codec=urlstate.choice(SEARCH_LABELS), horizontal=True, format_func=SEARCH_LABELS.get,
                     help="Substring: anywhere in a top token, any case. Exact token: a top token equal to one of the space-separated words (surrounding spaces ignored). Regular expression: RE2 syntax (linear time; no back-references), matched against each token.")
        contexts = bound(c3.checkbox, "contexts", "Also search the top examples' contexts", key="f_search_contexts", default=False, codec=urlstate.flag(),
                         help="Each top example's window of tokens, joined as text, is searched too.")

    n_both_dead = data.cross_class_counts(run, sae).get("both_dead", 0)
    show_dead = bound(st.toggle, "both_dead", f"Show the {n_both_dead:,} features dead on both models", key="f_both_dead", default=False, codec=urlstate.flag(),
                      help="Hidden by default: they never fire on either model in the run's token sample, so every statistic of theirs is empty.")

    flt = store.FeatureFilter(
        status_base=tuple(status_base),
        status_finetuned=tuple(status_ft),
        cross_class=tuple(classes),
        density_model=density_model,
        log_density_min=None if d_lo <= -10.0 else d_lo,
        log_density_max=None if d_hi >= 0.0 else d_hi,
        similarity_min=None if s_lo <= -1.0 else s_lo,
        similarity_max=None if s_hi >= 1.0 else s_hi,
        include_nan_similarity=include_nan,
        search=search or "",
        search_mode=mode,
        search_contexts=contexts,
        exclude_both_dead=not show_dead,
    )
    try:
        n = data.count_features(run, sae, flt)
    except store.SearchError as exc:
        st.warning(inert(str(exc)), icon=":material/search_off:")
        st.stop()

    @state.fragment
    def table(flt: store.FeatureFilter, n: int) -> None:
        st.markdown(f"**{n:,}** of {run.d_sae(sae):,} features match" + ("" if show_dead or n_both_dead == 0 else f" ({n_both_dead:,} dead on both models hidden)") + ".")
        if n == 0:
            st.info("No feature matches these filters.")
            return
        offset = ui.pager(PAGE, n, page_size)
        page = data.features_page(run, sae, flt, sort_by, descending, page_size, offset)
        st.caption(f"Rows {offset + 1:,}–{offset + len(page):,}. Select a row to open its feature page.")
        event = st.dataframe(
            page,
            hide_index=True,
            on_select="rerun",
            selection_mode="single-row",
            key=f"features_table_{offset}_{sort_by}_{descending}",
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
                "top_tokens": st.column_config.TextColumn("top-example tokens", width="large"),
            },
        )
        rows = event.selection.rows if event is not None else []
        if rows:
            ui.open_feature(run, sae, int(page.iloc[rows[0]]["feature_id"]))

    table(flt, n)

    st.download_button(
        f"Download the {n:,} matching rows as CSV",
        data=lambda: data.features_csv(run, sae, flt, sort_by, descending),
        file_name=f"{run.run_id}_{sae}_features.csv",
        mime="text/csv",
        on_click="ignore",
        key="features_csv",
        icon=":material/download:",
        help="Text cells that begin with =, +, -, @, a tab or a carriage return get a leading ' so that spreadsheets show them as text, never run them as formulas.",
    )
