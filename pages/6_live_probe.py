"""Live probe: both models and the SAE(s) run on a prompt; features, reconstruction, predictions, steering.

Thin: explorer.probe does the work (through webapp.live's caches), explorer.render the HTML.
The prompt form reruns the page only on submit; the feature view, the prediction view and the
steering panel are fragments, so changing them reruns only their panel.

In the URL (webapp.urlstate): `sae`, `feature`, `pos` (predict after position), and the prompt:
`prompt` when it is at most MAX_URL_PROMPT characters, or `seq` for a corpus sequence, with
`exclude_special=0` when special tokens are counted. A longer prompt stays in the session only.
"""

import math

import pandas as pd
import streamlit as st

from explorer import render
from explorer.errors import ExplorerError
from explorer.figures import SAE_LABELS
from explorer.probe import CLEAN, ZERO_ABLATED, spliced
from explorer.render import inert
from webapp import data, live, state, ui, urlstate

DEFAULT_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n'
TYPED, CORPUS = "Type a prompt", "Pick from the corpus"
K_SOURCE, K_TEXT, K_SEQ, K_EXCL, K_SUBMITTED = "probe_source", "probe_text", "probe_seq", "probe_exclude_special", "probe_submitted"
K_SAE, K_FID, K_DIFF_BY, K_POS = "probe_sae", "probe_feature", "probe_diff_by", "probe_position"
K_URL_SEEN = "probe_url_request"  # the URL's request the form was last set to
K_STEER_MODE, K_STEER_FID, K_STEER_COEF, K_STEER_N, K_STEER_REQ = "steer_mode", "steer_feature", "steer_coef", "steer_n", "steer_request"
RAW, SCALED = "raw decoder direction", "x the feature's max activation on the base model (from the run)"
N_SEQUENCES = 200
TOP_K = 5
MAX_URL_PROMPT = 500
DIFF_LABELS = {"max": "largest |difference| at one token", "sum": "summed |difference| over the prompt"}  # characters of a typed prompt kept in the URL
P_PROMPT, P_SEQ, P_EXCL, P_POS = "prompt", "seq", "exclude_special", "pos"


def _preview(text: str, n: int = 90) -> str:
    shown = render.display_token(text[: n + 1])
    return shown if len(shown) <= n else shown[:n] + "..."


def _submit(seqs: pd.DataFrame | None) -> None:
    """The form's submit: the request goes to the session and, when it fits, to the URL (a new
    prompt starts at its last position: `pos` is removed)."""
    exclude = bool(st.session_state.get(K_EXCL, True))
    url = {P_POS: None, P_EXCL: None if exclude else "0"}
    if st.session_state.get(K_SOURCE) == CORPUS and seqs is not None and st.session_state.get(K_SEQ) is not None:
        row = seqs[seqs["seq_id"] == st.session_state[K_SEQ]]
        if len(row):
            st.session_state[K_SUBMITTED] = ("ids", tuple(int(i) for i in row.iloc[0]["token_ids"]), exclude, int(st.session_state[K_SEQ]))
            urlstate.write({**url, P_SEQ: int(st.session_state[K_SEQ]), P_PROMPT: None})
            return
    text = st.session_state.get(K_TEXT, "")
    st.session_state[K_SUBMITTED] = ("text", text, exclude, None)
    urlstate.write({**url, P_SEQ: None, P_PROMPT: text if 0 < len(text) <= MAX_URL_PROMPT else None})


def _url_request() -> tuple | None:
    """The prompt named by the URL (`seq` or `prompt`); None if none. When the URL's request
    changes (a link, Back), the form's widgets are set to it; otherwise they are left alone (the
    user may be switching the source or typing a new prompt)."""
    exclude = urlstate.read(P_EXCL, urlstate.flag(), True)
    seq = urlstate.read(P_SEQ, urlstate.integer(0, 2**31 - 1), None)
    request = None
    if seq is not None:
        rows = data.sequences(run, limit=1, offset=seq)
        if len(rows) and int(rows.iloc[0]["seq_id"]) == seq:
            request = ("ids", tuple(int(i) for i in rows.iloc[0]["token_ids"]), exclude, seq)
        else:
            st.warning(inert(f"The link's sequence {seq} is not in this run's token sample; showing the default prompt."), icon=":material/link_off:")
            urlstate.write({P_SEQ: None})
    if request is None:
        prompt = urlstate.read(P_PROMPT, urlstate.text(MAX_URL_PROMPT), None)
        if prompt is not None:
            request = ("text", prompt, exclude, None)
    if request is not None and st.session_state.get(K_URL_SEEN) != request:
        st.session_state[K_URL_SEEN] = request
        st.session_state[K_SOURCE] = CORPUS if request[0] == "ids" else TYPED
        st.session_state[K_EXCL] = exclude
        if request[0] == "ids":
            st.session_state[K_SEQ] = seq
        else:
            st.session_state[K_TEXT] = request[1]
    return request


