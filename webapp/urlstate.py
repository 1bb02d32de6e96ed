"""Every selection of every page lives in the query string: one mechanism, one rule.

    sort = urlstate.widget(st.selectbox, "sort", "Sort by", options, key="features_sort",
                           default="feature_id", codec=urlstate.choice(options), format_func=...)

binds a widget to the query parameter `sort`:

* on every run the widget's value is set from the URL before the widget is drawn, so a shared
  link, a reload and the browser's Back and Forward buttons all restore it. A missing parameter
  gives `default`; an unusable one (not a number, out of range, not one of the choices) gives a
  warning, the default, and is removed from the URL;
* when the user changes the widget, its on_change callback writes the new value to the URL in
  one change (one browser-history entry), removes the parameter when the value is the default,
  and removes the parameters named in `resets` (e.g. the page number when a filter changes).

Adding a selection to the URL is that one call (a page's new "source" picker would be
`urlstate.widget(st.selectbox, "source", "Source", sources, key=..., default=None,
codec=urlstate.choice(sources))`). Codecs: `text`, `choice`, `choices` (several, joined
with "~"), `integer`, `number`, `flag`, `span` (a range "lo~hi").

Repeated parameters (`?run=a&run=b`): the first value wins, everywhere, and the URL is
rewritten to match (`first_wins`, called by webapp.state.run_picker at the top of every page).

`write(...)` and `read(...)` are the plain forms for selections that are not one widget (the
feature page's feature id, the live probe's prompt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import streamlit as st

from explorer.render import inert, visible

MAX_PARAM_CHARS = 40  # of a URL value quoted in a message
SEP = "~"  # joins several values (unreserved in URLs: not percent-encoded)


def clip(raw: Any) -> str:
    """A value from the URL for a message: clipped, quoted, control characters visible.
    Unescaped: the message goes through `inert` when it is shown (webapp.state.show_error)."""
    text = str(raw)
    text = text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS] + "…"
    return "‘" + visible(text) + "’"


# ---------------------------------------------------------------------------- the URL


def first_wins() -> None:
    """A parameter given several times keeps its first value; the URL is rewritten to match."""
    qp = st.query_params
    repeated = {k: qp.get_all(k)[0] for k in list(qp) if len(qp.get_all(k)) > 1}
    if repeated:
        qp.from_dict({k: repeated.get(k, qp.get(k)) for k in list(qp)})


def write(updates: Mapping[str, Any]) -> None:
    """Set (str(value)) or remove (None) several parameters in ONE change of the URL."""
    qp = st.query_params
    current = {k: qp.get(k) for k in list(qp)}
    new = dict(current)
    for k, v in updates.items():
        if v is None:
            new.pop(k, None)
        else:
            new[k] = str(v)
    if new != current:
        qp.from_dict(new)


def read(param: str, codec: "Codec", default: Any, invalid: Callable[[str, str], str] | None = None, quiet: bool = False) -> Any:
    """The parameter's value through `codec`; `default` when absent. An unusable value gets a
    warning (`invalid(raw, reason)` builds it; `quiet` shows none) and is removed from the URL."""
    raw = st.query_params.get(param)
    if raw is None or raw == "":
        return default
    try:
        return codec.parse(raw)
    except ValueError as exc:
        if not quiet:
            msg = invalid(raw, str(exc)) if invalid else f"The link's {param} {clip(raw)} cannot be used here ({exc}); showing the default."
            st.warning(inert(msg), icon=":material/link_off:")
        write({param: None})
        return default


def widget(fn: Callable[..., Any], param: str, *args: Any, key: str, default: Any, codec: "Codec",
           resets: Iterable[str] = (), invalid: Callable[[str, str], str] | None = None, quiet: bool = False,
           always: bool = False, on_change: Callable[[], None] | None = None, **kwargs: Any) -> Any:
    """Draw widget `fn(*args, key=key, **kwargs)` (its label first, as Streamlit takes it) bound
    to query parameter `param` (see the module docstring). Returns the widget's value. Pass no
    default value to `fn`: it comes from the URL (or `default`) through st.session_state.
    `always`: write the value even when it is the default (the SAE: links always name it)."""
    value = codec.norm(read(param, codec, default, invalid, quiet))
    if key not in st.session_state or codec.norm(st.session_state[key]) != value:
        st.session_state[key] = codec.widget(value)  # only when it differs: a set value is a "new" value to Streamlit
    reset = tuple(resets)

    def changed() -> None:
        v = codec.norm(st.session_state.get(key))
        write({param: None if v == codec.norm(default) and not always else codec.dump(v), **{r: None for r in reset}})
        if on_change is not None:
            on_change()

    return fn(*args, key=key, on_change=changed, **kwargs)


# ---------------------------------------------------------------------------- codecs


@dataclass(frozen=True)
class Codec:
    """parse: URL text -> value (ValueError when unusable); dump: value -> URL text; norm: the
    widget's value -> the canonical value (lists -> tuples); widget: canonical -> what the
    widget takes."""

    parse: Callable[[str], Any]
    dump: Callable[[Any], str]
    norm: Callable[[Any], Any] = lambda v: v
    widget: Callable[[Any], Any] = lambda v: v


def text(max_chars: int = 200) -> Codec:
    def parse(raw: str) -> str:
        if len(raw) > max_chars:
            raise ValueError(f"longer than {max_chars} characters")
        return raw

    return Codec(parse, str, norm=lambda v: "" if v is None else str(v))


def choice(options: Iterable[Any]) -> Codec:
    opts = list(options)
    by_text = {str(o): o for o in opts}

    def parse(raw: str) -> Any:
        if raw not in by_text:
            raise ValueError("not one of " + ", ".join(by_text))
        return by_text[raw]

    return Codec(parse, str)


def choices(options: Iterable[str]) -> Codec:
    allowed = [str(o) for o in options]

    def parse(raw: str) -> tuple[str, ...]:
        vals = tuple(dict.fromkeys(v for v in raw.split(SEP) if v))
        bad = [v for v in vals if v not in allowed]
        if bad:
            raise ValueError(f"{clip(bad[0])} is not one of " + ", ".join(allowed))
        return vals

    return Codec(parse, SEP.join, norm=lambda v: tuple(v or ()), widget=list)


def integer(lo: int, hi: int) -> Codec:
    def parse(raw: str) -> int:
        t = raw.strip()
        digits = t[1:] if t[:1] in "+-" else t
        if not (digits.isascii() and digits.isdigit()) or len(digits) > 18:
            raise ValueError("not a whole number")
        v = int(t)
        if not lo <= v <= hi:
            raise ValueError(f"outside {lo} to {hi}")
        return v

    return Codec(parse, lambda v: str(int(v)), norm=lambda v: None if v is None else int(v))


def _float(raw: str) -> float:
    if len(raw) > 32:
        raise ValueError("not a number")
    v = float(raw)  # ValueError on text
    if not math.isfinite(v):
        raise ValueError("not a finite number")
    return v


def _num_text(v: float) -> str:
    return format(float(v), ".6g")


def number(lo: float, hi: float) -> Codec:
    def parse(raw: str) -> float:
        v = _float(raw)
        if not lo <= v <= hi:
            raise ValueError(f"outside {lo:g} to {hi:g}")
        return v

    return Codec(parse, _num_text, norm=lambda v: None if v is None else float(v))


def flag() -> Codec:
    def parse(raw: str) -> bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError("use 1 or 0")

    return Codec(parse, lambda v: "1" if v else "0", norm=bool)


def span(lo: float, hi: float) -> Codec:
    def parse(raw: str) -> tuple[float, float]:
        parts = raw.split(SEP)
        if len(parts) != 2:
            raise ValueError(f"use low{SEP}high")
        a, b = _float(parts[0]), _float(parts[1])
        if not lo <= a <= b <= hi:
            raise ValueError(f"use {lo:g} <= low <= high <= {hi:g}")
        return a, b

    return Codec(parse, lambda v: f"{_num_text(v[0])}{SEP}{_num_text(v[1])}", norm=lambda v: (float(v[0]), float(v[1])))
