"""Security (issue 6): no code execution from config or data files, no path escapes, hostile token
strings render as text on every page that shows tokens, and the server binds 127.0.0.1 with XSRF on.

Related tests elsewhere: tests/test_rundir.py::test_run_ids_cannot_escape (pattern-level run ids),
tests/test_precompute_errors.py "bad run id" (a config's run_id = "../escape"),
tests/test_app.py::test_url_values_are_shown_as_text_not_markdown (URL values in messages),
tests/test_browser.py::test_hostile_tokens_render_as_text (the feature page's examples),
tests/test_browser_probe.py (a prompt with <b>/<img onerror> in the live probe).
"""

from __future__ import annotations

import ast
import json
import os
import re
import tomllib
from pathlib import Path

import pytest

from explorer import rundir
from explorer.errors import RunError
from explorer.synthetic import make_run

from tests.test_browser_probe import probe_app_url  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ["explorer", "precompute", "webapp", "pages", "benchmarks", "tests", "docs", ".ci"]
HOSTILE = ["<script>alert(1)</script>", "<img src=x onerror=alert(2)>", "javascript:alert(3)"]


def _sources() -> list[Path]:
    files = [REPO / "app.py"]
    for d in SOURCE_DIRS:
        root = REPO / d
        if root.is_dir():
            files += [p for p in root.rglob("*.py") if "_work" not in p.parts and "venv" not in str(p)]
    return files


# ---------------------------------------------------------------- no pickle, no eval


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
            yield node, owner, name


