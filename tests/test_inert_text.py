"""Every string from a run file, a corpus, a tokenizer or a URL is shown as text (issue 13).

Streamlit renders Markdown (with KaTeX, `:red[...]` colours, `:material/...:` icons, emoji
shortcodes, links, autolinks and images) in st.markdown, st.caption, headings, alerts, metric
labels and values, widget labels, radio and select-slider option labels, help= tooltips,
expander and page-link labels, buttons and st.table cells. explorer.render.inert is the one way
a data string gets there. This module

* scans the app's code (app.py, pages/, webapp/) with `ast`: every text argument of such a call
  must be provably safe: a literal, a number formatted with a numeric format spec, a module
  constant (ALL_CAPS), a call of `inert` (or a helper that returns numbers: ui.fmt / ui.pct /
  ui.density, or `ui.sae_label`, which is inert of a label), or built from those with `+`,
  f-strings and conditionals. st.write and st.table with anything but literals are refused
  (st.dataframe shows cells as plain text), and so is a sink used indirectly (`box = st.error`);
* checks that the scan can fail, on code that does each forbidden thing;
* checks `inert` itself: what Streamlit shows for its output is the input's text.

The browser half (the DOM of a run full of payloads, no request to their URLs) is
tests/test_browser_inert.py.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from explorer.render import inert, visible
from tests.helpers import md_text

REPO = Path(__file__).resolve().parent.parent

# calls whose first positional argument is rendered as Markdown
BODY = {
    "markdown", "caption", "title", "header", "subheader", "info", "warning", "error", "success", "toast",
    "expander", "popover", "status", "button", "download_button", "form_submit_button", "link_button",
    "checkbox", "toggle", "radio", "selectbox", "multiselect", "slider", "select_slider", "number_input",
    "text_input", "text_area", "date_input", "time_input", "color_picker", "file_uploader", "pills",
    "segmented_control", "chat_input",
}
METRIC_ARGS = ("label", "value", "delta")  # st.metric: all three are Markdown
TEXT_KWARGS = {"label", "help", "caption", "captions", "value", "delta"}
OPTION_MARKDOWN = {"radio", "select_slider", "pills", "segmented_control"}  # their option labels are Markdown
ALWAYS_LITERAL = {"write", "table", "write_stream", "latex"}
SAFE_CALLS = {"inert", "fmt", "pct", "density", "sae_label", "int", "float", "len", "round"}
STR_METHODS = {"capitalize", "lower", "upper", "title", "strip", "replace"}
NOT_STREAMLIT = {"log", "logger", "_LOGGER", "logging", "warnings", "re", "os", "np", "pd", "pq", "pa", "pc", "json", "str",
                 "urlstate", "state", "data", "live", "store", "charts", "render", "figures", "schema", "rundir", "ui"}  # the app's own modules
WRAPPERS = {"widget", "bound", "view"}  # urlstate.widget(fn, param, *args) and the features page's bound(...) and view(...) call fn(*args)
NUMERIC_SPEC = re.compile(r"[bdeEfFgGnoxX%,]$")


def _sources() -> list[Path]:
    return [REPO / "app.py", *sorted((REPO / "pages").glob("*.py")), *sorted((REPO / "webapp").glob("*.py"))]


def _const_name(name: str) -> bool:
    return name.lstrip("_").isupper()


def safe(node: ast.AST | None) -> bool:
    """True when `node` can only produce text that renders as itself (see the module docstring)."""
    if node is None or isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.JoinedStr):
        return all(_safe_part(v) for v in node.values)
    if isinstance(node, ast.FormattedValue):
        return _safe_part(node)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return safe(node.left) and safe(node.right)
    if isinstance(node, ast.IfExp):
        return safe(node.body) and safe(node.orelse)
    if isinstance(node, ast.BoolOp):
        return all(safe(v) for v in node.values)
    if isinstance(node, ast.Name):
        return _const_name(node.id)
    if isinstance(node, ast.Attribute):
        return _const_name(node.attr) or (node.attr == "get" and safe(node.value))  # CONSTANT_LABELS.get as a format_func
    if isinstance(node, ast.Subscript):
        return safe(node.value) if isinstance(node.value, (ast.Name, ast.Attribute, ast.Dict)) else False
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return all(safe(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(safe(v) for v in node.values)
    if isinstance(node, ast.Lambda):
        return safe(node.body)
    if isinstance(node, ast.Call):
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if name in SAFE_CALLS:
            return True
        if name == "str":
            return all(safe(a) for a in node.args)
        if isinstance(f, ast.Attribute) and name in STR_METHODS:
            return safe(f.value) and all(safe(a) for a in node.args)
    return False


def _safe_part(v: ast.AST) -> bool:
    if isinstance(v, ast.Constant):
        return True
    assert isinstance(v, ast.FormattedValue)
    if v.conversion != -1:  # !r / !s / !a of data is still data
        return False
    if v.format_spec is not None:
        spec = "".join(c.value for c in v.format_spec.values if isinstance(c, ast.Constant))
        if NUMERIC_SPEC.search(spec):
            return True  # a number (a numeric spec raises on a string)
    return safe(v.value)


def _name(f: ast.AST) -> str | None:
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _receiver_is_streamlit(f: ast.AST) -> bool:
    if not isinstance(f, ast.Attribute):
        return False
    v = f.value
    return not (isinstance(v, ast.Name) and v.id in NOT_STREAMLIT) and not isinstance(v, ast.Constant)


def _check_call(sink: str, args: list[ast.AST], keywords: list[ast.keyword], where: str, problems: list[str]) -> None:
    kw = {k.arg: k.value for k in keywords if k.arg}
    if sink in ALWAYS_LITERAL:
        if not all(isinstance(a, ast.Constant) for a in [*args, *kw.values()]):
            problems.append(f"{where}: st.{sink} with non-literal arguments (use st.dataframe or inert text)")
        return
    if sink == "metric":
        texts = list(args[:3]) + [kw[k] for k in METRIC_ARGS if k in kw]
    elif sink == "tabs":
        texts = list(args[:1])
    elif sink.endswith("Column"):
        texts = []  # a column's label is plain text; its help= is Markdown (below)
    else:
        texts = list(args[:1])
    texts += [v for k, v in kw.items() if k in TEXT_KWARGS and not (sink == "metric" and k in METRIC_ARGS)]
    if sink in OPTION_MARKDOWN:
        texts.append(kw["format_func"] if "format_func" in kw else (args[1] if len(args) > 1 else kw.get("options")))
    for t in texts:
        if not safe(t):
            problems.append(f"{where}: {sink}(...) gets {ast.unparse(t)[:120]}")


def scan(tree: ast.AST, filename: str) -> list[str]:
    """Problems: text reaching a Markdown sink that is not provably inert."""
    problems: list[str] = []
    called = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        called.add(id(node.func))
        where = f"{filename}:{node.lineno}"
        name = _name(node.func)
        if name in WRAPPERS and node.args and isinstance(node.args[0], ast.Attribute):
            called.add(id(node.args[0]))
            inner = node.args[0].attr
            if inner in BODY or inner in ALWAYS_LITERAL or inner == "metric":
                _check_call(inner, list(node.args[2:]), node.keywords, where, problems)
            continue
        if not _receiver_is_streamlit(node.func):
            continue
        if name in BODY or name in ALWAYS_LITERAL or name in ("metric", "tabs", "page_link") or (name or "").endswith("Column"):
            if name == "page_link":
                _check_call(name, [], node.keywords, where, problems)
            else:
                _check_call(name, list(node.args), node.keywords, where, problems)
    # a sink used as a value (`box = st.error; box(text)`) escapes the check above
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in called and node.attr in (BODY | {"metric"}) and _receiver_is_streamlit(node):
            if isinstance(node.value, ast.Name) and node.value.id == "st":
                problems.append(f"{filename}:{node.lineno}: st.{node.attr} used indirectly (call it directly, with inert text)")
    return problems


def test_no_data_string_reaches_markdown_unescaped():
    files = _sources()
    assert len(files) >= 12
    problems = []
    for path in files:
        problems += scan(ast.parse(path.read_text(), filename=str(path)), str(path.relative_to(REPO)))
    assert problems == []


BAD = '''
import streamlit as st
from webapp import urlstate
st.markdown(f"status `{row['status_base']}`")
st.caption("The next token is " + token)
st.metric("density", value, help=f"over {run.run_id}")
c1.metric(label, "1")
st.selectbox(f"SAE {name}", saes)
st.radio("Mode", modes, format_func=lambda m: m.upper() + name)
st.select_slider("pos", options=list(range(n)), format_func=lambda i: f"{i}: {tokens[i]}")
st.error(str(exc))
st.table(df)
st.write(manifest)
st.page_link("pages/x.py", label=f"feature {label}")
urlstate.widget(st.toggle, "p", f"Show {name}", key="k", default=False, codec=None)
st.column_config.TextColumn("x", help=doc)
box = {"yes": st.success}[level]
st.info(f"{x!r}")
st.expander(title)
'''

GOOD = '''
import streamlit as st
from explorer.render import inert
from webapp import urlstate, ui
st.markdown(f"**{n:,}** of {run.d_sae(sae):,} features match")
st.caption("The next token is ‹" + inert(token) + "›.")
st.metric("density", ui.density(v), help=f"over {ui.fmt(n, ',d')} tokens")
st.selectbox("SAE", saes, format_func=lambda s: LABELS.get(s, s))
st.radio("Mode", MODES, format_func=MODE_LABELS.get)
st.select_slider("pos", options=list(range(n)), format_func=lambda i: f"{i:d}: " + inert(tokens[i]))
st.error(inert(str(exc)))
st.page_link("pages/x.py", label=inert(label))
urlstate.widget(st.toggle, "p", f"Show the {n:,} features", key="k", default=False, codec=None)
st.subheader(f"{ui.sae_label(sae)} · feature {fid:d}")
ui.alert(level, "**Verdict** " + inert(v.headline))
log.error("x %s", data)
'''


def test_the_scan_catches_each_unescaped_sink():
    found = scan(ast.parse(BAD), "bad.py")
    lines = {int(p.split(":")[1]) for p in found}
    expected = set(range(4, 20))  # every line of BAD from the first sink on
    assert lines == expected, sorted(found)


def test_the_scan_accepts_inert_and_numeric_text():
    assert scan(ast.parse(GOOD), "good.py") == []


PAYLOADS = [
    ":red[x]", "$$x$$", "$y$", ":material/home:", "**b**", "__u__", "_i_", "~~s~~", "`c`", "```\nblock\n```",
    "[l](http://127.0.0.1:9/x)", "![i](http://127.0.0.1:9/i.png)", "<b>h</b><img src=x onerror=alert(1)>",
    "http://127.0.0.1:9/auto", "https://example.org/x", "www.example.com", "WWW.EXAMPLE.COM", "a@b.com", "mailto:a@b.com",
    ":smile: :+1:", "# head", "- item", "1. one", "> q", "| a | b |", "\\*x\\*", "&amp; &lt;b&gt;", "    indented code",
    "line\nbreak", "a\u202eb", "{{7*7}}", "\\", "x\\", "![](", "[x]: http://127.0.0.1:9/ref", "<http://127.0.0.1:9/a>",
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_inert_shows_the_text(payload):
    out = inert(payload)
    # what Streamlit shows is the text (control characters made visible)
    assert md_text(out) == visible(payload)
    # no Markdown-special character is left unescaped, no newline starts a block
    assert re.search(r"(?<!\\)[!#$&()*+\-./:<=>\[\]^_`{|}~]", out.replace("\\\\", "")) is None, out
    assert "\n" not in out
    # GFM autolinks (found after escapes are resolved) are broken by an invisible word joiner
    plain = md_text(out).replace("\u2060", "")
    if "://" in plain or "www." in plain.lower() or "@" in plain:
        assert "\u2060" in out


def test_inert_of_non_strings():
    assert md_text(inert(None)) == ""
    assert md_text(inert(0.5)) == "0.5"
    assert md_text(inert(["a", "b"])) == "['a', 'b']"


def test_iframes_get_constant_html_only():
    """st.iframe runs its HTML's scripts (the copy-link button): only a module constant, never data."""
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and _name(node.func) == "iframe":
                arg = node.args[0] if node.args else None
                ok = isinstance(arg, ast.Constant) or (isinstance(arg, ast.Name) and _const_name(arg.id))
                found.append((path.name, node.lineno, ok))
    assert found and all(ok for _, _, ok in found), found