def _feature_table(df: pd.DataFrame, sae: str) -> pd.DataFrame:
    out = df.copy()
    out.insert(0, "open", [ui.feature_url(run, sae, int(f)) for f in out["feature_id"]])
    if "token_str" in out:
        out["token_str"] = out["token_str"].map(render.display_token)
    return out


run = state.run_picker()
st.title("Live probe")
st.caption(
    "Both models and the SAE(s) run live on your prompt, on the same token ids (BOS first, as the models were trained). "
    "Blue is the base model, orange the finetuned model, on every page."
)

with state.guard():
    key = live.pair_key(run)
    pair = live.get_pair(key)
    saes = [s for s in run.saes if s in pair.saes] or list(pair.saes)

    # ---------------------------------------------------------------- the prompt
    from_url = _url_request()
    st.session_state.setdefault(K_SOURCE, TYPED)
    st.session_state.setdefault(K_TEXT, DEFAULT_PROMPT)
    st.session_state.setdefault(K_EXCL, True)
    source = st.radio("Prompt source", [TYPED, CORPUS], key=K_SOURCE, horizontal=True, label_visibility="collapsed")
    seqs = None
    with st.form("probe_form", border=True):
        if source == TYPED:
            st.text_area("Prompt", key=K_TEXT, height=140, help=f"Longer prompts are cut to the models' context ({pair.base.cfg.n_ctx:d} tokens).")
        else:
            seqs = data.sequences(run, limit=N_SEQUENCES)
            if len(seqs) == 0:
                st.info("This run's token sample is empty; type a prompt instead.")
            else:
                # selectbox options are plain text in Streamlit (no Markdown): no inert needed
                labels = {int(r.seq_id): f"#{int(r.seq_id)} · {r.source} · {_preview(live.decode(key, tuple(int(i) for i in r.token_ids[1:])))}" for r in seqs.itertuples()}
                if from_url is not None and from_url[3] is not None and from_url[3] not in labels:
                    row = data.sequences(run, limit=1, offset=from_url[3]).iloc[0]
                    labels[int(row.seq_id)] = f"#{int(row.seq_id)} · {row.source} · {_preview(live.decode(key, tuple(int(i) for i in row.token_ids[1:])))}"
                    seqs = pd.concat([seqs, data.sequences(run, limit=1, offset=from_url[3])], ignore_index=True)
                if st.session_state.get(K_SEQ) not in labels:
                    st.session_state[K_SEQ] = next(iter(labels))
                st.selectbox("Corpus sequence (from the run's token sample)", list(labels), key=K_SEQ, format_func=lambda i: labels.get(i, str(i)))
        st.checkbox("Leave special tokens (BOS) out of the metrics, as sae_lens evals do", key=K_EXCL)
        st.form_submit_button("Run probe", type="primary", on_click=_submit, args=(seqs,))

    kind, value, exclude, _seq = from_url or st.session_state.get(K_SUBMITTED) or ("text", DEFAULT_PROMPT, True, None)
    try:
        result = live.probe(key, kind, value, exclude)
    except ExplorerError as exc:
        st.warning(inert(str(exc)), icon=":material/edit_note:")
        st.stop()
    prompt = result.prompt
    for note in prompt.notices + result.notices:
        if "context" in note:
            st.warning(inert(note), icon=":material/info:")
        else:
            st.info(inert(note), icon=":material/info:")
    st.caption(f"{prompt.n_tokens:d} tokens · hook " + inert(result.hook) + f" · {len(result.sae_names):d} SAE(s) · probed in {1000 * result.seconds:.0f} ms")
    if kind == "text" and len(value) > MAX_URL_PROMPT:
        st.caption(f"This prompt has {len(value):,} characters: links keep prompts of up to {MAX_URL_PROMPT:,}, so a copied link opens the default prompt.")

    # ---------------------------------------------------------------- SAE (drives every view below)
    sae = state.sae_picker(run, K_SAE, saes=list(result.sae_names), resets=(state.FEATURE_PARAM,))
    d_sae = result.d_sae[sae]


