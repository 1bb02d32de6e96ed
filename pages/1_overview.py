"""Overview: run config, tokenizer check, SAE quality (pooled or per source), residual similarity,
where the models' predictions differ (KL by source and position), headline counts, verdict."""

import pandas as pd
import streamlit as st

from explorer import figures, schema
from webapp import data, state, ui
from webapp.verdict import verdict

run = state.run_picker()
st.title("Overview")

with state.guard():
    source = state.source_picker(run)
    cfg = run.config
    thresholds = cfg.get("thresholds", {}) or {}
    metrics = data.metrics(run, source)
    cross = data.cross_class_counts(run, "base_sae", source)
    changes = data.change_class_counts(run, "base_sae", source)
    if source:
        st.info(f"Every number on this page that depends on tokens is computed on the {ui.plain(source)} tokens alone (pick “all sources” in the sidebar to pool them).")

    # ---- verdict first: the question this tool answers
    outliers_off = st.toggle("Exclude outlier tokens", value=False, key="overview_outliers", help="Recompute the quality numbers without tokens whose activation norm exceeds the outlier threshold (e.g. BOS).")
    outliers = "excluded" if outliers_off else "included"
    v = verdict(metrics, cross, outliers)
    box = {"yes": st.success, "partly": st.warning, "no": st.error, "unknown": st.info}[v.level]
    box(f"**Does the base SAE transfer?** {v.headline}")
    with st.expander("How this verdict is reached"):
        for line in v.details:
            st.markdown(f"- {line}")

    # ---- headline counts
    st.subheader("Headline counts")
    sc = data.status_counts(run, source)
    dead = {(r.sae, r.model): int(r.n) for r in sc.itertuples() if r.status == "dead"}
    alpha = schema.SIGNIFICANCE_ALPHA
    cols = st.columns(5)
    cols[0].metric("dead (base SAE on base)", f"{dead.get(('base_sae', 'base'), 0):,}", help="never fired on the run's token sample")
    cols[1].metric("died", f"{cross.get('died', 0):,}", help="base SAE features alive on base that never fire on the finetuned model, before any test")
    cols[1].caption(f"{changes.get('died', 0):,} significant (q < {alpha}), {changes.get('too_rare_to_tell', 0):,} too rare to tell (both sides)")
    cols[2].metric("woke", f"{cross.get('woke', 0):,}", help="base SAE features dead on base that fire on the finetuned model, before any test")
    cols[2].caption(f"{changes.get('woke', 0):,} significant (q < {alpha})")
    if "finetuned_sae" in run.saes:
        thr = float(thresholds.get("match", 0.5))
        bl = data.born_lost_counts(run, thr)
        m = (run.manifest.get("summary") or {}).get("matching") or {}
        cols[3].metric("born", f"{bl['born']:,}", help=f"finetuned SAE features (alive on the finetuned model) whose best match in the base SAE scores below {thr}; pooled over sources")
        cols[4].metric("lost", f"{bl['lost']:,}", help=f"base SAE features (alive on the base model) whose best match in the finetuned SAE scores below {thr}; pooled over sources")
        for col, which in ((cols[3], "born"), (cols[4], "lost")):
            alive = m.get("n_alive_finetuned_sae" if which == "born" else "n_alive_base_sae")
            twin_rate = m.get(f"{which}_rate_twin")
            rate = bl[which] / alive if alive else None
            col.caption(f"{ui.pct(rate, 1)} of {alive or 0:,} alive" + (f"; seed twin {ui.pct(twin_rate, 1)}" if twin_rate is not None else "; no seed twin"))
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
            "n_tokens": st.column_config.NumberColumn("tokens", format="%d"),
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
    nonfinite = int(shown[["n_nonfinite_clean", "n_nonfinite_spliced", "n_nonfinite_zero_ablated"]].sum().sum())
    if nonfinite:
        st.warning(f"{nonfinite} token losses were NaN/inf; they are counted in the table and excluded from the means.")
    outl = thresholds.get("outlier_norm") or (f"{thresholds.get('outlier_norm_factor')} × √d_model (after scaling the mean norm to √d_model)" if thresholds.get("outlier_norm_factor") else "n/a")
    st.caption(f"Outlier threshold: {outl}. The toggle above switches every number on this page that depends on it.")
    q = metrics[metrics["outliers"] == outliers]
    c1, c2 = st.columns(2)
    c1.plotly_chart(figures.quality_bars(q, "ce_recovered", "CE recovered", "CE recovered (1 = perfect)"), key="q_ce")
    c2.plotly_chart(figures.quality_bars(q, "explained_variance", "Explained variance", "explained_variance (sae_lens, pooled)"), key="q_ev")
    st.caption(
        "Which tokens count: special tokens (BOS) are left out of every number, as sae_lens's run_evals leaves them out; the splice leaves "
        "them alone, and the zero ablation zeros " + ("every position, BOS included (sae_lens's default; `[evals] zero_ablation`)." if (cfg.get("evals") or {}).get("zero_ablation", "all") == "all"
                                                       else "only the counted tokens (`[evals] zero_ablation = \"counted\"`).")
    )

    # ---- residual similarity
    st.subheader("Residual-stream similarity (same tokens, both models)")
    pos, hists, summary = data.resid(run)
    means = {r.metric: r for r in summary.itertuples()}
    c = st.columns(4)
    for col, (metric, label) in zip(c, (("cosine", "mean cosine"), ("l2", "mean L2 distance"), ("seq_mean_cosine", "mean per-sequence cosine"), ("seq_mean_l2", "mean per-sequence L2"))):
        r = means.get(metric)
        col.metric(label, ui.fmt(r.mean, ".4f") if r is not None else "n/a", help=f"std {ui.fmt(r.std, '.3g')} over {r.n:,}" if r is not None else None)
    st.caption("For scale (Study T): mean cosine 0.669 for Gemma-2b vs its python-codes finetune, 0.965 for Mistral-7B vs MetaMath.")
    c1, c2 = st.columns(2)
    c1.plotly_chart(figures.resid_histogram(hists, "cosine"), key="resid_cos")
    c2.plotly_chart(figures.resid_histogram(hists, "l2"), key="resid_l2")
    st.plotly_chart(figures.resid_by_position(pos), key="resid_pos")
    with st.expander("Per-sequence means"):
        c1, c2 = st.columns(2)
        c1.plotly_chart(figures.resid_histogram(hists, "seq_mean_cosine"), key="resid_scos")
        c2.plotly_chart(figures.resid_histogram(hists, "seq_mean_l2"), key="resid_sl2")

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
        c1.plotly_chart(figures.kl_by_source(kl_src), key="kl_source")
        c2.plotly_chart(figures.kl_by_position(data.kl_by_position(run, source)), key="kl_position")
        st.page_link("pages/7_differences.py", label="The contexts where they differ most, with the features that change there", icon=":material/arrow_forward:")

    # ---- run config and tokenizer check
    st.subheader("Run")
    tok = run.manifest.get("tokenizer_check") or {}
    share = tok.get("matching_id_share")
    min_share = float(thresholds.get("min_matching_id_share", 0.99))
    if share is None:
        st.info("This run has no tokenizer check.")
    elif share < min_share:
        st.error(f"Tokenizer check FAILED: only {share:.4%} of tokens have the same id in both tokenizers (threshold {min_share:.2%}). Every transfer metric compares different text.")
    else:
        st.success(
            f"Tokenizer check passed: {share:.4%} of tokens have the same id in both tokenizers "
            f"({tok.get('n_only_in_base', 0)} only in base, {tok.get('n_only_in_finetuned', 0)} only in finetuned, "
            f"{tok.get('n_same_string_different_id', 0)} same string with a different id)."
        )
    models = cfg.get("models", {})
    saes = cfg.get("saes", {})
    sample = cfg.get("sample", {})

    def _spec(s: dict) -> str:
        s = s if isinstance(s, dict) else {}  # a hand-edited manifest may hold anything here
        return str(s.get("path") or "") or " + ".join(str(x) for x in (s.get("name"), s.get("hf_model"), s.get("release"), s.get("sae_id")) if x) or "?"

    rows = [
        ("run id", run.run_id),
        ("created", str(run.manifest.get("created_at", "?"))),
        ("hook", str(cfg.get("hook", "?"))),
        ("base model", _spec(models.get("base"))),
        ("finetuned model", _spec(models.get("finetuned"))),
        *[(f"{figures.SAE_LABELS.get(k, k)}", f"{_spec(v)} ({run.d_sae(k):,} features)") for k, v in saes.items()],
        ("corpus", str((cfg.get("corpus") or {}).get("path", "?"))),
        ("tokens used", f"{run.manifest.get('n_tokens', 0):,} in {run.manifest.get('n_sequences', 0):,} sequences of {sample.get('context_size', '?')}"),
        ("seed", str(sample.get("seed", "?"))),
        ("thresholds", ", ".join(f"{k} = {v}" for k, v in thresholds.items())),
    ]
    st.table(pd.DataFrame(rows, columns=["setting", "value"]).set_index("setting"))
    with st.expander("Full manifest"):
        st.json({k: v for k, v in run.manifest.items() if k != "files"}, expanded=False)