def test_no_pickle_eval_exec_or_unsafe_loaders_in_the_source_tree():
    """Parsed, not grepped: strings and comments may mention these names; calls may not."""
    problems = []
    files = _sources()
    assert len(files) > 30
    for path in files:
        if path.name == "_saedashboard_runner.py":  # runs SAEDashboard (a third-party tool) in its own venv, for a benchmark only
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "marshal", "shelve") for n in names):
                    problems.append(f"{path}:{node.lineno} imports a pickle-like module")
        for node, owner, name in _calls(tree):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            kw = {k.arg: k.value for k in node.keywords}
            if name in ("eval", "exec") and owner is None:
                problems.append(f"{where} calls {name}()")
            if owner == "torch" and name == "load":
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where} torch.load without weights_only=True")
            if owner == "yaml" and name == "load":
                loader = kw.get("Loader")
                if not (isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")):
                    problems.append(f"{where} yaml.load without SafeLoader")
            if owner in ("np", "numpy") and name == "load":
                ap = kw.get("allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    problems.append(f"{where} np.load with allow_pickle")
            if name in ("read_pickle", "to_pickle"):
                problems.append(f"{where} {name}")
    assert problems == []


def test_this_check_would_catch_them(tmp_path):
    """The checker above, on a file that does every forbidden thing (so it can fail)."""
    bad = "import pickle\nimport torch, yaml\neval('1')\nexec('x=1')\ntorch.load('f')\nyaml.load(s)\n"
    tree = ast.parse(bad)
    names = [(o, n) for _, o, n in _calls(tree)]
    assert (None, "eval") in names and (None, "exec") in names and ("torch", "load") in names and ("yaml", "load") in names


def test_unsafe_html_only_with_escaped_input():
    """Every st.markdown(..., unsafe_allow_html=True) and st.html(...) in the app gets HTML built by
    explorer.render (which escapes every token) or literal markup; never a raw f-string of data."""
    offenders = []
    for path in [REPO / "app.py", *(REPO / "pages").glob("*.py"), *(REPO / "webapp").glob("*.py")]:
        tree = ast.parse(path.read_text())
        for node, owner, name in _calls(tree):
            unsafe = name == "html" and owner == "st"
            unsafe |= name == "markdown" and any(k.arg == "unsafe_allow_html" and isinstance(k.value, ast.Constant) and k.value.value for k in node.keywords)
            if not unsafe or not node.args:
                continue
            arg = node.args[0]
            if isinstance(arg, ast.JoinedStr):
                # an f-string: each interpolated value must be a render.* call, html.escape(...), or a
                # local built from them (checked by name: *_html / items / blocks / block)
                for v in arg.values:
                    if isinstance(v, ast.FormattedValue):
                        src = ast.unparse(v.value)
                        if not (src.startswith(("render.", "html.escape(", "ui.")) or re.fullmatch(r"\w*(html|items|blocks|block)\w*", src)):
                            offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {src}")
    assert offenders == []


# ---------------------------------------------------------------- paths cannot escape


@pytest.mark.parametrize("bad", ["../x", "..", "a/../../b", "/etc", "/tmp/x", "a/b", "..\\x", "x\x00y", "~root", "", " demo"])
def test_run_ids_from_urls_and_configs_cannot_escape(tmp_path, bad):
    with pytest.raises(RunError):
        rundir.run_path(bad, tmp_path)


def test_symlinked_run_pointing_outside_is_refused_and_not_listed(tmp_path):
    runs, outside = tmp_path / "runs", tmp_path / "outside"
    runs.mkdir()
    make_run(outside / "victim", n_features=8, seed=1)
    make_run(runs / "ok", n_features=8, seed=2)
    (runs / "evil").symlink_to(outside / "victim", target_is_directory=True)
    with pytest.raises(RunError, match="outside the runs directory"):
        rundir.run_path("evil", runs)
    assert rundir.list_runs(runs) == ["ok"]  # never offered in the picker either
    assert rundir.run_path("ok", runs) == (runs / "ok").resolve()


def test_symlinked_run_in_the_app_is_a_friendly_error(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    runs, outside = tmp_path / "runs", tmp_path / "outside"
    runs.mkdir()
    make_run(outside / "victim", n_features=8, seed=1)
    make_run(runs / "ok", n_features=8, seed=2)
    (runs / "evil").symlink_to(outside / "victim", target_is_directory=True)
    monkeypatch.setenv("SAE_EXPLORER_RUNS_DIR", str(runs))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.query_params["run"] = "evil"
    at.run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert any("outside the runs directory" in e for e in errors), errors
    assert at.sidebar.selectbox[0].options == ["ok"]


# ---------------------------------------------------------------- server binding


def test_streamlit_config_binds_localhost_with_xsrf_on():
    cfg = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["address"] == "127.0.0.1"
    assert cfg["server"]["enableXsrfProtection"] is True
    assert cfg["browser"]["gatherUsageStats"] is False
    assert cfg["client"]["showErrorDetails"] in ("none", False)


def test_streamlit_reads_our_config_as_such():
    """Streamlit's own config loader, on our file: the effective values."""
    import subprocess
    import sys

    code = (
        "import json, streamlit.config as c; c.get_config_options(force_reparse=True, options_from_flags={});"
        "print(json.dumps([c.get_option('server.address'), c.get_option('server.enableXsrfProtection'), c.get_option('server.enableCORS')]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(REPO / ".no-home")})
    assert out.returncode == 0, out.stderr
    address, xsrf, cors = json.loads(out.stdout.strip().splitlines()[-1])
    assert address == "127.0.0.1" and xsrf is True and cors is True


def test_readme_documents_the_run_command_and_exposing_deliberately():
    text = (REPO / "README.md").read_text()
    assert "streamlit run app.py" in text
    section = text.split("## Exposing the app deliberately", 1)[1].split("\n## ", 1)[0]
    assert "127.0.0.1" in section and "XSRF" in section and "--server.address 0.0.0.0" in section
    # the documented default command does not bind elsewhere
    for line in text.splitlines():
        if "streamlit run app.py" in line and "0.0.0.0" in line:
            assert "Exposing" in text.split(line)[0].rsplit("\n## ", 1)[-1].splitlines()[0], line


# ---------------------------------------------------------------- hostile tokens in the real browser

# Any script that runs sets a flag (the alert/eval/Function of every frame are wrapped before the app loads).
PWN_PROBE = """
window.__xss = [];
for (const name of ['alert', 'confirm', 'prompt']) {
  const orig = window[name];
  window[name] = function (...a) { window.__xss.push(name + ':' + a.join(',')); };
}
"""

# pages that show token strings, and what must be there when they have rendered
TOKEN_PAGES = {
    "feature": ("/feature?run=synth&sae=base_sae&feature={fid}", ".sx-tok"),
    "features": ("/features?run=synth&sae=base_sae", '[data-testid="stDataFrame"]'),
    "features_search": ("/features?run=synth&sae=base_sae", '[data-testid="stDataFrame"]'),
    "dead_born": ("/dead-born?run=synth&sae=base_sae", ".sx-tok"),
    "overview": ("/overview?run=synth", '[data-testid="stMarkdown"]'),
    "similarity": ("/similarity?run=synth&sae=base_sae", ".js-plotly-plot"),
    "differences": ("/differences?run=synth", ".sx-tok"),
}


def _assert_nothing_ran(page) -> None:
    assert page.dialogs == []
    assert page.evaluate("() => window.__xss") == []
    assert page.evaluate("() => Array.from(document.scripts).filter(s => /alert\\(/.test(s.textContent)).length") == 0
    assert page.locator('img[src="x"]').count() == 0
    assert page.locator('a[href^="javascript:"]').count() == 0
    assert page.locator('[data-testid="stException"]').count() == 0
    for frame in page.frames[1:]:
        assert frame.evaluate("() => Array.from(document.querySelectorAll('script')).filter(s => /alert\\(/.test(s.textContent)).length") == 0


@pytest.mark.browser
@pytest.mark.parametrize("which", list(TOKEN_PAGES))
def test_hostile_tokens_are_text_on_every_page(which, synthetic_app_url, synthetic_runs, page):  # noqa: F811
    import pandas as pd

    from tests.browser_utils import wait_idle

    feats = pd.read_parquet(synthetic_runs / "synth" / "features.parquet")
    hit = feats[(feats.sae == "base_sae") & feats.top_tokens.fillna("").str.contains(HOSTILE[0], regex=False) & (feats.status_base != "dead")]
    path, ready = TOKEN_PAGES[which]
    page.add_init_script(PWN_PROBE)
    page.goto(synthetic_app_url + path.format(fid=int(hit.feature_id.iloc[0])))
    wait_idle(page)
    page.wait_for_selector(ready, timeout=60000)
    if which == "features_search":
        box = page.get_by_label("Search top-example tokens")
        box.fill("<img src=x onerror=alert(2)>")
        box.press("Enter")
        wait_idle(page)
        assert page.get_by_text("features match").count() >= 1  # the search found the hostile token as text
    for el in page.locator(".sx-tok").all()[:150]:
        el.hover(timeout=5000)  # tooltips
    page.mouse.wheel(0, 3000)
    page.wait_for_timeout(500)
    _assert_nothing_ran(page)
    if which in ("feature", "dead_born"):
        toks = page.eval_on_selector_all(".sx-tok", "els => els.map(e => e.textContent)")
        assert any(h in t for t in toks for h in HOSTILE), "the hostile tokens are shown, as text"


@pytest.mark.browser
@pytest.mark.slow
def test_hostile_prompt_in_the_live_probe_is_text(page, probe_app_url):  # noqa: F811
    from tests.browser_utils import wait_idle

    page.add_init_script(PWN_PROBE)
    page.goto(probe_app_url + "/?run=probe", wait_until="domcontentloaded")
    wait_idle(page, timeout_ms=180_000)
    page.goto(probe_app_url + "/live_probe?run=probe", wait_until="domcontentloaded")
    wait_idle(page, timeout_ms=180_000)
    prompt = " ".join(HOSTILE) + ' <a href="javascript:alert(4)">x</a>'  # the tiny pair's context (32 tokens) keeps the first two
    page.locator('[data-testid="stTextArea"] textarea').fill(prompt)
    page.get_by_role("button", name="Run probe").click()
    wait_idle(page, timeout_ms=120_000)
    panel = page.locator('[data-probe="feature-acts"]')
    panel.wait_for(timeout=60_000)
    for el in panel.locator(".sx-tok").all()[:80]:
        el.hover(timeout=5000)
    line = panel.locator('[data-model="base"]').text_content().replace("\u00b7", " ")
    assert "<script>alert(1)</script> <img src=x" in line
    assert panel.locator("script, img, a").count() == 0
    page.get_by_role("button", name="Steer").click()
    wait_idle(page, timeout_ms=120_000)
    page.locator('[data-probe="steering-base"]').wait_for(timeout=60_000)
    _assert_nothing_ran(page)
