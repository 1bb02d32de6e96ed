"""Token highlighting as HTML. Every string that reaches the HTML goes through `html.escape`.

Corpus text contains `<script>`, `<img onerror=...>`, `javascript:` and worse, and vocabularies
hold control characters, emoji and right-to-left text. Rules here:

* a token's display form (`display_token`) makes whitespace and control characters visible
  (space as-is, newline as a visible return symbol, tab as an arrow, other controls as their
  code), and it is escaped before it is placed in the HTML;
* every attribute value (the tooltip) is escaped with quote=True;
* each token span isolates its bidi direction (`unicode-bidi: isolate`), so right-to-left text
  cannot reorder the tokens around it;
* colours are computed here from numbers only, never from strings; a token with no activation
  has no style at all;
* a window's token strings may come grouped (explorer/tokens.py): the pieces of a character split
  over byte tokens are empty strings before the token that completes it; `highlight(...,
  grouped=True)` draws such a run as ONE span (the character, at the run's largest activation) whose tooltip lists every
  piece with its id and activation, so the text reads as written and no activation is hidden.

The functions return HTML strings for `st.html` (or `st.markdown(unsafe_allow_html=True)`);
they do not import streamlit.

`inert(value)` is the other half: the ONE way a string from a run file, a corpus, a tokenizer
or a URL reaches Streamlit's Markdown (st.markdown, st.caption, alerts, metric labels and
values, widget labels, radio/slider option labels, help= tooltips, expander and page-link
labels, st.table cells). It returns Markdown source that renders as exactly the text: no
emphasis, code spans, KaTeX, `:red[...]` colours, `:material/...:` icons, emoji shortcodes,
links, autolinks or images (tests/test_inert_text.py scans the pages for sinks that bypass it;
tests/test_browser_inert.py checks the DOM in Chromium).
"""

from __future__ import annotations

import functools
import html
import math
import re
import unicodedata
from typing import Iterable, Sequence

# One colour per model, everywhere (figures.py uses the same constants).
MODEL_COLORS = {"base": "#1f6fb4", "finetuned": "#d9731a"}
MODEL_RGB = {m: tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for m, c in MODEL_COLORS.items()}
MODEL_LABELS = {"base": "base model", "finetuned": "finetuned model"}

_VISIBLE = {"\n": "\u21b5", "\r": "\u240d", "\t": "\u2192", "\x00": "\u2400"}

CSS = """
<style>
.sx-ex{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:0.84rem;line-height:1.55;
  direction:ltr;unicode-bidi:isolate;display:flex;flex-wrap:wrap;align-items:baseline;row-gap:2px;margin:0 0 1px 0}
.sx-tok{unicode-bidi:isolate;border-radius:3px;padding:0 1px;white-space:pre;min-width:0.4em}
.sx-focus{outline:1.5px solid #333;outline-offset:-1px}
.sx-lbl{flex:0 0 5.4em;font-size:0.7rem;color:#666;font-family:sans-serif}
.sx-act{font-size:0.7rem;color:#666;font-family:sans-serif;margin-left:8px;white-space:nowrap}
.sx-cap{font-size:0.72rem;color:#666;font-family:sans-serif;margin:0 0 1px 0}
.sx-block{margin:0 0 10px 0;padding:3px 0 0 6px;border-left:2px solid #e3e3e3}
</style>
"""


