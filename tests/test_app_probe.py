"""AppTest of the Live probe page (pages/6_live_probe.py) on a run whose config names the tiny demo pair.

The run's tables are synthetic (explorer.synthetic, 64 features, vocab 512, like the tiny demo);
its manifest's config points at the tiny demo models and SAEs, so the page runs them live.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_probe_run, md_text
from streamlit.testing.v1 import AppTest

from explorer.synthetic import make_run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PAGE = "pages/6_live_probe.py"


@pytest.fixture(scope="module")
def probe_runs(tiny_demo, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("probe_runs")
    make_probe_run(root / "probe", tiny_demo)
    make_run(root / "nomodels", n_features=64)  # its config names models that do not exist
    return root


def _open(monkeypatch, runs: Path, **params) -> AppTest:
    monkeypatch.setenv("SAE_EXPLORER_RUNS_DIR", str(runs))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=240)
    for k, v in {"run": "probe", **params}.items():
        at.query_params[k] = v
    at.run()
    at.switch_page(PAGE)
    at.run()
    return at


def _html(at: AppTest) -> str:
    return "".join(str(e.proto.body) for e in at.get("html"))


def test_probe_page_renders_its_panels(monkeypatch, probe_runs):
    at = _open(monkeypatch, probe_runs)
    assert not at.exception
    assert [t.value for t in at.title] == ["Live probe"]
    heads = [h.value for h in at.subheader]
    for want in ("The chosen feature on both models", "Top features per token", "Features that differ most between the models", "Reconstruction on this prompt", "Next-token predictions: clean vs spliced", "Steering"):
        assert want in heads
    assert not at.error
    body = _html(at)
    assert 'data-probe="feature-acts"' in body and 'data-model="base"' in body and 'data-model="finetuned"' in body
    assert "<script" not in body.replace("&lt;script", "")
    # reconstruction table: one row per (SAE, model)
    rec = next(df.value for df in at.dataframe if "ce_spliced" in df.value.columns)
    assert len(rec) == 4 and rec["ce_clean"].notna().all()
    assert [b.label for b in at.button] == ["Run probe", "Steer"]


def test_empty_prompt_gets_a_friendly_message(monkeypatch, probe_runs):
    at = _open(monkeypatch, probe_runs)
    at.text_area(key="probe_text").set_value("   \n ")
    at.button[0].click().run()
    assert not at.exception
    assert any("empty" in md_text(w.value) for w in at.warning)
    assert "Top features per token" not in [h.value for h in at.subheader]


def test_long_and_odd_prompt_gets_notices(monkeypatch, probe_runs):
    at = _open(monkeypatch, probe_runs)
    at.text_area(key="probe_text").set_value("<script>alert(1)</script> \u202e\x07 😀 שלום " * 40)
    at.button[0].click().run()
    assert not at.exception
    notes = md_text(" ".join(x.value for x in list(at.warning) + list(at.info)))
    assert "context" in notes and "control characters" in notes and "right-to-left" in notes
    body = _html(at)
    assert "<script" not in body and "&lt;" in body  # every token escaped (tokens split "<script>")


def test_corpus_sequence_can_be_probed(monkeypatch, probe_runs):
    at = _open(monkeypatch, probe_runs)
    at.radio(key="probe_source").set_value("Pick from the corpus").run()
    assert at.selectbox(key="probe_seq").value == 0
    at.selectbox(key="probe_seq").set_value(3)
    at.button[0].click().run()
    assert not at.exception and not at.error
    assert any("32 tokens" in c.value for c in at.caption)


def test_feature_query_param_and_steering(monkeypatch, probe_runs):
    at = _open(monkeypatch, probe_runs, sae="finetuned_sae", feature="7")
    assert at.number_input(key="probe_feature").value == 7
    assert at.selectbox(key="probe_sae").value == "finetuned_sae"
    at.slider(key="steer_coef").set_value(100.0)
    at.button[1].click().run()
    assert not at.exception
    body = _html(at)
    for m in ("base", "finetuned"):
        assert f'data-probe="steering-{m}"' in body
    assert body.count('data-probe="steered"') == 2 and body.count('data-probe="unsteered"') == 2
    assert any("W_dec[7]" in md_text(md.value) for md in at.markdown)


@pytest.mark.parametrize("bad", ["abc", "-3", "99999", "1e3"])
def test_bad_feature_param_is_a_friendly_error(monkeypatch, probe_runs, bad):
    at = _open(monkeypatch, probe_runs, feature=bad)
    assert not at.exception
    assert at.error and "eature" in at.error[0].value
    assert "Top features per token" in [h.value for h in at.subheader]  # the rest of the page still works


def test_run_without_loadable_models_is_a_friendly_error(monkeypatch, probe_runs):
    at = _open(monkeypatch, probe_runs)
    at.switch_page(PAGE)
    at.query_params["run"] = "nomodels"
    at.run()
    assert not at.exception
    assert at.error and "cannot load" in at.error[0].value


def test_feature_selection_writes_the_deep_link(monkeypatch, probe_runs):
    at = _open(monkeypatch, probe_runs)
    at.number_input(key="probe_feature").set_value(5).run()
    assert not at.exception
    assert at.query_params["feature"] in ("5", ["5"])
    labels = [str(p.proto.label) for p in at.get("page_link")]
    assert any("feature 5" in label for label in labels)
    at.selectbox(key="probe_sae").set_value("finetuned_sae").run()
    assert not at.exception
    assert "feature" not in at.query_params  # a feature id of one SAE means nothing in the other


def test_probe_page_on_the_shipped_demo_run(monkeypatch):
    """The shipped run (data/runs/demo) over the shipped demo pair: a deep link, a corpus sequence, steering."""
    if not (REPO / "data" / "runs" / "demo" / "manifest.json").exists():
        pytest.fail("data/runs/demo is missing: the demo run ships with the repository")
    monkeypatch.delenv("SAE_EXPLORER_RUNS_DIR", raising=False)
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=240)
    at.query_params.update({"run": "demo", "sae": "base_sae", "feature": "12"})
    at.run()
    at.switch_page(PAGE)
    at.run()
    assert not at.exception and not at.error
    assert at.number_input(key="probe_feature").value == 12
    rec = next(df.value for df in at.dataframe if "ce_spliced" in df.value.columns)
    assert len(rec) == 4 and (rec["ce_zero_ablated"] > rec["ce_clean"]).all()  # zero-ablating the residual hurts
    at.radio(key="probe_source").set_value("Pick from the corpus").run()
    at.button[0].click().run()
    assert not at.exception and not at.error
    assert any("128 tokens" in c.value for c in at.caption)
    at.button[1].click().run()
    assert not at.exception
    assert _html(at).count('data-probe="steered"') == 2


def _n_tokens(at: AppTest) -> int:
    import re

    cap = next(c.value for c in at.caption if " tokens · hook" in c.value)
    return int(re.match(r"(\d+) tokens", cap).group(1))


def test_prediction_position_follows_a_longer_prompt(monkeypatch, probe_runs):
    """A short prompt, then a longer one: "Predict after position" is the new prompt's last
    position (it jumped to 0, the BOS token, and stayed there for later prompts)."""
    at = _open(monkeypatch, probe_runs)
    lengths = []
    for words in (3, 12, 20, 5):
        at.text_area(key="probe_text").set_value(" ".join(["the cat"] * words))
        at.button[0].click().run()
        assert not at.exception
        n = _n_tokens(at)
        lengths.append(n)
        assert at.select_slider(key="probe_position").value == n - 1, (words, n)
    assert len(set(lengths)) >= 3  # the prompts really had different lengths
    # a chosen position goes to the URL, and a new prompt starts again at its last position
    at.select_slider(key="probe_position").set_value(2).run()
    assert at.query_params["pos"] in ("2", ["2"])
    assert any("The actual next token is" in c.value for c in at.caption)
    at.text_area(key="probe_text").set_value("one two three four five six")
    at.button[0].click().run()
    assert "pos" not in at.query_params and at.select_slider(key="probe_position").value == _n_tokens(at) - 1


def test_probe_selection_in_the_url(monkeypatch, probe_runs):
    """The prompt (when short), the feature and the position come from the URL, and go back to it."""
    at = _open(monkeypatch, probe_runs, prompt="def f(x): return x + 1", feature="9", pos="3", sae="finetuned_sae")
    assert not at.exception and not at.error
    assert at.text_area(key="probe_text").value == "def f(x): return x + 1"
    assert at.number_input(key="probe_feature").value == 9 and at.selectbox(key="probe_sae").value == "finetuned_sae"
    assert at.select_slider(key="probe_position").value == 3
    at.text_area(key="probe_text").set_value("import os")
    at.button[0].click().run()
    assert at.query_params["prompt"] in ("import os", ["import os"])
    # a corpus sequence is named by its id; special tokens counted: exclude_special=0
    at.radio(key="probe_source").set_value("Pick from the corpus").run()
    at.selectbox(key="probe_seq").set_value(4)
    at.checkbox(key="probe_exclude_special").uncheck()
    at.button[0].click().run()
    q = {k: v if isinstance(v, str) else v[0] for k, v in at.query_params.items()}
    assert q["seq"] == "4" and "prompt" not in q and q["exclude_special"] == "0"
    again = _open(monkeypatch, probe_runs, **q)
    assert again.radio(key="probe_source").value == "Pick from the corpus" and again.selectbox(key="probe_seq").value == 4
    assert again.checkbox(key="probe_exclude_special").value is False
    # a long prompt stays in the session, and the page says the link cannot hold it
    at.radio(key="probe_source").set_value("Type a prompt").run()
    at.text_area(key="probe_text").set_value("word " * 150)
    at.button[0].click().run()
    assert "prompt" not in at.query_params and "seq" not in at.query_params
    assert any("too long" in c.value or "links keep prompts" in c.value for c in at.caption)


def test_top_features_per_token_link_to_feature_pages(monkeypatch, probe_runs):
    at = _open(monkeypatch, probe_runs, sae="base_sae")
    df = next(d for d in at.dataframe if "base #1" in d.value.columns)
    links = df.value["base #1"].dropna().tolist()
    assert links and all(l.startswith("/feature?run=probe&sae=base_sae&feature=") for l in links)
    import json as _json

    cfg = _json.loads(df.proto.columns)
    assert cfg["base #1"]["type_config"]["type"] == "link"


def test_feature_page_links_to_the_probe_with_the_feature(monkeypatch, probe_runs):
    monkeypatch.setenv("SAE_EXPLORER_RUNS_DIR", str(probe_runs))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=240)
    at.query_params.update({"run": "probe", "sae": "finetuned_sae", "feature": "6"})
    at.run()
    at.switch_page("pages/3_feature.py")
    at.run()
    link = next(l for l in at.get("page_link") if "Probe and steer" in l.proto.label)
    assert "feature=6" in link.proto.query_string and "sae=finetuned_sae" in link.proto.query_string
    at.switch_page(PAGE)
    at.run()  # where the link goes: the probe with that feature, and steering preset to it
    assert at.number_input(key="probe_feature").value == 6 and at.number_input(key="steer_feature").value == 6
