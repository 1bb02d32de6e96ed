"""Dead & born: which base-SAE features died or woke on the finetune, with a paired exact test
and Benjamini-Hochberg q-values; born and lost features between the two SAEs against the seed
twin's baseline over the match threshold; what changed most; and contrasts between sources.
Every row links to its feature page and shows its top example inline. Every selection is in
the URL: `source`, `class` (the test's class shown), `threshold`, `rank`, the contrast's
`contrast_a`, `contrast_a_class`, `contrast_b`, `contrast_b_class`, and each list's page
(`died_page`, `woke_page`, `change_page`, `born_page`, `lost_page`, `changed_page`, `contrast_page`)."""

import math

import streamlit as st

from explorer import figures, render, schema
from explorer.render import inert
from webapp import charts, data, state, ui, urlstate

run = state.run_picker()
st.title("Dead & born")

PAGE_SIZE = 10
CLASS_TEXT = {
    "died": ("Died", "Fires on the base model, never on the finetune, and the paired test says it is real (q < {alpha}).", "base"),
    "too_rare_to_tell": ("Too rare to tell", "Fires on one model only, but too rarely for the test (q ≥ {alpha}): not evidence of a death or a birth.", None),
    "rarer": ("Rarer", "Fires on both, significantly less often on the finetune.", "base"),
    "commoner": ("Commoner", "Fires on both, significantly more often on the finetune.", "finetuned"),
    "woke": ("Woke", "Never fires on the base model, fires on the finetune (q < {alpha}).", "finetuned"),
}
RANKING_TEXT = {
    "rarer": "rarer on the finetune (log density ratio, lowest first)",
    "commoner": "commoner on the finetune (log density ratio, highest first)",
    "weaker": "weaker when firing (Δ mean activation, lowest first)",
    "stronger": "stronger when firing (Δ mean activation, highest first)",
    "max_down": "lower max activation (Δ max, lowest first)",
    "max_up": "higher max activation (Δ max, highest first)",
    "logit_effect": "largest logit effect |W_dec[i] · (W_U(finetuned) − W_U(base))|",
    "kl_corr": "most tied to where the models differ (corr. of |Δf| with KL)",
}
CONTRAST_DEFAULTS = (("died",), ("no_significant_change", "commoner"))


def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}  # a hand-edited manifest may hold anything


def feature_rows(df, sae: str, note, example_model) -> None:
    """One row per feature: link with its numbers (`note(row)`), and its top example on
    `example_model(row)` (HTML cached per feature list and model: ui.inline_examples)."""
    if df.empty:
        st.caption("None.")
        return
    models = {int(r.feature_id): example_model(r) for r in df.itertuples(index=False)}
    blocks = {m: ui.inline_examples(run, sae, tuple(f for f, mm in models.items() if mm == m), m) for m in dict.fromkeys(models.values())}
    for r in df.itertuples(index=False):
        fid = int(r.feature_id)
        m = models[fid]
        with st.container(border=True):  # three elements a row: 40 rows a page are ~120 messages, not ~300
            ui.feature_link(run, sae, fid, label=f"feature {fid} · {note(r)}")
            block = blocks[m].get(fid)
            if block is None:
                st.caption(f"No top example on the {render.MODEL_LABELS[m]}.")
            else:
                st.html(block)


def counts_note(r) -> str:
    b, c = int(r.count_base), int(r.count_finetuned)
    return (f"fires {b:,}× on base, {c:,}× on finetuned (expected {b:,} if unchanged: the same tokens) · "
            f"b = {int(r.n_base_only):,}, c = {int(r.n_finetuned_only):,} · p = {ui.fmt(r.p_value, '.2g')}, q = {ui.fmt(r.q_value, '.2g')}")


