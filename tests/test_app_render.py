"""Token highlighting (explorer/render.py) with hostile strings, and the Overview verdict.

The HTML is parsed back with the standard library's parser: whatever the token strings are, the
only elements are the ones render.py writes, the only attributes are class/style/title/data-model,
and the text shown is exactly the display form of the tokens.
"""

from __future__ import annotations

import math
from html.parser import HTMLParser

import pandas as pd
import pytest

from explorer import render
from explorer.synthetic import NASTY_TOKENS
from webapp.verdict import verdict

HOSTILE = list(NASTY_TOKENS) + [
    "<script>alert(document.cookie)</script>",
    "<img src=x onerror=alert(1)>",
    "javascript:alert(1)",
    "\" onmouseover=\"alert(1)",
    "' onmouseover='alert(1)",
    "</span></div><script>x()</script>",
    "<style>body{display:none}</style>",
    "<!-- comment -->",
    "&lt;script&gt;",
    "\x00\x01\x1b[31m",
    "\u202e\u2066\u2069",
    "\r\n\t ",
    "\U0001f600\u200d\U0001f4bb",
    "שלום עולם",
    "",
]
ALLOWED_TAGS = {"style", "div", "span", "h5"}
ALLOWED_ATTRS = {"class", "style", "title", "data-model"}


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.attrs, self.text, self.titles = [], [], [], []
        self._in_style = False
        self._in_tok = 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [k for k, _ in attrs]
        d = dict(attrs)
        if "title" in d:
            self.titles.append(d["title"])
        if tag == "style":
            self._in_style = True
        if tag == "span" and "sx-tok" in (d.get("class") or ""):
            self._in_tok += 1
            self.text.append("")

    def handle_endtag(self, tag):
        if tag == "style":
            self._in_style = False
        if tag == "span" and self._in_tok:
            self._in_tok -= 1

    def handle_data(self, data):
        if self._in_tok and not self._in_style:
            self.text[-1] += data


def _parse(s: str) -> _Collect:
    p = _Collect()
    p.feed(s)
    p.close()
    return p


def test_display_token_makes_whitespace_and_controls_visible():
    assert render.display_token("\n") == "\u21b5"
    assert render.display_token("\t") == "\u2192"
    assert render.display_token(" a") == " a"
    assert render.display_token("   ") == "\u00b7\u00b7\u00b7"
    assert render.display_token("\x07") == "\\x07"
    assert render.display_token("\u202e") == "\\u202e"  # bidi override shown, not applied
    assert render.display_token("\U0001f642") == "\U0001f642"
    assert render.display_token("שלום") == "שלום"


@pytest.mark.parametrize("token", HOSTILE)
def test_highlight_escapes_everything(token):
    tokens = ["a", token, "b"]
    out = render.highlight(tokens, [0.0, 1.0, 0.5], 1.0, "finetuned", focus=1)
    p = _parse(render.CSS + out)
    assert set(p.tags) <= ALLOWED_TAGS
    assert set(p.attrs) <= ALLOWED_ATTRS
    assert p.text == [render.display_token(t) for t in tokens]
    # no token containing markup survives unescaped
    for t in tokens:
        if "<" in t or '"' in t:
            assert t not in out


@pytest.mark.parametrize("token", HOSTILE)
def test_example_block_and_token_list_escape(token):
    tokens = [token, "x", token]
    block = render.example_block(tokens, {"base": [1.0, 0.0, 2.0], "finetuned": [0.0, 3.0, float("nan")]}, 3.0, focus=2, caption=token)
    p = _parse(render.examples_html([block], title=token))
    assert set(p.tags) <= ALLOWED_TAGS and set(p.attrs) <= ALLOWED_ATTRS
    assert p.text == [render.display_token(t) for t in tokens] * 2
    lst = render.token_list_html([token, "y"], [1.5, -2.0], "base")
    p = _parse(lst)
    assert set(p.tags) <= ALLOWED_TAGS and set(p.attrs) <= ALLOWED_ATTRS
    assert p.text == [render.display_token(token), "y"]


def test_tooltips_carry_the_value_and_stay_inside_the_attribute():
    out = render.token_span('"><img src=x onerror=alert(1)>', 1.2345, 2.0, "base")
    p = _parse(out)
    assert p.tags == ["span"]
    assert len(p.titles) == 1 and "1.234" in p.titles[0]
    assert "onerror" in p.titles[0]  # as text inside the title, not as an attribute
    assert set(p.attrs) == {"class", "style", "title"}


def test_intensity_follows_activation_relative_to_max():
    def alpha(v, mx):
        s = render.token_span("t", v, mx, "base")
        return float(s.split("rgba(")[1].split(")")[0].split(",")[3]) if "rgba(" in s else 0.0  # no activation: no style

    assert alpha(0.0, 2.0) == 0.0
    assert alpha(-1.0, 2.0) == 0.0
    assert alpha(float("nan"), 2.0) == 0.0
    assert alpha(1.0, 2.0) == pytest.approx(0.85 * 0.5, abs=1e-3)
    assert alpha(2.0, 2.0) == pytest.approx(0.85, abs=1e-3)
    assert alpha(5.0, 2.0) == pytest.approx(0.85, abs=1e-3)  # clipped
    assert alpha(1.0, 0.0) == 0.0
    # each model has its own colour
    r, g, b = render.MODEL_RGB["finetuned"]
    assert f"rgba({r},{g},{b}," in render.token_span("t", 1.0, 1.0, "finetuned")
    assert render.MODEL_COLORS["base"] != render.MODEL_COLORS["finetuned"]


def _metrics(r_base, r_ft, ev_base=0.9, ev_ft=0.9):
    rows = []
    for model, r, ev in (("base", r_base, ev_base), ("finetuned", r_ft, ev_ft)):
        for outl in ("included", "excluded"):
            rows.append(dict(sae="base_sae", model=model, outliers=outl, ce_recovered=r, explained_variance=ev))
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    "r_base,r_ft,ev_ft,died,level",
    [
        (0.99, 0.9886, 0.88, 1, "yes"),  # Study K, Mistral -> instruct
        (0.99, 0.253, 0.5, 10, "no"),  # Study K, Gemma -> it
        (0.99, 0.80, 0.85, 1, "partly"),
        (0.99, 0.95, 0.60, 1, "partly"),  # explained variance dropped by 0.3
        (0.99, 0.95, 0.88, 40, "partly"),  # 40% of live features died
        (0.99, float("nan"), 0.88, 1, "unknown"),
    ],
)
def test_verdict_levels(r_base, r_ft, ev_ft, died, level):
    v = verdict(_metrics(r_base, r_ft, 0.9, ev_ft), {"both_alive": 100 - died, "died": died, "woke": 3, "both_dead": 0})
    assert v.level == level
    assert any("Thresholds used" in d for d in v.details)
    if math.isfinite(r_ft):
        assert f"{r_ft:.3f}" in " ".join(v.details)
