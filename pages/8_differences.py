"""Where the models differ: the tokens where the two models' next-token distributions differ most
(KL(base || finetuned) per token of the sample), each with the base-SAE features whose activation
changes most there, linked; and the features whose change tracks the KL over all tokens.
The source and the list's page are in the URL (`source`, `contexts_page`)."""

import streamlit as st

from explorer import figures
from explorer.render import inert
from webapp import data, state, ui

run = state.run_picker()
st.title("Where the models differ")

PAGE_SIZE = 10
PAGE = "contexts_page"

with state.guard():
    source = state.source_picker(run, "differences_source", resets=(PAGE,))
    state.set_params(feature=None)  # a feature id means nothing on this page: not in its links
    st.caption(
        "For every token of the sample both models predict the next token; KL(p_base ‖ p_finetuned) says how differently (nats). "
        "A position counts when its token does (special tokens such as BOS do not). Below, the contexts with the highest KL"
        + (" among the " + inert(source) + " sequences" if source else "")
        + ": each window ends with the token being predicted, the outlined token is where the prediction is made, and the shading is the KL "
        "of the prediction made at each token. Next to it, the base SAE features whose activation changes most at that token "
        "(|f(x_finetuned) − f(x_base)|)."
    )

    @state.fragment
    def contexts() -> None:
        _, n = data.kl_contexts(run, 1, 0, source)
        st.markdown(f"**{n:,}** contexts kept (the run's `[diffing] n_top_kl_contexts` highest)")
        offset = ui.pager(PAGE, n, PAGE_SIZE)
        df, _ = data.kl_contexts(run, PAGE_SIZE, offset, source)
        blocks = ui.kl_context_blocks(run, PAGE_SIZE, offset, source)
        for r, block in zip(df.itertuples(index=False), blocks):
            with st.container(border=True):
                c1, c2 = st.columns([3, 2])
                with c1:
                    st.html(block)
                with c2:
                    for fid, delta, a, b in list(zip(r.feature_ids, r.act_deltas, r.acts_base, r.acts_finetuned))[:5]:
                        ui.feature_link(run, "base_sae", int(fid), label=f"feature {int(fid)}: {float(a):.3g} → {float(b):.3g} (Δ {float(delta):+.3g})")

    contexts()

    st.subheader("Features tied to where the models differ")
    st.caption("Base SAE features ranked by the correlation over tokens of |Δf_i| with the KL: high when the feature changes most where the predictions differ most.")
    df, _ = data.changed_most(run, "base_sae", "kl_corr", PAGE_SIZE, 0, source)
    if df.empty:
        st.caption("None.")
    for r in df.itertuples(index=False):
        ui.feature_link(run, "base_sae", int(r.feature_id), label=f"feature {int(r.feature_id)} · corr. {ui.fmt(r.kl_corr, '.3f')} · density {ui.density(r.density_base)} → {ui.density(r.density_finetuned)}")
    st.caption(inert(figures.SAE_LABELS["base_sae"].capitalize() + "; the correlation is over all tokens of the sample (pooled over sources)."))
