"""Crosscoder: one dictionary over both models. Relative decoder norm bands (adjustable, in the URL),
Latent Scaling, the base-only and finetune-only latents with their examples on both models, and
each latent's nearest SAE features. Deep link: /crosscoder?run=&latent=N"""

import streamlit as st

from explorer import crosscoder_store as cs
from explorer import figures, render
from explorer.render import inert
from webapp import crosscoder as cc
from webapp import data, state, ui, urlstate

run = state.run_picker()
st.title("Crosscoder")

PAGE_SIZE = 8
_OUTER, _SHARED, _SORT = "crosscoder_outer", "crosscoder_shared", "crosscoder_sort"
SOURCES = {
    "this project's format": "this project's format",
    "dictionary_learning CrossCoder": "a dictionary_learning CrossCoder checkpoint",
    "dictionary_learning BatchTopKCrossCoder": "a dictionary_learning BatchTopKCrossCoder checkpoint",
}
SORT_LABELS = {"density": "density", "nu_error": "ν_ε (Latent Scaling)", "nu_recon": "ν_r (Latent Scaling)", "relative_norm": "relative norm", "max_act": "max activation"}


def _caption(r) -> str:
    return (
        f"relative norm {ui.fmt(r.relative_norm, '.3f')} · ||d_B|| {ui.fmt(r.dec_norm_base, '.3g')} · ||d_F|| {ui.fmt(r.dec_norm_finetuned, '.3g')}"
        f" · density {ui.density(r.density)} · ν_ε {ui.fmt(r.nu_error, '.2f')} · ν_r {ui.fmt(r.nu_recon, '.2f')}"
    )


def _example_html(rows, max_value: float) -> str:
    blocks = []
    for r in rows.itertuples(index=False):
        tokens, titles = data.window_strings(run, r.token_ids)
        blocks.append(
            render.example_block(
                tokens, {"base": r.acts_base, "finetuned": r.acts_finetuned}, max_value, focus=int(r.position) - int(r.window_start), titles=titles, grouped=True,
            )
        )
    return render.examples_html(blocks)


def _nearest(row: dict) -> None:
    for s in ("base_sae", "finetuned_sae"):
        if s not in run.saes:
            continue
        ids, coss = list(row.get(f"nearest_{s}_ids") or []), list(row.get(f"nearest_{s}_cos") or [])
        side = "base" if s == "base_sae" else "finetuned"
        st.markdown("**" + inert(f"Nearest {figures.SAE_LABELS[s]} features") + "** " + inert(f"(to d_{side[0].upper()})"))
        if not ids:
            st.caption("None: this decoder row is zero.")
        for i, c in zip(ids, coss):
            ui.feature_link(run, s, int(i), label=f"{figures.SAE_LABELS[s]} feature {int(i)} · cos {float(c):.3f}")


def latent_rows(df, bands) -> None:
    if df.empty:
        st.caption("None.")
        return
    ex = cc.latent_examples(run, tuple(int(x) for x in df["feature_id"]), "top", 0)
    by_id = {int(r.feature_id): r for r in ex.itertuples(index=False)}
    for r in df.itertuples(index=False):
        j = int(r.feature_id)
        with st.container(border=True):
            cc.latent_link(run, j, f"latent {j}", bands)
            st.caption(inert(_caption(r)))
            e = by_id.get(j)
            if e is None:
                st.caption("No example.")
            else:
                peak = max(max(e.acts_base, default=0.0), max(e.acts_finetuned, default=0.0)) or 1.0
                st.html(_example_html(ex[ex.feature_id == j], peak))


