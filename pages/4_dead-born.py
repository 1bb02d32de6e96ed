"""Dead & born: died/woke features of the base SAE across the two models, and born/lost features
between the two SAEs at an adjustable match threshold. Every row links to its feature page and
shows its top example inline. The threshold and each list's page are in the URL
(`threshold`, `died_page`, `woke_page`, `born_page`, `lost_page`)."""

import streamlit as st

from explorer import figures, render
from explorer.render import inert
from webapp import data, state, ui, urlstate

run = state.run_picker()
st.title("Dead & born")

PAGE_SIZE = 10


def feature_rows(df, sae: str, example_model: str, note) -> None:
    """One row per feature: link, numbers, and its top example on `example_model`."""
    if df.empty:
        st.caption("None.")
        return
    by_fid = ui.inline_examples(run, sae, tuple(int(x) for x in df["feature_id"]), example_model)
    for r in df.itertuples(index=False):
        fid = int(r.feature_id)
        with st.container(border=True):  # three elements a row: 40 rows a page are ~120 messages, not ~300
            ui.feature_link(run, sae, fid, label=f"feature {fid} · {note(r)}")
            block = by_fid.get(fid)
            if block is None:
                st.caption(f"No top example on the {render.MODEL_LABELS[example_model]}.")
            else:
                st.html(block)


def class_list(cross_class: str, title: str, explain: str, example_model: str) -> None:
    @state.fragment
    def body() -> None:
        st.markdown("#### " + inert(title))
        st.caption(inert(explain))
        n = data.cross_class_counts(run, "base_sae").get(cross_class, 0)
        st.markdown(f"**{n:,}** features")
        offset = ui.pager(f"{cross_class}_page", n, PAGE_SIZE)
        df, _ = data.class_page(run, "base_sae", cross_class, PAGE_SIZE, offset)
        live = "base" if cross_class == "died" else "finetuned"
        feature_rows(df, "base_sae", example_model, lambda r: f"density on {live}: {ui.density(getattr(r, f'density_{live}'))} · max act {ui.fmt(getattr(r, f'max_act_{live}'))}")

    body()


with state.guard():
    ui.legend()
    st.subheader("Died and woke: the base SAE on both models")
    st.caption("Pairing by identity: feature i of the base SAE, encoded from each model's activations on the same tokens.")
    c1, c2 = st.columns(2)
    with c1:
        class_list("died", "Died", "Alive on the base model, never fires on the finetuned model. Top example on base.", "base")
    with c2:
        class_list("woke", "Woke", "Never fires on the base model, alive on the finetuned model. Top example on finetuned.", "finetuned")

    st.subheader("Born and lost: base SAE vs finetuned SAE")
    if "finetuned_sae" not in run.saes:
        st.info("This run has only the base SAE. Born and lost features need a second SAE trained on the finetuned model (add `[saes.finetuned_sae]` to the precompute config).")
        st.stop()
    thresholds = run.config.get("thresholds") or {}
    default_thr = min(1.0, max(0.0, ui.num(thresholds.get("match") if isinstance(thresholds, dict) else None, 0.5)))

    @state.fragment
    def born_lost() -> None:
        thr = urlstate.widget(
            st.slider, "threshold", "Match threshold (combined score)", 0.0, 1.0, key="match_threshold", default=default_thr, codec=urlstate.number(0.0, 1.0),
            resets=("born_page", "lost_page"), step=0.01,
            help="A feature whose best match in the other SAE scores below this is born (finetuned SAE) or lost (base SAE). "
            "Score = 0.5 × activation correlation (n/a as 0) + 0.5 × decoder cosine. Dead features are not counted.",
        )
        counts = data.born_lost_counts(run, thr)
        c1, c2 = st.columns(2)
        for col, which, sae, model, text in (
            (c1, "born", "finetuned_sae", "finetuned", "Features of the finetuned SAE (alive on the finetuned model) with no match in the base SAE. Top example on finetuned."),
            (c2, "lost", "base_sae", "base", "Features of the base SAE (alive on the base model) with no match in the finetuned SAE. Top example on base."),
        ):
            with col:
                st.markdown("#### " + inert(which.capitalize()))
                st.caption(inert(text))
                st.markdown(f"**{counts[which]:,}** features at threshold {thr:.2f}")
                offset = ui.pager(f"{which}_page", counts[which], PAGE_SIZE)
                df, _ = data.born_lost_page(run, which, thr, PAGE_SIZE, offset)
                other = "base_sae" if sae == "finetuned_sae" else "finetuned_sae"
                feature_rows(
                    df, sae, model,
                    lambda r: f"best match: {figures.SAE_LABELS[other]} feature {ui.fmt(r.match_feature_id, 'd') if r.match_feature_id == r.match_feature_id else 'none'}, score {ui.fmt(r.match_score, '.3f')}",
                )

    born_lost()
