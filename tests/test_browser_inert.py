"""Strings from a run's files are shown as text in Chromium (issue 13).

A run whose manifest fields (created_at, the corpus path, the seed, the hook, model and SAE
paths, thresholds, the tokenizer check), feature status and class values, token strings and
corpus source labels are Markdown payloads: `:red[...]`, `$$...$$` (KaTeX), `:material/home:`,
`**bold**`, `_em_`, backticks, HTML, a link, an image and a bare URL pointing at a small HTTP
server on another port. Every page of the app is opened on it (and the live probe on a prompt of
the same payloads); the DOM must hold no element, link, image or icon they would create, the
page must show them as literal text where it shows them, and the HTTP server must receive no
request (nor may the page send one to its port).
"""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from explorer import rundir, schema
from explorer.synthetic import make_run
from tests.browser_utils import streamlit_server, wait_idle
from tests.helpers import make_probe_run

pytestmark = pytest.mark.browser
MARKS = ("pwnred", "pwnkatex", "pwnbold", "pwnem", "pwncode", "pwnhtml", "pwnlink", "pwnimg")
POISONED_SOURCE = "python"  # the synthetic runs' source label that becomes the payload


def payloads(port: int) -> list[str]:
    return [
        ":red[pwnred]", "$$pwnkatex$$", ":material/home:", "**pwnbold**", "_pwnem_", "`pwncode`", "<b>pwnhtml</b>",
        f"[pwnlink](http://127.0.0.1:{port}/x)", f"![pwnimg](http://127.0.0.1:{port}/i.png)", f"http://127.0.0.1:{port}/auto",
    ]


class _Trap(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        _Trap.hits.append(self.path)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def trap() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trap)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()


def _rewrite(run_dir: Path, name: str, df: pd.DataFrame, manifest: dict) -> None:
    manifest["files"][name] = rundir.write_table(run_dir, name, pa.Table.from_pandas(df, preserve_index=False), schema.FEATURES_ROW_GROUP_SIZE if name == "features.parquet" else None)


def poison(run_dir: Path, port: int, manifest_specs: bool = True) -> dict:
    """Payloads in the run's manifest and tables (checksums kept valid). Returns what was poisoned."""
    p = payloads(port)
    text = " ".join(p)
    m = json.loads((run_dir / schema.MANIFEST).read_text())
    cfg = m["config"]
    m["created_at"] = text
    cfg["corpus"]["path"] = text
    cfg["sample"]["seed"] = text
    cfg["thresholds"]["outlier_norm"] = text
    cfg["thresholds"]["act_error_eps"] = text
    cfg["thresholds"][p[0]] = p[3]
    m["tokenizer_check"]["n_only_in_base"] = p[1]
    if manifest_specs:  # the probe run keeps loadable specs
        cfg["hook"] = text
        cfg["models"]["base"] = {"path": text}
        cfg["saes"]["base_sae"] = {"path": p[7]}
    feats = pq.read_table(run_dir / "features.parquet").to_pandas()
    alive = feats[(feats.sae == "base_sae") & (feats.cross_class == "both_alive")].feature_id.tolist()
    fid = int(alive[0])
    row = (feats.sae == "base_sae") & (feats.feature_id == fid)
    feats.loc[row, "status_base"] = text
    feats.loc[row, "status_finetuned"] = p[5] + p[6]
    feats.loc[row, "cross_class"] = p[2] + " " + p[7]
    _rewrite(run_dir, "features.parquet", feats, m)
    vocab = pq.read_table(run_dir / "vocab.parquet").to_pandas()
    for i, s in enumerate(p):
        vocab.loc[vocab.token_id == 20 + i, "token_str"] = s
    _rewrite(run_dir, "vocab.parquet", vocab, m)
    toks = pq.read_table(run_dir / "tokens.parquet").to_pandas()
    if (toks["source"] == POISONED_SOURCE).any():
        # one source label is the payload everywhere it is stored (the statistics pages' picker,
        # per-source tables, KL contexts: issue 12); the other stays, so the picker is drawn
        toks["source"] = toks["source"].where(toks["source"] != POISONED_SOURCE, text)
        for name in [n for n in m["files"] if n.endswith(".parquet") and n != "tokens.parquet"]:
            t = pq.read_table(run_dir / name)
            if "source" in t.column_names:
                col = t.column("source")
                t = t.set_column(t.column_names.index("source"), "source", pc.if_else(pc.equal(col, POISONED_SOURCE), text, col))
                m["files"][name] = rundir.write_table(run_dir, name, t, schema.FEATURES_ROW_GROUP_SIZE if name == "features_by_source.parquet" else None)
        m["sources"] = {(text if k == POISONED_SOURCE else k): v for k, v in (m.get("sources") or {}).items()}
        by_src = (m.get("summary") or {}).get("by_source") or {}
        for sae, per in by_src.items():
            by_src[sae] = {(text if k == POISONED_SOURCE else k): v for k, v in per.items()}
    else:
        toks["source"] = text
    _rewrite(run_dir, "tokens.parquet", toks, m)
    m.pop("schema_version", None)
    rundir.write_manifest(run_dir, m)
    rundir.open_run(run_dir)  # still a valid run: every checksum matches
    return {"feature": fid, "text": text}