with state.guard():
    if not cc.has_crosscoder(run):
        st.info(
            "This run has no crosscoder. Add a `[crosscoder]` section with the path of a crosscoder (this project's format, "
            "or a dictionary_learning CrossCoder / BatchTopKCrossCoder checkpoint) to the precompute config; configs/demo.toml has one."
        )
        st.stop()
    summ = cc.summary(run)
    lat = cc.latents(run)
    bands = cc.bands_param(run)
    # manifest strings are never rendered: known values get a label, anything else a neutral one
    arch = {"batchtopk": "a BatchTopK crosscoder", "relu": "a ReLU (L1) crosscoder"}.get(summ.get("architecture"), "a crosscoder")
    source = SOURCES.get(summ.get("source"), "an unrecognised source")
    st.caption(
        "One dictionary over both models: each latent has one activation per token, read from the base and the finetuned "
        "activations together, and one decoder row per model (Anthropic 2024, Sparse Crosscoders). "
        f"This run's: {inert(arch)} with {len(lat):,} latents, from {inert(source)}."
    )
    ui.legend()

    # ---- quality
    met = cc.metrics(run)
    inc = met[met.outliers == "included"].set_index("model")
    cols = st.columns(5)
    for col, m in zip(cols, figures.MODELS):
        col.metric(inert(f"FVE, {m}"), ui.fmt(inc.at[m, "explained_variance"], ".3f"), help="fraction of variance explained: 1 − Σ‖x − x̂‖² / Σ‖x − mean x‖² over the counted tokens (sae_lens's explained_variance)")
    for col, m in zip(cols[2:4], figures.MODELS):
        col.metric(inert(f"CE recovered, {m}"), ui.fmt(inc.at[m, "ce_recovered"], ".3f"), help="(zero-ablated − spliced) / (zero-ablated − clean), the crosscoder's reconstruction spliced in at the hook")
    cols[4].metric("L0 · dead latents", f"{ui.fmt(inc.at['base', 'l0'], '.1f')} · {summ.get('n_dead', 0):,}", help="mean active latents per token · latents that never fired on the run's tokens")

    # ---- bands
    st.subheader("Relative decoder norm")
    st.session_state[_OUTER] = (bands.base_only_max, bands.finetune_only_min)
    st.session_state[_SHARED] = (bands.shared_min, bands.shared_max)

    def _on_bands() -> None:
        lo, hi = st.session_state[_OUTER]
        slo, shi = st.session_state[_SHARED]
        state.set_params(base_only_max=f"{lo:g}", finetune_only_min=f"{hi:g}", shared_min=f"{slo:g}", shared_max=f"{shi:g}")

    c1, c2 = st.columns(2)
    c1.slider("Base-only up to · finetune-only from", 0.0, 1.0, step=0.01, key=_OUTER, on_change=_on_bands,
              help="relative norm ||d_F|| / (||d_B|| + ||d_F||) at or below the first value: base-only; at or above the second: finetune-only")
    c2.slider("Shared band", 0.0, 1.0, step=0.01, key=_SHARED, on_change=_on_bands, help="relative norm within this range: shared")
    if not bands.valid():
        st.warning("The bands overlap or are out of order (base-only < shared < finetune-only); a latent may be counted in two bands.")
    counts = cs.band_counts(lat, bands)
    hist = cs.relative_norm_histogram(lat)
    st.plotly_chart(figures.relative_norm_histogram(hist, bands), key="crosscoder_hist")
    a, b, c, d = st.columns(4)
    a.metric("base-only", f"{counts['base_only']:,}")
    b.metric("shared", f"{counts['shared']:,}")
    c.metric("finetune-only", f"{counts['finetune_only']:,}")
    d.metric("alive latents", f"{counts['alive']:,}", help=f"{counts['dead']:,} dead latents (never fired) are left out of the bands and the histogram")
    rel_alive = lat.loc[cs.alive(lat), "relative_norm"].dropna()
    if len(rel_alive) and (counts["base_only"] == 0 or counts["finetune_only"] == 0):
        st.caption(
            f"The alive latents' relative norms run from {rel_alive.min():.3f} to {rel_alive.max():.3f}: an empty band is a finding "
            "(no latent that exclusive at this threshold), and moving the sliders lists the most base- or finetune-leaning latents."
        )

    # ---- latent scaling
    st.subheader("Latent Scaling")
    st.caption(
        "Minder et al. 2025: for each latent, β = the best scalar fit of its finetuned decoder contribution f_j d_j^F to each model's "
        "reconstruction error without the latent (ν_ε) and to each model's reconstruction (ν_r); ν = β(base) / β(finetuned). "
        "A finetune-only latent with both ν near 0 is really absent from the base model; ν near 1 means the base model needs it too "
        "(an artefact of the crosscoder's sparsity: complete shrinkage or latent decoupling)."
    )
    j = cc.latent_param(run)
    pts = cs.scatter_points(lat, bands)
    if pts.attrs.get("n_finetune_only", 0) == 0:
        st.caption("No alive latent is in the finetune-only band at these thresholds.")
    # keyed on the shown latent: a new latent starts with no selection (no stale click re-selects one)
    event = st.plotly_chart(figures.latent_scaling_scatter(pts), key=f"crosscoder_scatter_{j}", on_select="rerun", selection_mode="points")
    st.caption("Click a point to show that latent below.")
    if pts.attrs.get("n_without_ratio"):
        st.caption(f"{pts.attrs['n_without_ratio']:,} finetune-only latents have no ratio (a zero fit on the finetuned model) and are not drawn.")
    for p in (event.selection.points if event is not None and event.selection else []) or []:
        picked = p.get("customdata")
        if isinstance(picked, list):
            picked = picked[0] if picked else None
        if picked is not None and int(picked) != j:
            state.set_params(latent=int(picked))
            st.rerun()

    # ---- one latent
    if j is not None:
        row = cc.latent(run, j)
        st.subheader(f"Latent {j:d}")
        st.caption(inert(_caption(lat.iloc[j])) if 0 <= j < len(lat) else "")
        x1, x2, x3, x4 = st.columns(4)
        x1.metric("decoder cosine", ui.fmt(row["dec_cos"], ".3f"), help="cos(d_B, d_F)")
        x2.metric("max activation", ui.fmt(row["max_act"]))
        x3.metric("β_ε base · finetuned", f"{ui.fmt(row['beta_error_base'], '.3f')} · {ui.fmt(row['beta_error_finetuned'], '.3f')}")
        x4.metric("β_r base · finetuned", f"{ui.fmt(row['beta_recon_base'], '.3f')} · {ui.fmt(row['beta_recon_finetuned'], '.3f')}")
        left, right = st.columns([2, 1])
        with left:
            st.markdown("**Top examples**: each window's lines are the latent's share of each model's reconstruction, f_j × ||d_j^m||")
            ex = cc.latent_examples(run, (j,))
            top = ex[ex.kind == "top"]
            if top.empty:
                st.caption("No examples: the latent never fires on the run's tokens.")
            else:
                peak = max(max(max(a, default=0.0) for a in top.acts_base), max(max(a, default=0.0) for a in top.acts_finetuned)) or 1.0
                st.html(_example_html(top, peak))
                q = ex[ex.kind == "quantile"]
                if len(q):
                    with st.expander("Quantile examples"):
                        st.html(_example_html(q, peak))
        with right:
            _nearest(row)

    # ---- the lists
    st.subheader("Finetune-only and base-only latents")
    pages = tuple(f"page_{band}" for band in ("finetune_only", "base_only"))
    sort_by = urlstate.widget(
        st.selectbox, "sort", "Sort by", list(SORT_LABELS), key=_SORT, default="density", codec=urlstate.choice(SORT_LABELS), resets=pages,
        format_func=SORT_LABELS.get,
    )
    descending = sort_by not in ("nu_error", "nu_recon")
    l1, l2 = st.columns(2)
    for col, band in ((l1, "finetune_only"), (l2, "base_only")):
        with col:
            st.markdown(f"#### {cs.BAND_LABELS[band].capitalize()} ({counts[band]:,})")
            offset = ui.pager(f"page_{band}", counts[band], PAGE_SIZE)
            page, _ = cs.band_page(lat, band, bands, sort_by, descending, PAGE_SIZE, offset)
            latent_rows(page, bands)
