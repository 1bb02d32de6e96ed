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
codec=urlstate.choice(sources))`). Codecs (explorer/params.py, without Streamlit, so the
command line reads the same links): `text`, `choice`, `choices` (several, joined with "~"),
`integer`, `number`, `flag`, `span` (a range "lo~hi").

Repeated parameters (`?run=a&run=b`): the first value wins, everywhere, and the URL is
rewritten to match (`first_wins`, called by webapp.state.run_picker at the top of every page).

`write(...)` and `read(...)` are the plain forms for selections that are not one widget (the
feature page's feature id, the live probe's prompt).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import streamlit as st

from explorer.params import MAX_PARAM_CHARS, SEP, Codec, choice, choices, clip, flag, integer, number, span, text  # noqa: F401 (the codecs, re-exported)
from explorer.render import inert



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
