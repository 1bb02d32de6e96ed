"""Streamlit glue shared by every page: the run picker, query params, errors, the run's store.

`explorer/` never imports streamlit; this module is where the app meets it. Stable API (the
live-probe page relies on it):

    runs_dir() -> Path
        Where runs live: $SAE_EXPLORER_RUNS_DIR, else explorer.rundir.DEFAULT_RUNS_DIR.

    run_picker() -> Run
        Renders the sidebar run picker (reads and writes `?run=`) and returns the chosen run
        (a `Run`: run_id, path, manifest). On a missing, incomplete, damaged or
        wrong-schema run it shows a friendly message and stops the page (st.stop()). Call it
        once, at the top of a page. `Run` is hashable (it is keyed on the manifest's mtime), so
        it can be passed to st.cache_data functions with `hash_funcs=HASH_FUNCS`.

    sae_param(run, key="sae", default="base_sae") -> str
        The SAE named by `?sae=`; an unknown name gets a warning and falls back to `default`
        (or the first SAE of the run).

    sae_picker(run, key, container=st, resets=()) -> str
        The SAE selectbox bound to `?sae=` (webapp.urlstate), with sae_param's warning.

    run_sources(run) -> list[str]; source_param(run) -> str | None
    source_picker(run, key, resets=()) -> str | None
        The run's source labels (manifest `sources`); the source named by `?source=` (None:
        all sources pooled; an unknown one gets a warning); the sidebar's source selectbox
        bound to `?source=` (drawn when the run has two sources or more).

    feature_param(run, sae, key="feature") -> int | None
        The feature id in `?feature=`; None when absent. Non-numeric, negative, out-of-range
        or huge values show a friendly st.error and return None.

    parse_feature_id(raw, d_sae) -> int | None
        The pure parser behind feature_param: raises QueryParamError (an ExplorerError).

    set_params(**params)
        Writes query params (None removes one) in one change of the URL, leaving the others
        alone (webapp.urlstate.write). Every other selection is bound with webapp.urlstate.

    show_error(exc)
        Shows an ExplorerError (or any exception) as a friendly message, never a traceback;
        the message is shown as text (explorer.render.inert).

    copy_link()
        The sidebar's "Copy link" button: copies the browser's current URL (every selection
        of the page is in it).

    fragment(func) / @fragment
        st.fragment whose body runs under guard() (use it instead of st.fragment).

    guard()
        A context manager for a page body: ExplorerError -> show_error + st.stop(); any other
        exception -> logged on the server, a generic friendly message shown, page stopped.
        Streamlit's own control flow (st.stop, st.rerun, st.switch_page) passes through.

    connection(run) -> duckdb.DuckDBPyConnection
        One in-memory DuckDB connection per run (st.cache_resource); take `.cursor()` per
        query.

    vocab(run) -> list[str]
        Token strings indexed by token id (st.cache_resource; unescaped: escape before HTML).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import streamlit as st

from explorer import rundir, schema
from explorer.errors import ExplorerError, RunError
from explorer.render import inert
from webapp import urlstate
from webapp.urlstate import clip as _clip

log = logging.getLogger("sae_explorer.app")

RUNS_DIR_ENV = "SAE_EXPLORER_RUNS_DIR"
DEFAULT_RUN_ID = "demo"
RUN_PARAM = "run"
SAE_PARAM = "sae"
FEATURE_PARAM = "feature"
_RUN_STATE = "sae_explorer_run_id"  # plain (non-widget) session key: survives page changes
_RUN_WIDGET = "sae_explorer_run_picker"


class QueryParamError(ExplorerError):
    """A query parameter in the URL cannot be used (wrong type, out of range, unknown name)."""


@dataclass(frozen=True)
class Run:
    """A validated run. Hashable and cheap to hash: st.cache_data keys on it."""

    run_id: str
    path: str
    token: tuple[int, int]  # (mtime_ns, size) of manifest.json: a rebuilt run gets a new key
    manifest: dict[str, Any] = field(compare=False, hash=False, repr=False)

    @property
    def dir(self) -> Path:
        return Path(self.path)

    @property
    def saes(self) -> list[str]:
        return [s for s in self.manifest.get("saes", []) if s in schema.SAES]

    def d_sae(self, sae: str) -> int:
        d = self.manifest.get("d_sae")
        try:
            return max(0, int(d.get(sae, 0))) if isinstance(d, dict) else 0
        except (TypeError, ValueError):  # a hand-edited manifest may hold anything
            return 0

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.get("config", {}) or {}

    @property
    def cache_key(self) -> tuple[str, str, tuple[int, int]]:
        return (self.run_id, self.path, self.token)


# Pass as `hash_funcs=` to st.cache_data functions that take a Run: keys on the run's identity
# and manifest version, never on the manifest's contents.
HASH_FUNCS = {Run: lambda run: run.cache_key}


def runs_dir() -> Path:
    env = os.environ.get(RUNS_DIR_ENV)
    return Path(env) if env else rundir.DEFAULT_RUNS_DIR


@st.cache_data(show_spinner=False, max_entries=64)
def _open_cached(path: str, token: tuple[int, int]) -> dict[str, Any]:
    return rundir.open_run(Path(path))


def open_run(run_id: str) -> Run:
    """Validate `run_id` (safe path, complete manifest, schema version, file hashes) -> Run."""
    path = rundir.run_path(run_id, runs_dir())
    manifest_path = path / schema.MANIFEST
    try:
        stat = manifest_path.stat()
        token = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        token = (0, 0)
    if not path.is_dir():
        raise RunError(f"There is no run called {run_id!r} in {runs_dir()}. Pick a run in the sidebar.")
    manifest = _open_cached(str(path), token)
    return Run(run_id=run_id, path=str(path), token=token, manifest=manifest)


def _on_run_change() -> None:
    chosen = st.session_state.get(_RUN_WIDGET)
    if chosen:
        st.session_state[_RUN_STATE] = chosen
        # a feature id of one run means nothing in another
        st.query_params.from_dict({RUN_PARAM: chosen})  # every other selection (sae, feature, source, ...) is the old run's


def _leave_pages_dir_mode() -> None:
    """Make a deep link work on a fresh server.

    Streamlit decides per process whether an app is a "pages/ directory" (v1) app from the mere
    existence of `pages/`, and only st.navigation (in app.py) switches that off. So the first
    request of a fresh server that is a deep link (/feature?...) runs pages/3_feature.py
    directly, without app.py: no navigation, no page config. Here a page notices that, switches
    the flag off, and reruns; the rerun goes through app.py and lands on the same url path
    (page hashes are computed from the url path, which is the same in both modes).
    """
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # pragma: no cover - a Streamlit without the v1 emulation
        return
    if getattr(PagesManager, "uses_pages_directory", False):
        PagesManager.uses_pages_directory = False
        st.rerun()


def run_picker() -> Run:
    """Sidebar run picker; returns the chosen Run or stops the page with a friendly message."""
    _leave_pages_dir_mode()
    urlstate.first_wins()
    runs = rundir.list_runs(runs_dir())
    requested = st.query_params.get(RUN_PARAM)
    problem: str | None = None
    chosen: str | None = None
    if requested is not None:
        if requested in runs:
            chosen = requested
        elif not rundir.RUN_ID_PATTERN.match(requested) or ".." in requested:
            problem = (
                f"{_clip(requested)} is not a valid run id: use letters, digits, '.', '_' and '-' "
                "(no path separators). Pick one of the runs in the sidebar."
            )
        else:
            try:
                path = rundir.run_path(requested, runs_dir())
                if path.is_dir():  # there, but no manifest: incomplete (precompute running or stopped)
                    rundir.open_run(path, verify_hashes=False)
                problem = f"There is no run called {_clip(requested)}. Pick one of the runs in the sidebar."
            except RunError as exc:
                problem = str(exc) + " Or pick one of the runs in the sidebar."
    else:
        remembered = st.session_state.get(_RUN_STATE)
        if remembered in runs:
            chosen = remembered
        elif DEFAULT_RUN_ID in runs:
            chosen = DEFAULT_RUN_ID
        elif runs:
            chosen = runs[0]

    with st.sidebar:
        if not runs:
            st.error(inert(
                f"No runs found in {runs_dir()}. Create one with "
                "python -m precompute run --config configs/demo.toml, or point "
                f"{RUNS_DIR_ENV} at a directory of runs."
            ))
            st.stop()
        st.session_state[_RUN_WIDGET] = chosen
        st.selectbox(
            "Run",
            runs,
            key=_RUN_WIDGET,
            on_change=_on_run_change,
            placeholder="Choose a run",
            help="A precompute run directory under the runs folder.",
        )
    if problem:
        st.error(inert(problem))
        st.stop()
    assert chosen is not None
    st.session_state[_RUN_STATE] = chosen
    if st.query_params.get(RUN_PARAM) != chosen:
        st.query_params[RUN_PARAM] = chosen
    try:
        run = open_run(chosen)
    except ExplorerError as exc:
        show_error(exc)
        st.stop()
    with st.sidebar:
        st.caption(inert(token_counts(run)))
        copy_link()
    return run


def _count(v: Any) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def token_counts(run: Run) -> str:
    """The run's token sample in words, with why the SAE statistics count fewer tokens: special
    tokens (BOS, ...) are left out of them (manifest n_counted_tokens vs n_tokens)."""
    n, counted = _count(run.manifest.get("n_tokens")), _count(run.manifest.get("n_counted_tokens"))
    if n is None:
        return "Token sample size unknown."
    text = f"{n:,} tokens in the sample"
    if counted is not None and counted != n:
        text += f"; {counted:,} count for the SAE and feature statistics ({n - counted:,} special tokens such as BOS left out, as SAELens evals do)"
    return text + "."


_COPY_LINK_HTML = """<!doctype html><html><body style="margin:0;font-family:sans-serif">
<button id="copy" type="button" style="font:inherit;font-size:14px;padding:4px 10px;border:1px solid #ccc;border-radius:6px;background:#fff;cursor:pointer">Copy link to this view</button>
<span id="done" style="font-size:12px;color:#555;margin-left:6px"></span>
<script>
const done = document.getElementById('done');
document.getElementById('copy').addEventListener('click', async () => {
  const url = window.parent.location.href;
  let ok = false;
  try { await navigator.clipboard.writeText(url); ok = true; } catch (e) {
    const t = document.createElement('textarea'); t.value = url; document.body.appendChild(t); t.select();
    try { ok = document.execCommand('copy'); } catch (e2) { ok = false; }
    t.remove();
  }
  done.textContent = ok ? 'Copied' : url;
  setTimeout(() => { done.textContent = ''; }, 4000);
});
</script></body></html>"""


def copy_link() -> None:
    """A button that copies the browser's current URL: every selection of the page is in its
    query string (webapp.urlstate), so the link reopens this view. Constant HTML, no data."""
    st.iframe(_COPY_LINK_HTML, height=40)


def parse_feature_id(raw: Any, d_sae: int) -> int | None:
    """`?feature=` -> a feature id in [0, d_sae), None when absent/empty; QueryParamError otherwise."""
    if raw is None:
        return None
    text = str(raw).strip()
    if text == "":
        return None
    digits = text[1:] if text[:1] in "+-" else text
    if not (digits.isascii() and digits.isdigit()):
        raise QueryParamError(f"Feature {_clip(raw)} is not a feature number: use a whole number from 0 to {d_sae - 1}.")
    if text.startswith("-") and digits.strip("0"):
        raise QueryParamError(f"Feature {_clip(text)} is negative: feature numbers run from 0 to {d_sae - 1}.")
    value = int(digits) if len(digits) <= 18 else 10**18
    if value >= d_sae:
        raise QueryParamError(f"Feature {_clip(digits)} is out of range: this SAE has {d_sae} features (0 to {d_sae - 1}).")
    return value


def sae_param(run: Run, key: str = SAE_PARAM, default: str = "base_sae") -> str:
    saes = run.saes or [default]
    fallback = default if default in saes else saes[0]
    raw = st.query_params.get(key)
    if raw is None or raw == "":
        return fallback
    if raw not in saes:
        st.warning(inert(_unknown_sae(run, raw, fallback)))
        return fallback
    return raw


def _unknown_sae(run: Run, raw: Any, fallback: str) -> str:
    return f"SAE {_clip(raw)} is not in run {run.run_id!r} (it has {', '.join(run.saes)}); showing {fallback}."


def sae_picker(run: Run, key: str, container: Any = st, resets: tuple[str, ...] = (), saes: list[str] | None = None, **kwargs: Any) -> str:
    """The SAE selectbox (of `saes`, default the run's), bound to `?sae=` (an unknown SAE:
    sae_param's warning, then the default)."""
    from explorer.figures import SAE_LABELS

    saes = list(saes or run.saes or ["base_sae"])
    default = "base_sae" if "base_sae" in saes else saes[0]
    return urlstate.widget(
        container.selectbox, SAE_PARAM, "SAE", saes, key=key, default=default, codec=urlstate.choice(saes), resets=resets, always=True,
        invalid=lambda raw, _: _unknown_sae(run, raw, default), format_func=lambda s: SAE_LABELS.get(s, s), **kwargs,
    )


SOURCE_PARAM = "source"
ALL_SOURCES = "all sources"


def run_sources(run: Run) -> list[str]:
    """The run's source labels (the manifest's `sources`), sorted."""
    src = run.manifest.get("sources") or {}
    return sorted(str(s) for s in src) if isinstance(src, dict) else []


def _unknown_source(run: Run, raw: Any) -> str:
    return f"Source {_clip(raw)} is not in run {run.run_id!r} (it has {', '.join(run_sources(run)) or 'none'}); showing all sources."


def source_param(run: Run, key: str = SOURCE_PARAM) -> str | None:
    """The source named by `?source=` (None: all sources pooled); an unknown one gets a warning
    and is removed from the URL."""
    return urlstate.read(key, urlstate.choice(run_sources(run)), None, invalid=lambda raw, _: _unknown_source(run, raw))


def source_picker(run: Run, key: str, resets: tuple[str, ...] = ()) -> str | None:
    """The sidebar's source selectbox ("all sources" first), bound to `?source=` (webapp.urlstate;
    `resets`: the page's pager parameters); returns the source, or None for all sources pooled.
    A run with fewer than two sources draws no picker (a `?source=` still applies). `key`: one
    per page (a widget key shared by two pages loses its value when the page changes)."""
    sources = run_sources(run)
    if len(sources) < 2:
        return source_param(run)
    return urlstate.widget(
        st.sidebar.selectbox, SOURCE_PARAM, "Source", [None, *sources], key=key, default=None, codec=urlstate.choice(sources), resets=resets,
        invalid=lambda raw, _: _unknown_source(run, raw), format_func=lambda s: ALL_SOURCES if s is None else s,
        help="Every statistic on this page on one source's tokens alone, or pooled over all.",
    )


def feature_param(run: Run, sae: str, key: str = FEATURE_PARAM) -> int | None:
    try:
        return parse_feature_id(st.query_params.get(key), run.d_sae(sae))
    except QueryParamError as exc:
        show_error(exc)
        return None


def set_params(**params: Any) -> None:
    urlstate.write(params)


def show_error(exc: BaseException) -> None:
    if isinstance(exc, ExplorerError):
        st.error(inert(str(exc)), icon=":material/error:")
    else:
        st.error(
            "Something went wrong while building this view. The details are in the server log; "
            "try another selection or reload the page.",
            icon=":material/error:",
        )


@contextlib.contextmanager
def guard() -> Iterator[None]:
    try:
        yield
    except ExplorerError as exc:
        show_error(exc)
        st.stop()
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback reaches a user
        log.exception("unexpected error in a page")
        show_error(exc)
        st.stop()


def fragment(func: Callable[..., Any] | None = None, **kwargs: Any):
    """`st.fragment` whose body runs under guard(): an error inside a fragment gets the same
    friendly message as one in the page (Streamlit would otherwise show its own error box)."""

    def wrap(f: Callable[..., Any]):
        @functools.wraps(f)
        def body(*a: Any, **kw: Any) -> Any:
            with guard():
                return f(*a, **kw)

        return st.fragment(body, **kwargs)

    return wrap(func) if func is not None else wrap


@st.cache_resource(show_spinner=False, max_entries=16)
def _connection(path: str, token: tuple[int, int]):
    from explorer import store

    return store.connect()


def connection(run: Run):
    return _connection(run.path, run.token)


@st.cache_resource(show_spinner=False, max_entries=16)
def _vocab(path: str, token: tuple[int, int]) -> list[str]:
    from explorer import store

    return store.vocab(Path(path))


def vocab(run: Run) -> list[str]:
    return _vocab(run.path, run.token)


@st.cache_resource(show_spinner=False, max_entries=16)
def _vocab_forms(path: str, token: tuple[int, int]):
    from explorer import store

    return store.vocab_forms(Path(path))


def vocab_forms(run: Run):
    """explorer.tokens.Vocab of the run: grouped window display and hover titles."""
    return _vocab_forms(run.path, run.token)