@st.fragment
def feature_panel() -> None:
    """The chosen feature's per-token activations on both models (reruns alone)."""
    with state.guard():
        fid = state.feature_param(run, sae)
        if fid is None or fid >= d_sae:
            acts = result.feature_acts[(sae, "base")][result.eval_mask] if result.eval_mask.any() else result.feature_acts[(sae, "base")]
            fid = int(acts.max(axis=0).argmax())
        if st.session_state.get(K_FID) != fid:
            st.session_state[K_FID] = fid
        c1, c2 = st.columns([1, 3])
        c1.number_input(
            f"Feature (0 to {d_sae - 1:d})", min_value=0, max_value=d_sae - 1, step=1, key=K_FID,
            on_change=lambda: state.set_params(feature=int(st.session_state[K_FID])),
            help="Defaults to the feature most active on this prompt (base model); ?feature= in the URL picks one.",
        )
        with c2:
            ui.feature_link(run, sae, fid, label=f"Open {SAE_LABELS.get(sae, sae)} feature {fid} (top examples from the run)")
        df = result.feature_activations(sae, fid)
        peak = max(float(df["act_base"].max()), float(df["act_finetuned"].max()))
        focus = int(df[["act_base", "act_finetuned"]].max(axis=1).idxmax()) if peak > 0 else None
        block = render.example_block(
            list(prompt.token_strs), {"base": df["act_base"].tolist(), "finetuned": df["act_finetuned"].tolist()}, peak if peak > 0 else 1.0,
            focus=focus, titles=prompt.token_titles, grouped=True,
        )
        st.html(render.examples_html([f'<div data-probe="feature-acts">{block}</div>']))
        a, b, c = st.columns(3)
        a.metric("max on base", ui.fmt(df["act_base"].max()))
        b.metric("max on finetuned", ui.fmt(df["act_finetuned"].max()))
        c.metric("tokens firing (base / finetuned)", f"{int((df['act_base'] > 0).sum())} / {int((df['act_finetuned'] > 0).sum())}")
        if peak <= 0:
            st.caption("This feature does not fire on this prompt on either model.")


st.subheader("The chosen feature on both models")
feature_panel()

