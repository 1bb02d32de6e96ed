"""Features: every feature of one SAE, filtered, sorted and paged in memory (store.FeatureTable,
loaded once per run and SAE; one page of rows reaches the browser). Selecting a row opens its
feature page."""

import streamlit as st

from explorer import figures, schema, store
from webapp import data, state, ui

run = state.run_picker()
st.title("Features")

PAGER = "features_pager"
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
    "q_value": "q-value of the density change",
    "log_density_ratio": "log density ratio (finetuned / base)",
    "delta_mean_active_act": "Δ mean activation when firing",
    "logit_effect_max_abs": "logit effect (max |Δ logit|)",
    "kl_corr": "corr. of |Δf| with KL",
}


with state.guard():
    source = state.source_picker(run)
    sae = state.sae_param(run)
    top = st.columns([1, 1, 1, 1])
    st.session_state["features_sae"] = sae  # the URL is the source of truth
    sae = top[0].selectbox(
        "SAE", run.saes, key="features_sae", format_func=lambda s: figures.SAE_LABELS.get(s, s),
        on_change=lambda: state.set_params(sae=st.session_state["features_sae"]),
    )
    state.set_params(sae=sae, feature=None)
    sort_by = top[1].selectbox("Sort by", list(SORT_LABELS), format_func=SORT_LABELS.get, key="features_sort")
    descending = top[2].toggle("Descending", value=False, key="features_desc")
    page_size = top[3].selectbox("Rows per page", [25, 50, 100, 200], index=1, key="features_page_size")

    with st.expander("Filters", expanded=True):
        c1, c2, c3 = st.columns(3)
        status_base = c1.multiselect("Status on base", schema.STATUSES, key="f_status_base")
        status_ft = c2.multiselect("Status on finetuned", schema.STATUSES, key="f_status_ft")
        classes = c3.multiselect("Cross-model class", schema.CROSS_CLASSES, key="f_class", format_func=lambda c: c.replace("_", " "))
        changes = c3.multiselect(f"Change class (paired test, q < {schema.SIGNIFICANCE_ALPHA})", schema.CHANGE_CLASSES, key="f_change", format_func=lambda c: c.replace("_", " "))
        c1, c2, c3 = st.columns(3)
        density_model = c1.radio("Density on", list(figures.MODELS), horizontal=True, key="f_density_model")
        d_lo, d_hi = c1.slider("log10(density + 1e-10)", -10.0, 0.0, (-10.0, 0.0), step=0.25, key="f_density")
        s_lo, s_hi = c2.slider("Activation similarity", -1.0, 1.0, (-1.0, 1.0), step=0.05, key="f_sim")
        include_nan = c2.checkbox("Include features with no similarity (constant on a model)", value=True, key="f_sim_nan")
        search = c3.text_input("Search top-example tokens", key="f_search", max_chars=200, placeholder="e.g. def, import, the")

    flt = store.FeatureFilter(
        status_base=tuple(status_base),
        status_finetuned=tuple(status_ft),
        cross_class=tuple(classes),
        change_class=tuple(changes),
        density_model=density_model,
        log_density_min=None if d_lo <= -10.0 else d_lo,
        log_density_max=None if d_hi >= 0.0 else d_hi,
        similarity_min=None if s_lo <= -1.0 else s_lo,
        similarity_max=None if s_hi >= 1.0 else s_hi,
        include_nan_similarity=include_nan,
        search=search or "",
    )
    n = data.count_features(run, sae, flt, source)
    if source:
        st.caption(f"Densities, activations, similarities, classes and tests are those of the {ui.plain(source)} tokens alone; logits, neighbours and matches are pooled.")

    @state.fragment
    def table(flt: store.FeatureFilter, n: int) -> None:
        st.markdown(f"**{n:,}** of {run.d_sae(sae):,} features match.")
        if n == 0:
            st.info("No feature matches these filters.")
            return
        offset = ui.pager(PAGER, n, page_size, reset_on=(run.cache_key, sae, flt, sort_by, descending, source))
        page = data.features_page(run, sae, flt, sort_by, descending, page_size, offset, source)
        st.caption(f"Rows {offset + 1:,}–{offset + len(page):,}. Select a row to open its feature page.")
        event = st.dataframe(
            page,
            hide_index=True,
            on_select="rerun",
            selection_mode="single-row",
            key=f"features_table_{offset}_{sort_by}_{descending}_{source}",
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

    st.download_button(
        f"Download the {n:,} matching rows as CSV",
        data=lambda: store.features_csv(store.connect(), run.dir, sae, flt, sort_by, descending, source),
        file_name=f"{run.run_id}_{sae}_features.csv",
        mime="text/csv",
        on_click="ignore",
        key="features_csv",
        icon=":material/download:",
    )