def visible(text: str) -> str:
    """`text` with newlines, tabs and control/format characters (bidi overrides included) made
    visible: a return symbol, an arrow, or their code. Unescaped."""
    out = []
    for ch in str(text):
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") and ch not in "\u200d":
            # control, format (incl. bidi overrides), surrogate, private use, unassigned
            out.append(f"\\u{ord(ch):04x}" if ord(ch) > 0xFF else f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def display_token(token: str) -> str:
    """The visible form of a token (unescaped): whitespace and control characters shown."""
    if token is None:
        return "\u2205"
    if token and set(str(token)) == {" "}:
        return "\u00b7" * len(token)  # a run of spaces alone would be an empty box
    return visible(token)


# ASCII punctuation with a meaning somewhere in Markdown or in Streamlit's own syntax (emphasis,
# code, links, images, HTML, tables, headings, lists, $ KaTeX, :red[...] directives, and the
# `:material/` and `:shortcode:` patterns, which Streamlit matches on the source text):
# CommonMark lets each be backslash-escaped, and an escaped one is a literal character to
# every construct. Left alone, as they mean nothing: ' " , ; ? % and @ (see _AUTOLINK).
_MD_PUNCT = re.compile(r"([!#$&()*+\-./:<=>\[\\\]^_`{|}~])")
# GFM autolink literals (http://, www., e-mail) are found in the parsed text, where escapes are
# already resolved: an invisible WORD JOINER inside the pattern breaks them.
_WJ = "\u2060"
_AUTOLINK = re.compile(r"(?i)(?<=:)(?=//)|(?<=w)(?=ww\.)|(?=@)")


def inert(value: object) -> str:
    """`value` as Streamlit Markdown source that renders as exactly its text (see the module
    docstring). Control characters are made visible (`visible`). Never put the result inside a
    code span: there the backslashes would show."""
    text = _AUTOLINK.sub(_WJ, visible("" if value is None else str(value)))
    text = _MD_PUNCT.sub(r"\\\1", text)
    # four leading spaces would start an indented code block
    return re.sub(r"^ +", lambda m: "\u00a0" * len(m.group()), text)


def escape_token(token: str) -> str:
    """display_token + html.escape: safe to put anywhere in HTML text or a quoted attribute."""
    return html.escape(display_token(token), quote=True)


def _alpha(value: float, max_value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value)) or value <= 0:
        return 0.0
    if not (math.isfinite(max_value) and max_value > 0):
        return 0.0
    return max(0.0, min(1.0, value / max_value))


def _span(shown: str, text: str, title_repr: str, value: float, max_value: float, rgb: tuple[int, int, int], focus: bool, title_prefix: str = "") -> str:
    # shown: the token's display form; text: it escaped for HTML; title_repr: repr(shown)
    a = _alpha(value, max_value)
    val = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else float("nan")
    title = html.escape(f"{title_prefix}{title_repr}: {val:.4g}", quote=True)
    cls = "sx-tok sx-focus" if focus else "sx-tok"
    if a <= 0:  # no background: most tokens of a window (and a third of the page's bytes)
        return f'<span class="{cls}" title="{title}">{text}</span>'
    style = f"background:rgba({rgb[0]},{rgb[1]},{rgb[2]},{0.85 * a:.3f})" + (";color:#fff" if a > 0.6 else "")
    return f'<span class="{cls}" style="{style}" title="{title}">{text}</span>'


def token_span(token: str, value: float, max_value: float, model: str = "base", focus: bool = False, title_prefix: str = "") -> str:
    """One highlighted token: background intensity = value / max_value in the model's colour."""
    shown, text, title_repr = _prep(token)
    return _span(shown, text, title_repr, value, max_value, MODEL_RGB.get(model, MODEL_RGB["base"]), focus, title_prefix)


@functools.lru_cache(maxsize=1 << 17)
def _prep(token: str | None) -> tuple[str, str, str]:
    """(display form, it escaped for HTML, its repr) of one token string: a vocabulary is finite
    and a page repeats its tokens, so each string is made visible and escaped once per process."""
    shown = display_token(token)
    return shown, html.escape(shown, quote=True), repr(shown)


def _prepared(tokens: Sequence[str]) -> list[tuple[str, str, str]]:
    return [_prep(t) for t in tokens]


def _highlight(prepared: Sequence[tuple[str, str, str]], values: Sequence[float], max_value: float, model: str, focus: int | None) -> str:
    rgb = MODEL_RGB.get(model, MODEL_RGB["base"])
    return "".join(_span(p[0], p[1], p[2], float(v), max_value, rgb, i == focus) for i, (p, v) in enumerate(zip(prepared, values)))