with state.guard():
    source = state.source_picker(run, "dead_born_source", resets=("died_page", "woke_page", "change_page", "changed_page"))
    alpha = schema.SIGNIFICANCE_ALPHA
    summ = _dict(run.manifest.get("summary"))
    sig_summ = _dict(_dict(_dict(summ.get("by_source")).get("base_sae")).get(source)) if source else _dict(_dict(summ.get("significance")).get("base_sae"))
    ui.legend()
    st.subheader("Died and woke: the base SAE on both models")
    st.caption(
        "Pairing by identity: feature i of the base SAE, encoded from each model's activations on the same tokens, "
        + ("on the " + inert(source) + " tokens alone" if source else "on all tokens") + ". "
        "Each token is a pair of outcomes (fires on base, fires on finetuned); b counts tokens where it fires on base only, c on the finetune only. "
        "The exact McNemar test (two-sided binomial of c out of b + c at ½) gives p; Benjamini-Hochberg across the SAE's features gives q; "
        f"classes use q < {alpha:g}."
    )
    if sig_summ:
        st.caption(inert(
            f"Detection floor: a feature must fire at least {sig_summ.get('detection_floor')} times on one model, and never on the other, "
            f"before it can be called died or woke here (p = 2·0.5ⁿ must reach the run's BH cutoff {ui.fmt(sig_summ.get('bh_cutoff'), '.2g')})."
        ))
    cross = data.cross_class_counts(run, "base_sae", source)
    c1, c2 = st.columns(2)
    for col, cls, text, live in ((c1, "died", "Alive on the base model, never fires on the finetune", "base"), (c2, "woke", "Never fires on the base model, alive on the finetune", "finetuned")):
        with col:

            @state.fragment
            def raw_list(cls: str = cls, text: str = text, live: str = live) -> None:
                st.markdown("#### " + inert(cls.capitalize()) + " (before any test)")
                st.caption(inert(text) + "; most active first, each with the paired test's verdict.")
                n = cross.get(cls, 0)
                st.markdown(f"**{n:,}** features")
                offset = ui.pager(f"{cls}_page", n, PAGE_SIZE)
                df, _ = data.class_page(run, "base_sae", cls, PAGE_SIZE, offset, source)
                feature_rows(
                    df, "base_sae",
                    lambda r: f"{str(r.change_class).replace('_', ' ')} (q = {ui.fmt(r.q_value, '.2g')}) · density on {live}: {ui.density(getattr(r, f'density_{live}'))} · max act {ui.fmt(getattr(r, f'max_act_{live}'))}",
                    lambda r, live=live: live,
                )

            raw_list()
    st.markdown("#### The paired test's classes")
    counts = data.change_class_counts(run, "base_sae", source)
    cols = st.columns(len(CLASS_TEXT))
    for col, (cls, (title, _, _)) in zip(cols, CLASS_TEXT.items()):
        col.metric(inert(title), f"{counts.get(cls, 0):,}")

    @state.fragment
    def class_list() -> None:
        cls = urlstate.widget(
            st.radio, "class", "Show", list(CLASS_TEXT), key="dead_born_class", default="died", codec=urlstate.choice(CLASS_TEXT), resets=("change_page",),
            horizontal=True, format_func=lambda c: inert(CLASS_TEXT[c][0]) + f" ({counts.get(c, 0):,})",
        )
        title, text, model = CLASS_TEXT[cls]
        st.caption(inert(text.format(alpha=alpha)))
        n = counts.get(cls, 0)
        offset = ui.pager("change_page", n, PAGE_SIZE)
        df, _ = data.change_page(run, "base_sae", cls, PAGE_SIZE, offset, source)
        feature_rows(df, "base_sae", counts_note, lambda r: model or ("base" if r.count_base > 0 else "finetuned"))

    class_list()

    st.subheader("Born and lost: base SAE vs finetuned SAE, against the seed twin")
    if "finetuned_sae" not in run.saes:
        st.info("This run has only the base SAE. Born and lost features need a second SAE trained on the finetuned model (add `[saes.finetuned_sae]` to the precompute config).")
    else:
        m = _dict(summ.get("matching"))
        score = m.get("score") if isinstance(m.get("score"), str) else schema.DEFAULT_MATCH_SCORE
        twin = bool(run.manifest.get("twin"))
        st.caption(
            "Matching score: **" + inert(score) + "** (" + inert(schema.MATCH_SCORE_DOCS.get(score, "")) + "), chosen as " + inert(m.get("score_reason") or "the default") + ". "
            "Only features alive on their own model are counted and matched; the counts are pooled over sources. "
            + ("The dashed curves are the same matching between the base SAE and its seed twin (same model, data and settings, another seed): "
               "the share that finds no match without any finetuning." if twin else "This run has no seed twin, so there is no baseline: add `[saes.base_sae_twin]`.")
        )
        thresholds = _dict(run.config.get("thresholds"))
        default_thr = min(1.0, max(0.0, ui.num(thresholds.get("match"), 0.5)))

        @state.fragment
        def born_lost() -> None:
            thr = urlstate.widget(
                st.slider, "threshold", "Match threshold (" + inert(score) + ")", 0.0, 1.0, key="match_threshold", default=default_thr, codec=urlstate.number(0.0, 1.0),
                resets=("born_page", "lost_page"), step=0.01,
                help="A feature whose best match in the other SAE scores below this is born (finetuned SAE) or lost (base SAE). Dead features are not counted.",
            )
            curves = data.baseline(run, score)
            here = curves[(curves["threshold"] - thr).abs() < 1e-9]
            bl = data.born_lost_counts(run, thr)
            c1, c2 = st.columns(2)
            for col, which, sae, model in ((c1, "lost", "base_sae", "base"), (c2, "born", "finetuned_sae", "finetuned")):
                with col:
                    st.markdown("#### " + inert(which.capitalize()))
                    row = here.iloc[0] if len(here) else None
                    rate = float(row[f"{which}_rate"]) if row is not None else math.nan
                    twin_rate = float(row[f"{which}_rate_twin"]) if row is not None else math.nan
                    st.markdown(f"**{bl[which]:,}** features at threshold {thr:.2f}")
                    a, b, c = st.columns(3)
                    a.metric(inert(which), f"{bl[which]:,}", help="alive features whose best match scores below the threshold")
                    a.caption(f"{ui.pct(rate, 1)} of the alive ones")
                    b.metric("seed-twin rate", ui.pct(twin_rate, 1), help="the same share between the base SAE and its seed twin" + (" (for born: the twin's features with no match in the base SAE)" if which == "born" else ""))
                    c.metric("excess", ui.pct(rate - twin_rate, 1) if math.isfinite(rate) and math.isfinite(twin_rate) else "n/a", help="rate − seed-twin rate")
                    fig = charts.baseline(run, score, which, thr)
                    if fig is not None:
                        st.plotly_chart(fig, key=f"baseline_{which}")
                    offset = ui.pager(f"{which}_page", bl[which], PAGE_SIZE)
                    df, _ = data.born_lost_page(run, which, thr, PAGE_SIZE, offset)
                    other = ui.OTHER_SAE[sae]
                    feature_rows(
                        df, sae,
                        lambda r, other=other: f"best match: {figures.SAE_LABELS[other]} feature {ui.fmt(r.match_feature_id, 'd') if r.match_feature_id == r.match_feature_id else 'none'}, score {ui.fmt(r.match_score, '.3f')}",
                        lambda r, model=model: model,
                    )

        born_lost()
        with st.expander("The other matching scores"):
            st.caption("Born and lost rates at the run's threshold for every candidate score (the Similarity page shows how well each separates the seed twin's pairs from random pairs).")
            allc = data.baseline(run)
            if len(allc):
                at_thr = allc[(allc["threshold"] - default_thr).abs() < 1e-9][["score", "n_lost", "lost_rate", "lost_rate_twin", "excess_lost", "n_born", "born_rate", "born_rate_twin", "excess_born"]]
                st.dataframe(at_thr, hide_index=True, key="baseline_scores")

    st.subheader("What changed most")
    st.caption(
        "Base SAE features ranked by one change between the models (features firing on neither left out). The log density ratio is "
        "log10((count_finetuned + 0.5) / (count_base + 0.5)) with a 95% interval (Poisson approximation)."
    )

    @state.fragment
    def changed() -> None:
        ranking = urlstate.widget(st.selectbox, "rank", "Rank by", list(RANKING_TEXT), key="changed_ranking", default="rarer", codec=urlstate.choice(RANKING_TEXT),
                                  resets=("changed_page",), format_func=RANKING_TEXT.get)
        _, n = data.changed_most(run, "base_sae", ranking, 1, 0, source)
        st.markdown(f"**{n:,}** base SAE features")
        offset = ui.pager("changed_page", n, PAGE_SIZE)
        df, _ = data.changed_most(run, "base_sae", ranking, PAGE_SIZE, offset, source)
        feature_rows(
            df, "base_sae",
            lambda r: (f"log ratio {ui.fmt(r.log_density_ratio, '.2f')} [{ui.fmt(r.log_density_ratio_low, '.2f')}, {ui.fmt(r.log_density_ratio_high, '.2f')}] · "
                       f"Δ mean act {ui.fmt(r.delta_mean_active_act, '.3g')} · Δ max {ui.fmt(r.delta_max_act, '.3g')} · logit effect {ui.fmt(r.logit_effect_max_abs, '.3g')} · "
                       f"corr. with KL {ui.fmt(r.kl_corr, '.3f')}"),
            lambda r: "base" if r.count_base >= r.count_finetuned else "finetuned",
        )

    changed()

    srcs = state.run_sources(run)
    if len(srcs) >= 2:
        st.subheader("Across sources")
        st.caption("Features whose significance class differs between two sources, e.g. died on one source and no significant change on the other.")

        @state.fragment
        def contrast() -> None:
            c1, c2, c3, c4 = st.columns(4)
            src_a = urlstate.widget(c1.selectbox, "contrast_a", "On source", srcs, key="contrast_a", default=srcs[-1], codec=urlstate.choice(srcs), resets=("contrast_page",))
            cls_a = urlstate.widget(c2.multiselect, "contrast_a_class", "class", schema.CHANGE_CLASSES, key="contrast_cls_a", default=CONTRAST_DEFAULTS[0],
                                    codec=urlstate.choices(schema.CHANGE_CLASSES, empty="none"), resets=("contrast_page",), format_func=lambda c: c.replace("_", " "))
            src_b = urlstate.widget(c3.selectbox, "contrast_b", "and on source", srcs, key="contrast_b", default=srcs[0], codec=urlstate.choice(srcs), resets=("contrast_page",))
            cls_b = urlstate.widget(c4.multiselect, "contrast_b_class", "class ", schema.CHANGE_CLASSES, key="contrast_cls_b", default=CONTRAST_DEFAULTS[1],
                                    codec=urlstate.choices(schema.CHANGE_CLASSES, empty="none"), resets=("contrast_page",), format_func=lambda c: c.replace("_", " "))
            _, n = data.source_contrast(run, "base_sae", tuple(cls_a), src_a, tuple(cls_b), src_b, 1, 0)
            st.markdown(f"**{n:,}** base SAE features")
            offset = ui.pager("contrast_page", n, PAGE_SIZE)
            df, _ = data.source_contrast(run, "base_sae", tuple(cls_a), src_a, tuple(cls_b), src_b, PAGE_SIZE, offset)
            feature_rows(
                df, "base_sae",
                lambda r: f"{src_a}: {r.class_a} ({int(r.count_base_a):,} → {int(r.count_finetuned_a):,}) · {src_b}: {r.class_b} ({int(r.count_base_b):,} → {int(r.count_finetuned_b):,})",
                lambda r: "base",
            )

        contrast()