with state.guard():
    # ---------------------------------------------------------------- top features per token
    st.subheader("Top features per token")
    st.caption(f"The {TOP_K:d} most active {ui.sae_label(sae)} features at each token on each model, as feature (activation); click one to open its feature page.")
    table, link_cols = live.top_features_table(key, kind, value, exclude, sae, TOP_K, ui.feature_url_prefix(run, sae))
    st.dataframe(
        table, hide_index=True, width="stretch", height=min(420, 38 + 35 * len(table)), key="probe_top_features",
        column_config={c: st.column_config.LinkColumn(c, display_text=r"#(.+)$", help="open this feature's page (a new tab)") for c in link_cols},
    )

    # ---------------------------------------------------------------- differing features
    st.subheader("Features that differ most between the models")
    st.session_state.setdefault(K_DIFF_BY, "max")
    by = st.radio("Rank by", ["max", "sum"], key=K_DIFF_BY, horizontal=True, format_func=DIFF_LABELS.get)
    diff = result.differing_features(sae, k=20, by=by)
    if diff.empty:
        st.caption("No feature's activation differs between the models on the counted tokens of this prompt.")
    else:
        st.dataframe(
            _feature_table(diff, sae),
            hide_index=True,
            width="stretch",
            column_config={
                "open": st.column_config.LinkColumn("feature", display_text=r"feature=(\d+)$", help="open the feature page"),
                "feature_id": None,
                "max_abs_diff": st.column_config.NumberColumn("max |diff|", format="%.4g"),
                "sum_abs_diff": st.column_config.NumberColumn("sum |diff|", format="%.4g"),
                "position": "at position",
                "token_str": "token",
                "act_base": st.column_config.NumberColumn("base there", format="%.4g"),
                "act_finetuned": st.column_config.NumberColumn("finetuned there", format="%.4g"),
                "max_act_base": st.column_config.NumberColumn("max on base", format="%.4g"),
                "max_act_finetuned": st.column_config.NumberColumn("max on finetuned", format="%.4g"),
            },
        )

    # ---------------------------------------------------------------- reconstruction
    st.subheader("Reconstruction on this prompt")
    rec = result.reconstruction.copy()
    rec["sae"] = rec["sae"].map(lambda s: SAE_LABELS.get(s, s))  # a dataframe: plain text
    rec["model"] = rec["model"].map(render.MODEL_LABELS)
    st.dataframe(
        rec[["sae", "model", "n_tokens", "l0", "mse", "explained_variance", "explained_variance_legacy", "pooled_r2", "ce_clean", "ce_spliced", "ce_zero_ablated", "ce_delta", "ce_recovered"]],
        hide_index=True,
        width="stretch",
        column_config={
            "n_tokens": st.column_config.NumberColumn("tokens", help="tokens counted (special tokens left out when the box above is ticked)"),
            "l0": st.column_config.NumberColumn("L0", format="%.1f"),
            "mse": st.column_config.NumberColumn("MSE", format="%.4g", help="squared error summed over dimensions, mean over tokens"),
            "explained_variance": st.column_config.NumberColumn("explained_variance", format="%.3f", help="sae_lens's current definition: 1 - sum ||x_hat - x||^2 / sum ||x - mean(x)||^2 over the prompt's tokens"),
            "explained_variance_legacy": st.column_config.NumberColumn("explained_variance_legacy", format="%.3f", help="sae_lens's old formula: per token 1 - ||x_hat - x||^2 / ||x - mean(x)||^2, averaged (the prompt is the batch)"),
            "pooled_r2": st.column_config.NumberColumn("pooled R²", format="%.3f", help="Study T's pooled R^2 over all scalar elements; can go far below 0"),
            "ce_clean": st.column_config.NumberColumn("CE clean", format="%.3f"),
            "ce_spliced": st.column_config.NumberColumn("CE spliced", format="%.3f", help="activation replaced by the SAE reconstruction"),
            "ce_zero_ablated": st.column_config.NumberColumn("CE zero-abl.", format="%.3f", help="activation replaced by zeros"),
            "ce_delta": st.column_config.NumberColumn("CE delta", format="%+.3f"),
            "ce_recovered": st.column_config.NumberColumn("CE recovered", format="%.3f", help="(zero - spliced) / (zero - clean); n/a when |zero - clean| < 1e-4"),
        },
    )
    st.caption("CE losses in nats per token, on this prompt only: a handful of tokens is noisy; the run's Overview has the sample-wide numbers.")


@st.fragment
def predictions_panel() -> None:
    """Next-token predictions at one position, clean vs spliced (reruns alone)."""
    with state.guard():
        n = prompt.n_tokens
        # bound to ?pos= (default: the last position); its value is set on every run, so a new
        # prompt's slider (new options) never keeps a stale or a reset value
        pos = urlstate.widget(
            st.select_slider, P_POS, "Predict after position", key=K_POS, default=n - 1, codec=urlstate.integer(0, n - 1), quiet=True,
            options=list(range(n)), format_func=lambda i: f"{i:d}: " + inert(render.display_token(prompt.token_labels[i])[:16]),
        )
        if pos < n - 1:
            st.caption("The actual next token is ‹" + inert(render.display_token(prompt.token_labels[pos + 1])) + "›.")
        labels = ((CLEAN, "clean"), *((spliced(s), f"spliced ({SAE_LABELS.get(s, s)})") for s in result.sae_names), (ZERO_ABLATED, "zero-ablated"))
        cols = st.columns(2)
        for col, m in zip(cols, ("base", "finetuned")):
            wide = live.predictions_table(key, kind, value, exclude, m, int(pos), labels)
            with col:
                st.markdown(f"**{render.MODEL_LABELS[m]}**")
                st.dataframe(wide, hide_index=True, width="stretch")  # token strings in cells: plain text


st.subheader("Next-token predictions: clean vs spliced")
predictions_panel()