@pytest.fixture(scope="module")
def pwn(tmp_path_factory, trap, tiny_demo) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("pwn_runs")
    info = poison(make_run(root / "pwn", n_features=120, seed=5, n_vocab=512), trap)
    poison(make_probe_run(root / "pwnprobe", tiny_demo), trap, manifest_specs=False)
    with streamlit_server(runs_dir=root) as url:
        yield {"url": url, "port": trap, **info}


DOM_CHECK = """([marks, port]) => {
  const bad = [];
  for (const el of document.querySelectorAll('body *')) {
    if (el.closest('[data-testid="stSidebarNav"]')) continue;
    const t = (el.textContent || '').trim();
    if (el.children.length === 0 && marks.includes(t)) bad.push('element ' + el.tagName + ' made of ' + t);
  }
  for (const a of document.querySelectorAll('a[href]')) if (a.href.includes(':' + port)) bad.push('link ' + a.href);
  for (const i of document.querySelectorAll('img')) if ((i.src || '').includes(':' + port)) bad.push('image ' + i.src);
  for (const k of document.querySelectorAll('.katex, .katex-display')) bad.push('katex ' + k.textContent.slice(0, 30));
  for (const c of document.querySelectorAll('[class*="ColoredText"], [data-testid="stMarkdownColoredText"]')) bad.push('coloured ' + c.textContent);
  for (const i of document.querySelectorAll('[data-testid="stIconMaterial"]')) if (i.textContent.trim() === 'home') bad.push('icon home');
  // a code block (st.code: the Features page's export command) shows its text as written: payloads there are text
  for (const s of document.querySelectorAll('strong, em, code, b, i')) if (!s.closest('[data-testid="stCode"]') && marks.some(m => s.textContent.includes(m))) bad.push(s.tagName + ' ' + s.textContent.slice(0, 40));
  for (const c of document.querySelectorAll('[data-testid="stCode"]')) if (c.querySelector('strong, em, b, i, a, img, .katex')) bad.push('markup inside a code block');
  return bad;
}"""


def _visit(page, url: str, port: int, ready: str | None = None) -> list[str]:
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url) if f":{port}" in r.url else None)
    page.goto(url)
    wait_idle(page, timeout_ms=180_000)
    if ready:
        page.wait_for_selector(ready, timeout=180_000)
    from playwright.sync_api import Error as PlaywrightError

    for sel, n in ((".sx-tok", 40), ('[data-testid="stTooltipIcon"]', 20)):  # token tooltips; help= tooltips (drawn on hover)
        for el in page.locator(sel).all()[:n]:
            try:
                el.hover(timeout=5000, force=True)
            except PlaywrightError:  # re-rendered meanwhile (a busy machine): the DOM check below still runs
                continue
            page.wait_for_timeout(50)
    page.mouse.wheel(0, 4000)
    page.wait_for_timeout(800)
    bad = page.evaluate(DOM_CHECK, [list(MARKS), port])
    return bad + [f"request {u}" for u in requests]


