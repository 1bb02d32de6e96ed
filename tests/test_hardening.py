"""Bad input (issue 6): the 12 classes, each through the surfaces where a researcher can cause it
(the CLI, the store / library, the app), each answered with a message that names the problem and
the fix, no traceback, the app still up, and nothing half-written.

Already covered elsewhere (referenced, not repeated):
  1  empty prompt            test_probe.py::test_empty_prompt_is_a_clear_error, test_app_probe.py::test_empty_prompt_gets_a_friendly_message
  2  100k prompt             test_probe.py::test_huge_prompt_is_cut_before_tokenizing
  3  odd characters          test_probe.py::test_odd_characters_are_probed_with_a_notice, test_app_probe.py::test_long_and_odd_prompt_gets_notices
  4  feature id in the URL   test_app.py::test_feature_page_bad_feature_param, test_app_probe.py::test_bad_feature_param_is_a_friendly_error, test_browser.py::test_bad_params_in_the_browser
  5  unknown run / SAE       test_app.py::test_bad_runs_get_a_friendly_message, ::test_unknown_sae_falls_back_with_a_warning
  6  no manifest / complete  test_rundir.py::test_missing_run_and_missing_manifest, ::test_incomplete_flag_and_other_schema_version, test_app.py (partial, incomplete)
  7  truncated / corrupted   test_rundir.py::test_truncated_and_corrupted_files, test_app.py (damaged)
  8  schema version          test_rundir.py, test_app.py (oldschema)
  9  config keys / types     test_precompute_errors.py (unknown key, unknown table, wrong type, ...)
  10 d_in / hook             test_precompute_errors.py, test_models.py::test_hook_not_in_model, ::test_sae_width_mismatch
  11 tokenizers              test_precompute_errors.py, test_models.py::test_tokenizer_mismatch
  12 NaN / inf               (new here)
Added here: the cross-surface cases that were missing (the probe page for 1-3 with lone
surrogates and 100k characters; the CLI for 5-8; the app's probe page for 9-11 through a run's
manifest; NaN/inf through the CLI, the app and the probe).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from streamlit.testing.v1 import AppTest

from explorer import rundir, schema
from explorer.errors import ExplorerError, RunError
from explorer.synthetic import make_run
from precompute.__main__ import main as cli
from tests.bad_artifacts import write_narrow_sae, write_renumbered_tokenizer_model
from tests.helpers import md_text
from tests.test_precompute import tiny_config_text, write_tiny_corpus

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
PROBE_PAGE = "pages/6_live_probe.py"
LONE_SURROGATES = "a\ud800b \udfff c \ud83d"  # invalid UTF-16: no tokenizer or protobuf accepts them


# ---------------------------------------------------------------- fixtures


def _nan_token(tiny_demo: Path, corpus: Path) -> int:
    """A non-BOS token in some but not all sequences of the corpus: NaN from there on in those only."""
    seqs = pq.read_table(corpus).column("token_ids").to_pylist()
    bos = seqs[0][0]
    counts: dict[int, int] = {}
    for s in seqs:
        for t in set(s[1:]) - {bos}:
            counts[t] = counts.get(t, 0) + 1
    return min((t for t, n in counts.items() if len(seqs) // 10 <= n <= len(seqs) // 3), key=lambda t: (abs(counts[t] - len(seqs) // 6), t))


def _probe_run(root: Path, name: str, models: dict, saes: dict, hook: str | None = "blocks.1.hook_resid_pre") -> Path:
    out = make_run(root / name, n_features=64, n_vocab=512, context=32)
    manifest = json.loads((out / schema.MANIFEST).read_text())
    manifest["config"]["models"] = models
    manifest["config"]["saes"] = saes
    manifest["config"]["hook"] = hook
    manifest.pop("schema_version")
    rundir.write_manifest(out, manifest)
    return out


@pytest.fixture(scope="module")
def world(tiny_demo, tmp_path_factory):
    d = tmp_path_factory.mktemp("hardening")
    corpus = write_tiny_corpus(tiny_demo, d / "corpus.parquet")
    # a copy of the tiny pair whose base model turns one (non-BOS) token's embedding into NaN and
    # another's into inf: activations are NaN on the tokens at and after them, in some sequences only
    from safetensors.torch import load_file, save_file

    nan_pair = d / "nan_pair"
    shutil.copytree(tiny_demo, nan_pair)
    tok = _nan_token(tiny_demo, corpus)
    w = load_file(str(nan_pair / "base" / "model.safetensors"))
    w["embed.W_E"][tok] = float("nan")
    save_file(w, str(nan_pair / "base" / "model.safetensors"))
    # an SAE whose d_in is not the width; a finetune with a differently numbered tokenizer
    write_narrow_sae(tiny_demo, d / "narrow_sae")
    other = write_renumbered_tokenizer_model(tiny_demo, d / "other_tok")

    runs = d / "runs"
    good_models = {m: {"path": str(tiny_demo / m)} for m in ("base", "finetuned")}
    good_saes = {s: {"path": str(tiny_demo / "saes" / s)} for s in ("base_sae", "finetuned_sae")}
    _probe_run(runs, "good", good_models, good_saes)
    _probe_run(runs, "nanprobe", {m: {"path": str(nan_pair / m)} for m in ("base", "finetuned")}, {s: {"path": str(nan_pair / "saes" / s)} for s in ("base_sae", "finetuned_sae")})
    _probe_run(runs, "narrow", good_models, {**good_saes, "finetuned_sae": {"path": str(d / "narrow_sae")}})
    _probe_run(runs, "nohook", good_models, good_saes, hook="blocks.9.hook_resid_pre")
    _probe_run(runs, "othertok", {**good_models, "finetuned": {"path": str(other)}}, good_saes)
    _probe_run(runs, "wrongtype", {**good_models, "base": "a string, not a spec"}, good_saes)
    _probe_run(runs, "unknownkey", {**good_models, "base": {"path": str(tiny_demo / "base"), "colour": "red"}}, good_saes)
    _probe_run(runs, "badtype2", {**good_models, "base": {"path": 42}}, good_saes)
    return {"demo": tiny_demo, "dir": d, "corpus": corpus, "nan_pair": nan_pair, "nan_token": tok, "runs": runs}


def _probe_app(monkeypatch, runs: Path, run: str, **params) -> AppTest:
    monkeypatch.setenv("SAE_EXPLORER_RUNS_DIR", str(runs))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=240)
    for k, v in {"run": run, **params}.items():
        at.query_params[k] = v
    at.run()
    at.switch_page(PROBE_PAGE)
    at.run()
    return at


def _no_traceback(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    for el in list(at.error) + list(at.warning) + list(at.info) + list(at.markdown):
        assert "Traceback" not in str(el.value)


def _html(at: AppTest) -> str:
    return "".join(str(e.proto.body) for e in at.get("html"))


# ---------------------------------------------------------------- 1-3 prompts: library and app


PROMPTS = {
    "empty": ("", "empty"),
    "whitespace only": (" \n\t ", "empty"),
    "100k characters": ("def f(x):\n    return x + 1\n" * 4000, "context"),
    "controls, emoji, rtl": ("a\x00b\x07c\x1b[31m 😀👩‍💻 שלום עולם \u202eevil\u202c", "control characters"),
    "lone surrogates": (LONE_SURROGATES, "surrogates"),
}


@pytest.mark.parametrize("case", list(PROMPTS))
def test_prompt_classes_in_the_library(world, case):
    from explorer import probe as P

    pair = _pair(world["demo"])
    text, expect = PROMPTS[case]
    if expect == "empty":
        with pytest.raises(ExplorerError, match="empty"):
            P.prepare_prompt(pair, text)
        return
    prompt = P.prepare_prompt(pair, text)
    assert expect in " ".join(prompt.notices)
    assert 1 < len(prompt.token_ids) <= pair.base.cfg.n_ctx
    result = P.probe(pair, prompt)
    for m in ("base", "finetuned"):
        acts = result.feature_acts[("base_sae", m)]
        assert acts.shape[0] == len(prompt.token_ids) and np.isfinite(acts).all()


_PAIRS: dict = {}


def _pair(demo: Path):
    if demo not in _PAIRS:
        from explorer.models import ModelSpec, SAESpec, load_pair

        _PAIRS[demo] = load_pair(
            ModelSpec(path=str(demo / "base")), ModelSpec(path=str(demo / "finetuned")),
            SAESpec(path=str(demo / "saes" / "base_sae")), SAESpec(path=str(demo / "saes" / "finetuned_sae")),
        )
    return _PAIRS[demo]


@pytest.mark.parametrize("case", list(PROMPTS))
def test_prompt_classes_in_the_app(world, monkeypatch, case):
    text, expect = PROMPTS[case]
    if case == "lone surrogates":
        # a browser cannot send them: its UTF-8 encoder (and AppTest's protobuf) turns each into
        # U+FFFD before the server sees the text; the library handles raw ones (test above)
        text, expect = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace"), "context"
        text = text + " x" * 40  # long enough to get a notice we can check
    at = _probe_app(monkeypatch, world["runs"], "good")
    _no_traceback(at)
    at.text_area(key="probe_text").set_value(text)
    at.button[0].click().run()
    _no_traceback(at)
    shown = md_text(" ".join(x.value for x in list(at.warning) + list(at.info) + list(at.error)))
    assert expect in shown, shown
    if expect == "empty":
        assert "Top features per token" not in [h.value for h in at.subheader]
    else:
        assert 'data-probe="feature-acts"' in _html(at)
    # the app is still up: the next prompt works
    at.text_area(key="probe_text").set_value("def f(x): return x")
    at.button[0].click().run()
    _no_traceback(at)
    assert 'data-probe="feature-acts"' in _html(at)


# ---------------------------------------------------------------- 4 feature ids


@pytest.mark.parametrize(
    "raw,message",
    [("abc", "not a feature number"), ("-1", "negative"), ("64", "out of range"), ("1" * 400, "out of range"),
     ("１２", "not a feature number"), ("0x10", "not a feature number"), ("nan", "not a feature number"), ("\u202e7", "not a feature number")],
)
def test_feature_ids_from_the_url(raw, message):
    from webapp.state import QueryParamError, parse_feature_id

    with pytest.raises(QueryParamError, match=message) as info:
        parse_feature_id(raw, 64)
    assert len(str(info.value)) < 300  # a huge value is clipped in the message
    assert parse_feature_id("+0063", 64) == 63 and parse_feature_id("-0", 64) == 0 and parse_feature_id(" 5 ", 64) == 5


@pytest.mark.parametrize("raw", ["abc", "-3", "99999999999999999999999999999", "<img src=x onerror=alert(1)>"])
def test_feature_ids_on_the_probe_page_and_the_library(world, monkeypatch, raw):
    from explorer import probe as P

    at = _probe_app(monkeypatch, world["runs"], "good", feature=raw, sae="base_sae")
    _no_traceback(at)
    assert at.error and "Traceback" not in at.error[0].value
    with pytest.raises(ExplorerError):
        P.steer(_pair(world["demo"]), P.prepare_prompt(_pair(world["demo"]), "hi there"), sae="base_sae", feature_id=raw, coef=1.0, n_new_tokens=2)


# ---------------------------------------------------------------- 5-8 runs: CLI and store


def _broken_runs(root: Path) -> dict[str, Path]:
    runs = {}
    runs["nomanifest"] = make_run(root / "nomanifest", n_features=8, seed=1)
    (runs["nomanifest"] / schema.MANIFEST).unlink()
    for name, mutate in {
        "incomplete": lambda m: m.update(complete=False),
        "schema": lambda m: m.update(schema_version=99),
    }.items():
        runs[name] = make_run(root / name, n_features=8, seed=2)
        m = json.loads((runs[name] / schema.MANIFEST).read_text())
        mutate(m)
        (runs[name] / schema.MANIFEST).write_text(json.dumps(m))
    runs["truncated"] = make_run(root / "truncated", n_features=8, seed=3)
    p = runs["truncated"] / "examples.parquet"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    runs["corrupted"] = make_run(root / "corrupted", n_features=8, seed=4)
    p = runs["corrupted"] / "features.parquet"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF  # same size, other bytes: only the sha256 notices
    p.write_bytes(bytes(b))
    return runs


@pytest.mark.parametrize(
    "name,message",
    [("nomanifest", "is incomplete"), ("incomplete", "marked incomplete"), ("schema", "schema version 99"),
     ("truncated", "truncated or overwritten"), ("corrupted", "sha256"), ("unknown", "no run")],
)
def test_broken_runs_in_the_store_and_the_cli(tmp_path, capsys, name, message):
    runs = _broken_runs(tmp_path / "runs")
    before = {p: p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    with pytest.raises(RunError, match=message):
        rundir.open_run(tmp_path / "runs" / name)
    # the store's entry point used by the app (webapp.data -> explorer.store) goes through open_run;
    # the CLI's merge of such a run id refuses with a clear message, exit 2, no traceback
    assert cli(["merge", name, "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and name in err
    after = {p: p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing deleted


def test_cli_refuses_to_overwrite_a_run_of_another_schema_or_damaged(world, tmp_path, capsys):
    """A config whose run id names a damaged / other-schema run: refused, the files left as they are."""
    runs = tmp_path / "runs"
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config_text(world["demo"], world["corpus"], run_id="corrupted", n_seq=16))
    _broken_runs(runs)
    before = {p: p.read_bytes() for p in (runs / "corrupted").rglob("*") if p.is_file()}
    rc = cli(["run", "--config", str(cfg), "--runs-dir", str(runs), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in (runs / "corrupted").rglob("*") if p.is_file()} == before


def test_corrupted_corpus_in_the_cli(world, tmp_path, capsys):
    bad = tmp_path / "corpus.parquet"
    data = world["corpus"].read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config_text(world["demo"], bad, run_id="badcorpus", n_seq=16))
    rc = cli(["run", "--config", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err
    assert str(bad) in err or "corpus" in err.lower()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ---------------------------------------------------------------- 9-11 a run's config through the app


@pytest.mark.parametrize(
    "run,message",
    [
        ("wrongtype", "spec"),
        ("unknownkey", "colour"),
        ("badtype2", "path"),
        ("narrow", "d_in=16"),
        ("nohook", "blocks.9.hook_resid_pre"),
        ("othertok", "tokenizers do not match"),
    ],
)
def test_bad_run_configs_on_the_probe_page(world, monkeypatch, run, message):
    at = _probe_app(monkeypatch, world["runs"], run)
    _no_traceback(at)
    errors = [md_text(e.value) for e in at.error]
    assert len(errors) >= 1 and any(message in e for e in errors), errors
    # and the other pages of the same run still work (its tables are fine)
    at.switch_page("pages/1_overview.py")
    at.run()
    _no_traceback(at)
    assert not at.error


# ---------------------------------------------------------------- 12 NaN / inf


def test_nan_activations_precompute_counts_and_completes(world, tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "nan.toml"
    cfg.write_text(tiny_config_text(world["nan_pair"], world["corpus"], run_id="nanrun"))
    runs = tmp_path / "runs"
    assert cli(["run", "--config", str(cfg), "--runs-dir", str(runs), "--no-progress"]) == 0, capsys.readouterr().err
    man = rundir.open_run(runs / "nanrun")
    metrics = pd.read_parquet(runs / "nanrun" / "metrics.parquet")
    # reference: which tokens of the sample are non-finite on the base model (a naive forward pass)
    import torch

    from explorer.models import ModelSpec, load_model

    model = load_model(ModelSpec(path=str(world["nan_pair"] / "base")))
    tokens = pd.read_parquet(runs / "nanrun" / "tokens.parquet")
    ids = torch.tensor(np.stack(tokens["token_ids"].to_numpy()) if "token_ids" in tokens else np.stack(tokens.iloc[:, -1].to_numpy()))
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=man["config"]["hook"])
    x = cache[man["config"]["hook"]]
    n_bad = int((~torch.isfinite(x).all(-1)).sum())
    assert 0 < n_bad < x.shape[0] * x.shape[1]  # some tokens, not all
    base_rows = metrics[metrics.model == "base"]
    fin_rows = metrics[metrics.model == "finetuned"]
    # counted, not silently dropped: the CE of every non-finite token is counted as such
    assert (base_rows.n_nonfinite_clean > 0).all() and (fin_rows.n_nonfinite_clean == 0).all()
    assert sum(man["summary"]["explained_variance_nonfinite"][k] for k in man["summary"]["explained_variance_nonfinite"] if "/base/" in k) > 0
    assert np.isfinite(fin_rows.explained_variance).all()
    # non-finite residual comparisons are counted as clipped, never binned as the lowest value
    hist = pd.read_parquet(runs / "nanrun" / "resid_histograms.parquet")
    assert len(hist) > 0
    # the app shows the run without an exception
    monkeypatch.setenv("SAE_EXPLORER_RUNS_DIR", str(runs))
    for page in ("pages/1_overview.py", "pages/2_features.py", "pages/4_dead-born.py", "pages/5_similarity.py"):
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
        at.query_params["run"] = "nanrun"
        at.run()
        at.switch_page(page)
        at.run()
        _no_traceback(at)


def test_nan_activations_in_the_probe(world, monkeypatch):
    from explorer import probe as P

    from explorer.models import ModelSpec, SAESpec, load_pair

    nan = world["nan_pair"]
    pair = load_pair(ModelSpec(path=str(nan / "base")), ModelSpec(path=str(nan / "finetuned")), SAESpec(path=str(nan / "saes" / "base_sae")), SAESpec(path=str(nan / "saes" / "finetuned_sae")))
    tok = world["nan_token"]
    ids = [pair.base.tokenizer.bos_token_id or 0, 5, 6, tok, 7, 8]
    result = P.probe(pair, P.prepare_token_ids(pair, ids))
    x = result.hook_acts["base"]
    n_bad = int((~np.isfinite(x).all(axis=1)).sum())
    # attention spreads the NaN over the sequence (0 * NaN in pattern @ V), so every token is hit
    assert n_bad == len(ids) and np.isfinite(result.hook_acts["finetuned"]).all()
    clean = P.probe(pair, P.prepare_token_ids(pair, [i for i in ids if i != tok]))
    assert np.isfinite(clean.hook_acts["base"]).all() and not any("not finite" in n for n in clean.notices)
    assert any(f"not finite (NaN or inf) on {n_bad} of {len(ids)} tokens" in n and "base model" in n for n in result.notices)
    assert not any("finetuned model's activations" in n for n in result.notices)
    # through the app: a clear note, no crash
    text = pair.base.tokenizer.decode([5, 6, tok, 7, 8])
    at = _probe_app(monkeypatch, world["runs"], "nanprobe")
    _no_traceback(at)
    at.text_area(key="probe_text").set_value(text)
    at.button[0].click().run()
    _no_traceback(at)
    notes = md_text(" ".join(x.value for x in list(at.warning) + list(at.info)))
    assert "not finite (NaN or inf)" in notes, notes
    assert 'data-probe="feature-acts"' in _html(at)


# ---------------------------------------------------------------- live inference shared between sessions


def test_shared_live_pair_under_concurrency_equals_single_session(world):
    """The app's path (webapp.live: one st.cache_resource pair for every session, st.cache_data
    results) driven from many threads at once gives what one session alone gets; the library-level
    variant is tests/test_probe.py::test_concurrent_calls_equal_sequential."""
    from concurrent.futures import ThreadPoolExecutor

    from explorer import probe as P
    from webapp import live

    manifest = json.loads((world["runs"] / "good" / schema.MANIFEST).read_text())
    key = live.pair_key(manifest)
    live.probe.clear()
    live.steer.clear()
    prompts = [f"def f{i}(x):\n    return x * {i} + 1" if i % 2 else f"The {i} cats sat on mat number {i}." for i in range(10)]
    ref_pair = _pair(world["demo"])  # a separately loaded pair: the single-session reference

    def single(p: str):
        r = P.probe(ref_pair, P.prepare_prompt(ref_pair, p))
        s = P.steer(ref_pair, r.prompt, sae="base_sae", feature_id=3, coef=20.0, n_new_tokens=5)
        return r, s

    def shared(p: str):
        r = live.probe(key, "text", p)
        s = live.steer(key, r.prompt.token_ids, "base_sae", 3, 20.0, 5)
        return r, s

    want = [single(p) for p in prompts]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(shared, prompts * 2))
    assert len({id(live.get_pair(key))}) == 1
    for i, (r, s) in enumerate(got):
        wr, ws = want[i % len(prompts)]
        assert r.prompt.token_ids == wr.prompt.token_ids
        for k in wr.feature_acts:
            np.testing.assert_allclose(r.feature_acts[k], wr.feature_acts[k], rtol=1e-5, atol=1e-6)
        pd.testing.assert_frame_equal(r.reconstruction, wr.reconstruction, rtol=1e-5, atol=1e-7)
        assert s.continuations[["steered_ids", "unsteered_ids"]].to_numpy().tolist() == ws.continuations[["steered_ids", "unsteered_ids"]].to_numpy().tolist()


def test_nonfinite_values_are_counted_not_binned():
    """precompute.accumulators.fixed_hist used to bin NaN as the lowest value (NaN -> int64 min ->
    clipped to bin 0); and PairStats crashed on a batch where no feature fired on one model."""
    from precompute.accumulators import PairStats, SparseActs, fixed_hist

    counts, clipped = fixed_hist(np.array([np.nan, np.inf, -np.inf, 0.5, 0.1, 2.0]), 0.0, 1.0, 4)
    assert counts.tolist() == [1, 0, 1, 1] and clipped == 4  # 2.0 clipped into the last bin; 3 non-finite in none
    empty = SparseActs(token=np.zeros(0, np.int64), feature=np.zeros(0, np.int64), value=np.zeros(0, np.float32), n_tokens=1)
    one = SparseActs(token=np.array([0]), feature=np.array([2]), value=np.array([1.5], np.float32), n_tokens=1)
    ps = PairStats(4, 1e-10)
    ps.update(empty, one)  # all-NaN base activations give no firing entries
    assert ps.sum_log_err.dtype == np.float64 and ps.sum_log_err[2] > 0 and ps.sum_xy.sum() == 0