def _continuation_html(tokens: list[str], first_diff: int | None, model: str, kind: str) -> str:
    r, g, b = render.MODEL_RGB[model]
    spans = []
    for i, t in enumerate(tokens):
        if t == "" and i + 1 < len(tokens):  # a byte piece of the character the next token completes
            continue
        changed = first_diff is not None and i >= first_diff and kind == "steered"
        style = f"background:rgba({r},{g},{b},0.35)" if changed else f"background:rgba({r},{g},{b},0.08)"
        spans.append(f'<span class="sx-tok" style="{style}">{render.escape_token(t)}</span>')
    return "".join(spans)


@st.fragment
def steering_panel() -> None:
    """Add a feature's decoder direction at the hook on both models; greedy continuations (reruns alone)."""
    with state.guard():
        st.session_state.setdefault(K_STEER_MODE, RAW)
        mode = st.radio("Steering vector", [RAW, SCALED], key=K_STEER_MODE, horizontal=True)
        if st.session_state.get(K_STEER_FID) is None or st.session_state[K_STEER_FID] >= d_sae:
            st.session_state[K_STEER_FID] = int(st.session_state.get(K_FID, 0) or 0)
        st.session_state.setdefault(K_STEER_COEF, 10.0 if mode == RAW else 4.0)
        st.session_state.setdefault(K_STEER_N, 20)
        scale, label = None, ""
        with st.form("steer_form", border=True):
            c1, c2, c3 = st.columns([1, 2, 1])
            c1.number_input(f"Feature of the {ui.sae_label(sae)}", min_value=0, max_value=d_sae - 1, step=1, key=K_STEER_FID)
            c2.slider("Coefficient", min_value=-100.0, max_value=100.0, step=0.5, key=K_STEER_COEF, help="coef x W_dec[feature] is added to the activation at the hook, at every position, on both models")
            c3.number_input("New tokens", min_value=1, max_value=64, step=1, key=K_STEER_N)
            go = st.form_submit_button("Steer", type="primary")
        fid = int(st.session_state[K_STEER_FID])
        if mode == SCALED:
            row = data.feature(run, sae, fid)
            max_act = float(row["max_act_base"]) if row and row.get("max_act_base") is not None else float("nan")
            if not (math.isfinite(max_act) and max_act > 0):
                st.info(f"Feature {fid:d} never fired on the base model in the run (max activation {ui.fmt(max_act)}), so the raw decoder direction is used.")
            else:
                scale, label = max_act, "max activation on the base model (run)"
        request = (prompt.token_ids, sae, fid, float(st.session_state[K_STEER_COEF]), int(st.session_state[K_STEER_N]), scale, label)
        if go:
            st.session_state[K_STEER_REQ] = request
        req = st.session_state.get(K_STEER_REQ)
        if not req or req[0] != prompt.token_ids or req[1] != sae:
            st.caption("Choose a feature and a coefficient, then press Steer.")
            return
        res = live.steer(key, *req)
        st.markdown("Added **" + inert(res.description) + f"** (norm {res.vector_norm:.3g}) at " + inert(result.hook) + ", every position; greedy decoding.")
        for note in res.notices:
            st.info(inert(note))
        tail = list(prompt.token_strs[-12:])
        blocks = []
        for r in res.continuations.itertuples(index=False):
            lines = []
            for kind, ids in (("unsteered", r.unsteered_ids), ("steered", r.steered_ids)):
                toks = live.token_strs(key, tuple(ids))
                prefix = "".join(f'<span class="sx-tok sx-ctrl">{render.escape_token(t)}</span>' for t in tail)
                lines.append(
                    f'<div class="sx-ex" data-probe="{kind}" data-model="{r.model}"><span class="sx-lbl">{kind}</span>'
                    f"{prefix}{_continuation_html(toks, r.first_difference, r.model, kind)}</div>"
                )
            verdict = "unchanged" if not r.changed else f"diverges at new token {r.first_difference}"
            blocks.append(f'<div class="sx-block" data-probe="steering-{r.model}"><h6>{render.escape_token(render.MODEL_LABELS[r.model])} · {verdict}</h6>{"".join(lines)}</div>')
        st.html(render.examples_html(blocks))
        ui.feature_link(run, sae, fid)


st.subheader("Steering")
st.caption("Add a feature's decoder direction to the activation at the hook on both models and compare greedy continuations with the unsteered ones.")
steering_panel()
