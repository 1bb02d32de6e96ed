"""Query-parameter codecs: how a page's selection is written in a URL and read back (no
Streamlit here). webapp/urlstate.py binds widgets to parameters with them; the command line's
exports (explorer/features_view.py) read the same links.

A codec's `parse` turns URL text into a value (ValueError, with the reason, when it cannot be
used), `dump` writes a value as URL text, `norm` maps a widget's value to the canonical one
(lists -> tuples), `widget` the canonical value to what the widget takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from explorer.render import visible

MAX_PARAM_CHARS = 40  # of a URL value quoted in a message
SEP = "~"  # joins several values (unreserved in URLs: not percent-encoded)


def clip(raw: Any) -> str:
    """A value from the URL for a message: clipped, quoted, control characters visible.
    Unescaped: the message goes through `inert` when it is shown (webapp.state.show_error)."""
    text = str(raw)
    text = text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS] + "…"
    return "‘" + visible(text) + "’"


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


def choices(options: Iterable[str], empty: str | None = None) -> Codec:
    """Several of `options`, joined with SEP. `empty`: the URL text of no choice at all, for a
    widget whose default is not empty (an absent parameter gives the default)."""
    allowed = [str(o) for o in options]

    def parse(raw: str) -> tuple[str, ...]:
        if empty is not None and raw == empty:
            return ()
        vals = tuple(dict.fromkeys(v for v in raw.split(SEP) if v))
        bad = [v for v in vals if v not in allowed]
        if bad:
            raise ValueError(f"{clip(bad[0])} is not one of " + ", ".join(allowed))
        return vals

    def dump(v: Any) -> str:
        return SEP.join(v) if v or empty is None else empty

    return Codec(parse, dump, norm=lambda v: tuple(v or ()), widget=list)


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