PAGES = {
    "overview": ("/?run=pwn", None),
    "features": ("/features?run=pwn&both_dead=1", '[data-testid="stDataFrame"]'),
    "feature": ("/feature?run=pwn&sae=base_sae&feature={fid}", ".sx-tok"),
    "dead_born": ("/dead-born?run=pwn", ".sx-tok"),
    "similarity": ("/similarity?run=pwn", ".js-plotly-plot"),
    "differences": ("/differences?run=pwn", ".sx-tok"),
    # the poisoned source picked (the link names it): pages that name the source in their text
    "overview_source": ("/?run=pwn&source={src}", None),
    "features_source": ("/features?run=pwn&both_dead=1&source={src}", '[data-testid="stDataFrame"]'),
    "dead_born_source": ("/dead-born?run=pwn&source={src}", ".sx-tok"),
    "similarity_source": ("/similarity?run=pwn&source={src}", ".js-plotly-plot"),
    "differences_source": ("/differences?run=pwn&source={src}", ".sx-tok"),
}


@pytest.mark.parametrize("which", list(PAGES))
def test_payloads_from_the_run_are_text(which, pwn, page):
    path, ready = PAGES[which]
    before = len(_Trap.hits)
    bad = _visit(page, pwn["url"] + path.format(fid=pwn["feature"], src=quote(pwn["text"], safe="")), pwn["port"], ready)
    assert bad == []
    assert _Trap.hits[before:] == []  # no request reached the other port
    body = page.inner_text("body")
    assert "Traceback" not in body and page.locator('[data-testid="stException"]').count() == 0
    if which == "overview":
        # the manifest's outlier threshold is shown in a caption: literally
        assert ":red[pwnred] $$pwnkatex$$ :material/home: **pwnbold** _pwnem_ `pwncode` <b>pwnhtml</b>" in body
    if which.endswith("_source"):
        assert page.locator('[data-testid="stWarning"]').count() == 0  # the link's source is the run's: no fallback
        # named in the page's text, literally (up to the links, where inert puts invisible word joiners)
        assert ":red[pwnred] $$pwnkatex$$ :material/home: **pwnbold** _pwnem_ `pwncode` <b>pwnhtml</b>" in body
    if which == "feature":
        assert "**pwnbold**" in body and "`pwncode`<b>pwnhtml</b>" in body  # status values, as text
        assert ":material/home: [pwnlink](" in body  # the cross-model class
    assert page.dialogs == []


@pytest.mark.slow
def test_payload_prompt_and_tokens_in_the_live_probe_are_text(pwn, page):
    from urllib.parse import quote

    prompt = " ".join(payloads(pwn["port"]))[:400]
    page.goto(pwn["url"] + "/?run=pwnprobe")
    wait_idle(page, timeout_ms=180_000)
    before = len(_Trap.hits)
    for pos in ("", "&pos=1", "&pos=3", "&pos=6", "&pos=10"):
        bad = _visit(page, f"{pwn['url']}/live_probe?run=pwnprobe&prompt={quote(prompt)}{pos}", pwn["port"], '[data-probe="feature-acts"]')
        assert bad == [], pos
        assert page.get_by_text("Predict after position").count() >= 1
    # the corpus picker's labels hold the poisoned source labels
    bad = _visit(page, f"{pwn['url']}/live_probe?run=pwnprobe&seq=2", pwn["port"], '[data-probe="feature-acts"]')
    assert bad == []
    assert _Trap.hits[before:] == []
    assert page.locator('[data-testid="stException"]').count() == 0 and page.dialogs == []
