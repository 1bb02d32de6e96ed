"""Overview: run config, tokenizer check, SAE quality (pooled or per source), residual similarity,
where the models' predictions differ (KL by source and position), headline counts, verdict."""

import pandas as pd
import streamlit as st

from explorer import figures, schema
from explorer.hooks import hook_kind
from explorer.render import inert
from webapp import charts, data, state, ui, urlstate
from webapp.verdict import verdict

run = state.run_picker()
st.title("Overview")

RESID_LABELS = {"cosine": "mean cosine", "l2": "mean L2 distance", "seq_mean_cosine": "mean per-sequence cosine", "seq_mean_l2": "mean per-sequence L2"}

with state.guard():
    source = state.source_picker(run, "overview_source")
    cfg = run.config
    thresholds = cfg.get("thresholds", {}) or {}
    thresholds = thresholds if isinstance(thresholds, dict) else {}
    metrics = data.metrics(run, source)
    cross = data.cross_class_counts(run, "base_sae", source)
    changes = data.change_class_counts(run, "base_sae", source)
    summary = run.manifest.get("summary") or {}
    summary = summary if isinstance(summary, dict) else {}
    if source:
        st.info("Every number on this page that depends on tokens is computed on the " + inert(source) + " tokens alone (pick “all sources” in the sidebar to pool them).")

    # ---- verdict first: the question this tool answers
    outliers_off = urlstate.widget(
        st.toggle, "outliers", "Exclude outlier tokens", key="overview_outliers", default=False, codec=urlstate.flag(),
        help="Recompute the quality numbers without tokens whose activation norm exceeds the outlier threshold (e.g. BOS).",
    )
    outliers = "excluded" if outliers_off else "included"
    v = verdict(metrics, cross, outliers)
    ui.alert(v.level, "Does the base SAE transfer?", v.headline)
    with st.expander("How this verdict is reached"):
        for line in v.details:
            st.markdown("- " + inert(line))

    # ---- headline counts
    st.subheader("Headline counts")
    sc = data.status_counts(run, source)
    dead = {(r.sae, r.model): int(r.n) for r in sc.itertuples() if r.status == "dead"}
    alpha = schema.SIGNIFICANCE_ALPHA
    cols = st.columns(5)
    cols[0].metric("dead (base SAE on base)", f"{dead.get(('base_sae', 'base'), 0):,}", help="never fired on the run's token sample")
    cols[1].metric("died", f"{cross.get('died', 0):,}", help="base SAE features alive on base that never fire on the finetuned model, before any test")
    cols[1].caption(f"{changes.get('died', 0):,} significant (q < {alpha:g}), {changes.get('too_rare_to_tell', 0):,} too rare to tell (both sides)")
    cols[2].metric("woke", f"{cross.get('woke', 0):,}", help="base SAE features dead on base that fire on the finetuned model, before any test")
    cols[2].caption(f"{changes.get('woke', 0):,} significant (q < {alpha:g})")
    if "finetuned_sae" in run.saes:
        thr = ui.num(thresholds.get("match"), 0.5)
        bl = data.born_lost_counts(run, thr)
        m = summary.get("matching") or {}
        m = m if isinstance(m, dict) else {}
        cols[3].metric("born", f"{bl['born']:,}", help=f"finetuned SAE features (alive on the finetuned model) whose best match in the base SAE scores below {thr:g}; pooled over sources")
        cols[4].metric("lost", f"{bl['lost']:,}", help=f"base SAE features (alive on the base model) whose best match in the finetuned SAE scores below {thr:g}; pooled over sources")
        for col, which in ((cols[3], "born"), (cols[4], "lost")):
            alive = int(ui.num(m.get("n_alive_finetuned_sae" if which == "born" else "n_alive_base_sae"), 0.0) or 0)
            twin_rate = ui.num(m.get(f"{which}_rate_twin"))
            rate = bl[which] / alive if alive else None
            col.caption(f"{ui.pct(rate, 1)} of {alive:,} alive" + (f"; seed twin {ui.pct(twin_rate, 1)}" if twin_rate is not None else "; no seed twin"))
    else:
        cols[3].metric("born", "n/a", help="needs a finetuned SAE in the run")
        cols[4].metric("lost", "n/a", help="needs a finetuned SAE in the run")
    st.page_link("pages/4_dead-born.py", label="Browse dead and born features", icon=":material/arrow_forward:")

    # ---- SAE quality
    st.subheader("SAE quality per (SAE, model)")
    shown = metrics[metrics["outliers"] == outliers].copy()
    shown.insert(0, "SAE", shown["sae"].map(figures.SAE_LABELS).fillna(shown["sae"]))
    shown = shown.drop(columns=["sae", "outliers"])
    st.dataframe(
        shown,
        hide_index=True,
        key="quality_table",
        column_config={
            "model": st.column_config.TextColumn("model", help="the model whose activations the SAE encodes"),
            "n_tokens": st.column_config.NumberColumn("tokens counted", format="%d", help="tokens these numbers average over: the sample less its special tokens (BOS), as SAELens evals count; with outliers excluded, less those too"),
            "l0": st.column_config.NumberColumn("L0", format="%.2f", help="mean number of active features per token"),
            "mse": st.column_config.NumberColumn("MSE", format="%.4g", help="squared error summed over dimensions, mean over tokens"),
            "explained_variance": st.column_config.NumberColumn("explained_variance", format="%.4f", help="sae_lens's current definition: 1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²), one ratio pooled over all counted tokens"),
            "explained_variance_legacy": st.column_config.NumberColumn("explained_variance_legacy", format="%.4f", help="sae_lens's old formula: mean over tokens of 1 − ‖x − x̂‖² / ‖x − mean_batch(x)‖²; depends on the batch size ([sample] batch_size sequences)"),
            "pooled_r2": st.column_config.NumberColumn("pooled R² (Study T)", format="%.4f", help="one R² over all scalar elements; can be far below 0"),
            "ce_clean": st.column_config.NumberColumn("CE clean", format="%.4f", help="nats/token"),
            "ce_spliced": st.column_config.NumberColumn("CE spliced", format="%.4f"),
            "ce_zero_ablated": st.column_config.NumberColumn("CE zero-abl.", format="%.4f", help="activation zeroed at " + ("every position, BOS included (sae_lens's run_evals)" if (cfg.get("evals") or {}).get("zero_ablation", "all") == "all" else "the counted tokens only: BOS keeps its activation")),
            "ce_delta": st.column_config.NumberColumn("ΔCE", format="%.4f", help="spliced − clean"),
            "ce_recovered": st.column_config.NumberColumn("CE recovered", format="%.4f", help="(zero − spliced) / (zero − clean)"),
            "outlier_fraction": st.column_config.NumberColumn("outlier share", format="%.4f"),
        },
    )
    st.caption(inert(state.token_counts(run) + " The quality table's “tokens counted” are the latter (fewer still with outliers excluded), the sidebar shows the former."))
    ce_every = int((cfg.get("evals") or {}).get("ce_every", 1))
    if ce_every > 1:
        st.caption(f"The CE columns cover one batch in {ce_every:,} (this run's [evals] ce_every), all three losses on the same tokens; every other column covers every batch.")
    nonfinite = int(shown[["n_nonfinite_clean", "n_nonfinite_spliced", "n_nonfinite_zero_ablated"]].sum().sum())
    if nonfinite:
        st.warning(f"{nonfinite:,} token losses were NaN/inf; they are counted in the table and excluded from the means.")
    factor = thresholds.get("outlier_norm_factor")
    outl = thresholds.get("outlier_norm") or (f"{factor} × √d_model (after scaling the mean norm to √d_model)" if factor else "n/a")
    st.caption("Outlier threshold: " + inert(outl) + ". The toggle above switches every number on this page that depends on it.")
    q_ce, q_ev = charts.quality(run, outliers, source)
    c1, c2 = st.columns(2)
    c1.plotly_chart(q_ce, key="q_ce")
    c2.plotly_chart(q_ev, key="q_ev")
    st.caption(
        "Which tokens count: special tokens (BOS) are left out of every number, as sae_lens's run_evals leaves them out; the splice leaves "
        "them alone, and the zero ablation zeros " + ("every position, BOS included (sae_lens's default; `[evals] zero_ablation`)." if (cfg.get("evals") or {}).get("zero_ablation", "all") == "all"
                                                       else "only the counted tokens (`[evals] zero_ablation = \"counted\"`).")
    )

    # ---- similarity of the activations at the hook (residual stream, MLP out, ...)
    kind = hook_kind(cfg.get("hook"))
    st.subheader(inert(kind.label[:1].upper() + kind.label[1:] + " similarity at the hook (same tokens, both models)"))
    _, _, summary = data.resid(run)
    resid_figs = charts.resid(run)
    means = {r.metric: r for r in summary.itertuples()}
    for col, metric in zip(st.columns(4), RESID_LABELS):
        r = means.get(metric)
        col.metric(RESID_LABELS[metric], ui.fmt(r.mean, ".4f") if r is not None else "n/a", help=f"std {ui.fmt(r.std, '.3g')} over {ui.fmt(r.n, ',d')}" if r is not None else None)
    if kind.residual:
        st.caption("For scale (Study T): mean cosine 0.669 for Gemma-2b vs its python-codes finetune, 0.965 for Mistral-7B vs MetaMath. The similarity covers every token, special tokens included.")
    else:
        st.caption(inert(f"This run's hook reads {kind.label}, not the residual stream: Study T's residual-stream cosines do not compare. The similarity covers every token, special tokens included."))
    c1, c2 = st.columns(2)
    c1.plotly_chart(resid_figs["cosine"], key="resid_cos")
    c2.plotly_chart(resid_figs["l2"], key="resid_l2")
    st.plotly_chart(resid_figs["position"], key="resid_pos")
    with st.expander("Per-sequence means"):
        c1, c2 = st.columns(2)
        c1.plotly_chart(resid_figs["seq_mean_cosine"], key="resid_scos")
        c2.plotly_chart(resid_figs["seq_mean_l2"], key="resid_sl2")

    # ---- where the two models differ
    st.subheader("Where the two models' predictions differ")
    kl_src = data.kl_by_source(run)
    if len(kl_src):
        allrow = kl_src[kl_src["source"] == "all"]
        c = st.columns(3)
        if len(allrow):
            r = allrow.iloc[0]
            c[0].metric("mean KL(base ‖ finetuned)", ui.fmt(r.mean_kl, ".4g"), help="of the next-token distributions, nats per token, over the counted positions")
            c[1].metric("median KL", ui.fmt(r.median_kl, ".4g"))
            c[2].metric("mean loss difference", ui.fmt(r.mean_loss_diff, "+.4f"), help="loss_finetuned − loss_base on the true next token (nats); negative: the finetune predicts this text better")
        c1, c2 = st.columns(2)
        kl_figs = charts.kl(run, source)
        c1.plotly_chart(kl_figs["source"], key="kl_source")
        c2.plotly_chart(kl_figs["position"], key="kl_position")
        st.page_link("pages/8_differences.py", label="The contexts where they differ most, with the features that change there", icon=":material/arrow_forward:")

    # ---- run config and tokenizer check
    st.subheader("Run")
    tok = run.manifest.get("tokenizer_check") or {}
    tok = tok if isinstance(tok, dict) else {}
    share = ui.num(tok.get("matching_id_share"))
    min_share = ui.num(thresholds.get("min_matching_id_share"), 0.99)
    if share is None:
        st.info("This run has no tokenizer check.")
    elif share < min_share:
        st.error(f"Tokenizer check FAILED: only {share:.4%} of tokens have the same id in both tokenizers (threshold {min_share:.2%}). Every transfer metric compares different text.")
    else:
        st.success(
            f"Tokenizer check passed: {share:.4%} of tokens have the same id in both tokenizers "
            f"({ui.fmt(tok.get('n_only_in_base', 0), 'd')} only in base, {ui.fmt(tok.get('n_only_in_finetuned', 0), 'd')} only in finetuned, "
            f"{ui.fmt(tok.get('n_same_string_different_id', 0), 'd')} same string with a different id)."
        )
    models = cfg.get("models", {}) or {}
    saes = cfg.get("saes", {}) or {}
    sample = cfg.get("sample", {}) or {}

    def _spec(s: dict) -> str:
        s = s if isinstance(s, dict) else {}  # a hand-edited manifest may hold anything here
        return str(s.get("path") or "") or " + ".join(str(x) for x in (s.get("name"), s.get("hf_model"), s.get("release"), s.get("sae_id")) if x) or "?"

    corpus = cfg.get("corpus") or {}
    rows = [
        ("run id", run.run_id),
        ("created", str(run.manifest.get("created_at", "?"))),
        ("hook", str(cfg.get("hook", "?"))),
        ("base model", _spec(models.get("base") if isinstance(models, dict) else None)),
        ("finetuned model", _spec(models.get("finetuned") if isinstance(models, dict) else None)),
        *[(f"{figures.SAE_LABELS.get(k, k)}", f"{_spec(v)} ({run.d_sae(k):,} features)") for k, v in (saes.items() if isinstance(saes, dict) else [])],
        ("corpus", str(corpus.get("path", "?") if isinstance(corpus, dict) else corpus)),
        ("tokens", state.token_counts(run)),
        ("sequences", f"{run.manifest.get('n_sequences', '?')} of {sample.get('context_size', '?') if isinstance(sample, dict) else '?'} tokens"),
        ("seed", str(sample.get("seed", "?") if isinstance(sample, dict) else "?")),
        ("thresholds", ", ".join(f"{k} = {v}" for k, v in thresholds.items())),
    ]
    # a dataframe, not st.table: its cells are plain text (st.table renders Markdown)
    st.dataframe(pd.DataFrame(rows, columns=["setting", "value"]), hide_index=True, key="run_table", column_config={"value": st.column_config.TextColumn("value", width="large")})
    with st.expander("Full manifest"):
        st.json({k: v for k, v in run.manifest.items() if k != "files"}, expanded=False)
