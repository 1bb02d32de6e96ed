"""A Streamlit client that speaks the app's websocket protocol, without a browser.

What the browser's frontend does, reduced to what a test or a load test needs: connect to
`ws://HOST:PORT/_stcore/stream` (subprotocol "streamlit"), send a BackMsg `rerun_script`
(ClientState: query string, page name or page script hash, widget states), and read ForwardMsgs
until `script_finished` (a run that ends early for a rerun, e.g. st.switch_page, is followed to
the run that finishes). Like the browser, the client keeps the URL's query string the server
writes (page_info_changed), the page it is on (navigation.page_script_hash) and the widget
states it has sent.

    async with Session("http://127.0.0.1:8501") as s:
        r = await s.open("feature", "run=demo&sae=base_sae&feature=3")   # like a deep link
        r.ok, r.seconds, r.status, r.errors, r.query_string
        box = r.widget(key="f_search")                                    # by its key
        r = await s.set_widgets({box.id: text("def")})                    # a rerun with a widget change

Used by tests/test_protocol.py (the server's answers to URLs) and benchmarks/load_protocol.py.
Synchronous use: `run_sync(coro)`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

FINISHED = {
    ForwardMsg.ScriptFinishedStatus.FINISHED_SUCCESSFULLY: "finished",
    ForwardMsg.ScriptFinishedStatus.FINISHED_WITH_COMPILE_ERROR: "compile_error",
    ForwardMsg.ScriptFinishedStatus.FINISHED_EARLY_FOR_RERUN: "rerun",
    ForwardMsg.ScriptFinishedStatus.FINISHED_FRAGMENT_RUN_SUCCESSFULLY: "fragment_finished",
}


@dataclass
class Widget:
    id: str
    kind: str  # the element type, e.g. "text_input"
    label: str
    proto: Any = field(repr=False)


@dataclass
class RunResult:
    """One script run as the client saw it (with any reruns it triggered)."""

    seconds: float
    status: str  # finished | compile_error | fragment_finished | timeout | closed
    n_messages: int
    n_runs: int  # script runs it took (st.switch_page / st.rerun add one each)
    page_not_found: bool
    elements: list[Any] = field(repr=False)  # Element protos (new_element), in order
    layouts: list[Any] = field(repr=False)  # (element type, height_config) per element
    alerts: list[tuple[str, str]] = field(repr=False)  # (format, body)
    exceptions: list[str] = field(repr=False)
    query_string: str = ""
    page_script_hash: str = ""

    @property
    def errors(self) -> list[str]:
        """What a user would see as a failure: an exception box, an error alert, a missing page."""
        out = [f"exception: {m}" for m in self.exceptions]
        out += [f"error alert: {b[:200]}" for f, b in self.alerts if f == "ERROR"]
        if self.page_not_found:
            out.append("page not found")
        if self.status not in ("finished", "fragment_finished"):
            out.append(f"script {self.status}")
        return out

    @property
    def ok(self) -> bool:
        return not self.errors

    def of_type(self, kind: str) -> list[Any]:
        return [getattr(e, kind) for e in self.elements if e.WhichOneof("type") == kind]

    def widgets(self) -> list[Widget]:
        out = []
        for e in self.elements:
            kind = e.WhichOneof("type")
            w = getattr(e, kind) if kind else None
            if w is not None and hasattr(w, "id") and w.id:
                out.append(Widget(w.id, kind, getattr(w, "label", ""), w))
        return out

    def widget(self, key: str | None = None, label: str | None = None) -> Widget:
        """The widget whose user key is `key` (its id ends with "-key"), or whose label is `label`."""
        for w in self.widgets():
            if (key is not None and w.id.endswith("-" + key)) or (label is not None and w.label == label):
                return w
        raise KeyError(f"no widget with key={key!r} label={label!r} among {[w.id for w in self.widgets()]}")

    def texts(self) -> list[str]:
        """Markdown bodies, headings and alert bodies (what the page says)."""
        out = []
        for e in self.elements:
            kind = e.WhichOneof("type")
            if kind in ("markdown", "heading", "alert"):
                out.append(getattr(e, kind).body)
        return out


def text(value: str) -> dict:
    return {"string_value": value}


def trigger() -> dict:
    return {"trigger_value": True}


def ws_url(base_url: str) -> str:
    return base_url.replace("http://", "ws://", 1).rstrip("/") + "/_stcore/stream"


class Session:
    """One browser-less session (one websocket); not safe to share between tasks."""

    def __init__(self, base_url: str, timeout: float = 120.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.ws = None
        self.query_string = ""
        self.page_script_hash = ""
        self.widget_states: dict[str, dict] = {}

    async def __aenter__(self) -> "Session":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        import websockets

        self.ws = await websockets.connect(
            ws_url(self.base_url), subprotocols=["streamlit"], origin=self.base_url, max_size=None,
            open_timeout=self.timeout, ping_interval=None, compression=None,
        )

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
            self.ws = None

    async def open(self, page: str, query_string: str = "") -> RunResult:
        """Load `/<page>?<query_string>` as a fresh browser tab would (page "" is the main page);
        widget states are forgotten, as on a page load."""
        self.widget_states = {}
        self.query_string = query_string
        return await self._rerun(page_name=page, page_script_hash="")

    async def rerun(self, query_string: str | None = None) -> RunResult:
        """Rerun the current page (with a new query string, as after Back / Forward)."""
        if query_string is not None:
            self.query_string = query_string
        return await self._rerun(page_script_hash=self.page_script_hash)

    async def set_widgets(self, changes: dict[str, dict]) -> RunResult:
        """Rerun the current page with widget values changed (`{id: text("x")}` and the like);
        a trigger (a button) is sent once, the other values are kept for later reruns."""
        states = {**self.widget_states, **changes}
        result = await self._rerun(page_script_hash=self.page_script_hash, widgets=states)
        self.widget_states.update({k: v for k, v in changes.items() if "trigger_value" not in v})
        return result

    async def _rerun(self, page_name: str = "", page_script_hash: str = "", widgets: dict[str, dict] | None = None) -> RunResult:
        msg = BackMsg()
        cs = msg.rerun_script
        cs.query_string = self.query_string
        cs.page_name = page_name
        cs.page_script_hash = page_script_hash
        cs.context_info.url = f"{self.base_url}/{page_name}"
        for wid, value in (widgets or {}).items():
            w = cs.widget_states.widgets.add()
            w.id = wid
            for name, v in value.items():
                setattr(w, name, v)
        t0 = time.perf_counter()
        await self.ws.send(msg.SerializeToString())
        return await self._read_until_finished(t0)

    async def _read_until_finished(self, t0: float) -> RunResult:
        elements, layouts, alerts, exceptions = [], [], [], []
        n, runs, not_found, status = 0, 0, False, "timeout"
        deadline = t0 + self.timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                raw = await asyncio.wait_for(self.ws.recv(), timeout=left)
            except asyncio.TimeoutError:
                break
            except Exception:  # noqa: BLE001 - the connection closed
                status = "closed"
                break
            fm = ForwardMsg()
            fm.ParseFromString(raw)
            n += 1
            kind = fm.WhichOneof("type")
            if kind == "new_session":
                runs += 1
                elements, layouts, alerts, exceptions = [], [], [], []  # a new run redraws the page
            elif kind == "navigation" and fm.navigation.page_script_hash:
                self.page_script_hash = fm.navigation.page_script_hash  # the page st.navigation ran
            elif kind == "delta" and fm.delta.WhichOneof("type") == "new_element":
                el = fm.delta.new_element
                t = el.WhichOneof("type")
                elements.append(el)
                layouts.append((t, el.height_config))
                if t == "alert":
                    alerts.append((el.alert.DESCRIPTOR.enum_types_by_name["Format"].values_by_number[el.alert.format].name, el.alert.body))
                elif t == "exception":
                    exceptions.append(f"{el.exception.type}: {el.exception.message}"[:300])
            elif kind == "page_info_changed":
                self.query_string = fm.page_info_changed.query_string
            elif kind == "page_not_found":
                not_found = True
            elif kind == "script_finished":
                status = FINISHED.get(fm.script_finished, str(fm.script_finished))
                if status != "rerun":
                    break
        return RunResult(
            seconds=time.perf_counter() - t0, status=status, n_messages=n, n_runs=runs, page_not_found=not_found,
            elements=elements, layouts=layouts, alerts=alerts, exceptions=exceptions,
            query_string=self.query_string, page_script_hash=self.page_script_hash,
        )


def run_sync(coro):
    """Run `coro` to completion from synchronous code; in a thread of its own when this thread
    already runs an event loop (Playwright's sync API does, in the browser tests' session)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import threading

    out: dict = {}

    def target() -> None:
        try:
            out["value"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = exc

    t = threading.Thread(target=target, name="st_protocol.run_sync")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def params(query_string: str) -> dict[str, list[str]]:
    from urllib.parse import parse_qs

    return parse_qs(query_string, keep_blank_values=True)


def widget_ids(result: RunResult, keys: Iterable[str]) -> dict[str, str]:
    return {k: result.widget(key=k).id for k in keys}