def highlight(
    tokens: Sequence[str], values: Sequence[float], max_value: float, model: str = "base", focus: int | None = None,
    titles: Sequence[str] | None = None, grouped: bool = False,
) -> str:
    """A sequence of highlighted tokens (no container); `titles` (e.g. "id 17 · piece 'Ġcaf'") go
    into each token's tooltip. `grouped`: empty tokens merge into the next one (module docstring)."""
    if titles is None and not grouped:
        return _highlight(_prepared(tokens), values, max_value, model, focus)
    out = []
    group: list[int] = []
    items = list(zip(tokens, values))
    rgb = MODEL_RGB.get(model, MODEL_RGB["base"])
    n = len(items)
    for i, (t, v) in enumerate(items):
        if grouped and t == "" and i + 1 < n:
            group.append(i)
            continue
        if not group:  # one token (most of them): the span directly
            shown, text, title_repr = _prep(t)
            out.append(_span(shown, text, title_repr, float(v), max_value, rgb, focus == i, f"{titles[i]} · " if titles is not None else ""))
            continue
        group.append(i)
        vals = [float(items[j][1]) for j in group]
        finite = [x for x in vals if math.isfinite(x)]
        value = max(finite) if finite else float("nan")
        prefix = ""
        if titles is not None and len(group) == 1:
            prefix = f"{titles[i]} · "
        elif titles is not None:  # a merged run: every piece with its own activation, then the run's largest
            prefix = " | ".join(f"{titles[j]}: {x:.4g}" for j, x in zip(group, vals)) + " · max of "
        out.append(token_span(t, value, max_value, model, focus=focus in group, title_prefix=prefix))
        group = []
    return "".join(out)


def example_block(
    tokens: Sequence[str],
    acts_by_model: dict[str, Sequence[float]],
    max_value: float,
    focus: int | None = None,
    caption: str | None = None,
    titles: Sequence[str] | None = None,
    grouped: bool = False,
) -> str:
    """One window, one line per model (same tokens), each in its model's colour."""
    lines = []
    prepared = _prepared(tokens)  # each token displayed and escaped once, for every line
    for model, values in acts_by_model.items():
        if values is None:
            continue
        vals = [float(v) for v in values]
        peak = max(vals) if vals else 0.0
        label = html.escape(str(model))
        lines.append(
            f'<div class="sx-ex" data-model="{html.escape(str(model), quote=True)}"><span class="sx-lbl">{label}</span>'
            f"{highlight(tokens, vals, max_value, model, focus, titles, grouped) if titles is not None or grouped else _highlight(prepared, vals, max_value, model, focus)}"
            f'<span class="sx-act">max {peak:.3g}</span></div>'
        )
    cap = f'<div class="sx-cap">{html.escape(caption)}</div>' if caption else ""
    return f'<div class="sx-block">{cap}{"".join(lines)}</div>'


def examples_html(blocks: Iterable[str], title: str | None = None) -> str:
    """Wrap example blocks with the stylesheet (one st.html call per list: fewer elements)."""
    head = f"<h5>{html.escape(title)}</h5>" if title else ""
    return CSS + head + "".join(blocks)


def token_list_html(tokens: Sequence[str], values: Sequence[float], model: str, fmt: str = "{:+.3f}") -> str:
    """A compact list of tokens with a number each (e.g. top logits), escaped."""
    r, g, b = MODEL_RGB.get(model, MODEL_RGB["base"])
    items = []
    for t, v in zip(tokens, values):
        items.append(
            f'<span class="sx-tok" style="background:rgba({r},{g},{b},0.15);margin-right:6px">{escape_token(t)}</span>'
            f'<span class="sx-act">{html.escape(fmt.format(float(v)))}</span>'
        )
    return CSS + "".join(f'<div class="sx-ex">{item}</div>' for item in items)
