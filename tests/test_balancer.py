"""`sae-transfer app --workers N`: sae_transfer.balancer in front of N Streamlit processes.

Unit tests drive the balancer over real sockets against small HTTP backends that answer with
their own index; the end-to-end test starts the real command with 2 workers and opens pages
through it with the websocket protocol client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from sae_transfer import balancer
from tests.browser_utils import REPO, free_port, streamlit_server


def test_the_affinity_cookie_is_read_from_the_request_head():
    head = b"GET / HTTP/1.1\r\nHost: x\r\nCookie: a=1; sx_worker=2; b=3\r\n\r\n"
    assert balancer.worker_from_head(head, 3) == 2
    assert balancer.worker_from_head(head, 2) is None  # out of range: a stale cookie from a larger pool
    assert balancer.worker_from_head(b"GET / HTTP/1.1\r\ncookie: sx_worker=0\r\n\r\n", 2) == 0  # header names are case-insensitive
    assert balancer.worker_from_head(b"GET / HTTP/1.1\r\nCookie: my_sx_worker=1\r\n\r\n", 2) is None
    assert balancer.worker_from_head(b"GET /?sx_worker=1 HTTP/1.1\r\n\r\n", 2) is None  # only the Cookie header counts
    assert balancer.with_cookie(b"HTTP/1.1 200 OK\r\n", 1) == b"HTTP/1.1 200 OK\r\nSet-Cookie: sx_worker=1; Path=/; HttpOnly; SameSite=Lax\r\n"


async def _backend(index: int, hold: asyncio.Event | None = None):
    """An HTTP/1.1 server answering every request with its index; with `hold`, it keeps each
    connection open until the event is set (a long-lived connection, like a websocket)."""

    async def handle(reader, writer):
        try:
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                body = str(index).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                if hold is not None:
                    await hold.wait()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _get(port: int, cookie: str | None = None) -> tuple[str, dict[str, str], asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n" + (f"Cookie: {cookie}\r\n".encode() if cookie else b"") + b"\r\n")
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    lines = head.split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ": " in line:
            k, v = line.split(": ", 1)
            headers.setdefault(k.lower(), v)
    body = await reader.readexactly(int(headers["content-length"]))
    return body.decode(), headers, writer


def test_sessions_spread_over_workers_and_stick_by_cookie():
    async def main():
        hold = asyncio.Event()
        servers = [await _backend(i, hold) for i in range(2)]
        port = free_port()
        started = asyncio.Event()
        task = asyncio.create_task(balancer.serve([("127.0.0.1", p) for _, p in servers], "127.0.0.1", port, started))
        await started.wait()
        try:
            # two long-lived connections without a cookie: one on each worker, each told its worker
            b1, h1, w1 = await _get(port)
            b2, h2, w2 = await _get(port)
            assert {b1, b2} == {"0", "1"}
            assert h1["set-cookie"].startswith(f"sx_worker={b1};") and h2["set-cookie"].startswith(f"sx_worker={b2};")
            # connections arriving together see each other (each is counted before its connect
            # is awaited): 4 more at once, 2 on each worker
            burst = await asyncio.gather(*(_get(port) for _ in range(4)))
            assert sorted(b for b, _, _ in burst) == ["0", "0", "1", "1"]
            for _, _, w in burst:
                w.close()
            # with the cookie: that worker, however loaded, and no new cookie
            for want in ("0", "1", "1"):
                b, h, w = await _get(port, f"other=x; sx_worker={want}")
                assert b == want and "set-cookie" not in h
                w.close()
            # a stale cookie (a worker that does not exist) is replaced
            b, h, w = await _get(port, "sx_worker=7")
            assert h["set-cookie"].startswith(f"sx_worker={b};")
            for w_ in (w, w1, w2):
                w_.close()
            # a worker that is gone is skipped, for a cookie naming it too
            servers[0][0].close()
            await servers[0][0].wait_closed()
            hold.set()
            b, h, w = await _get(port, "sx_worker=0")
            assert b == "1" and h["set-cookie"].startswith("sx_worker=1;")
            w.close()
            # none left: 502
            servers[1][0].close()
            await servers[1][0].wait_closed()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 502")
            writer.close()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(main())


def test_a_client_that_sends_no_request_head_is_dropped(monkeypatch):
    monkeypatch.setattr(balancer, "HEAD_TIMEOUT_S", 0.5)

    async def main():
        server, bport = await _backend(0)
        port = free_port()
        started = asyncio.Event()
        task = asyncio.create_task(balancer.serve([("127.0.0.1", bport)], "127.0.0.1", port, started))
        await started.wait()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\n")  # never finished
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing relayed
            body, _, w = await _get(port)  # the balancer still serves others
            assert body == "0"
            w.close()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            server.close()

    asyncio.run(main())


def test_app_with_two_workers_serves_pages_and_stops_with_a_dead_worker(runs_dir_demo):
    from tests.st_protocol import Session

    async def pages(url):
        async with Session(url, timeout=180) as a, Session(url, timeout=180) as b:  # two sessions at once: one on each worker
            ra, rb = await asyncio.gather(a.open("feature", "run=demo&sae=base_sae&feature=5"), b.open("features", "run=demo"))
            assert not ra.errors and any("feature 5" in t for t in ra.texts())
            assert not rb.errors and any("features match" in t for t in rb.texts())

    with streamlit_server(runs_dir=runs_dir_demo, timeout=180, workers=2) as url:
        with urllib.request.urlopen(url + "/_stcore/health", timeout=10) as r:
            assert r.status == 200 and "sx_worker=" in (r.headers.get("Set-Cookie") or "")
        asyncio.run(pages(url))
        port = int(url.rsplit(":", 1)[1])
        from benchmarks.load_protocol import server_pid, tree_pids

        root = server_pid(port)
        workers = [p for p in tree_pids(root) if p != root]
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(p) for p in (root, workers[1])):
            time.sleep(0.3)
        assert not _alive(root) and not _alive(workers[1])  # the command stopped, and took the other worker down


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_out_of_range_is_a_clear_error(runs_dir_demo):
    r = subprocess.run([sys.executable, "-m", "sae_transfer.cli", "app", "--workers", "0", "--runs-dir", str(runs_dir_demo)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--workers must be between 1 and 64" in r.stderr and "Traceback" not in r.stderr


def test_a_busy_port_is_a_clear_error_before_any_worker_starts(runs_dir_demo):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "sae_transfer.cli", "app", "--workers", "2", "--port", str(port), "--runs-dir", str(runs_dir_demo)],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 30


@pytest.fixture
def runs_dir_demo():
    return REPO / "data" / "runs"
