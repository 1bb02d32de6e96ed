"""Several Streamlit processes behind one address: `sae-transfer app --workers N`.

One Streamlit server runs every session's script in one Python process, so it uses one core
(the GIL) however many the machine has: at 25 concurrent sessions on the demo run that core was
full (benchmarks/RESULTS.md, "Load (server)"). This module puts N worker processes (each a plain
`streamlit run app.py` on a private 127.0.0.1 port) behind one listening address:

* **A connection goes to one worker for its whole life** (TCP bytes are relayed both ways, so
  HTTP keep-alive, the websocket `/_stcore/stream` and its frames are untouched). The worker is
  chosen when the connection's first request head has arrived.
* **A browser sticks to one worker.** The first response to a request without the affinity
  cookie gets `Set-Cookie: sx_worker=<i>`; later connections that send it go to worker i. A
  session's websocket, its downloads (`/media/...`, kept in the memory of the process that made
  them) and its uploads therefore reach the process that holds the session. Every selection of
  the app is in its URL, so a browser moved to another worker (one that restarted) loses nothing
  but its caches.
* **Without the cookie, the worker with the fewest open connections** takes it (a websocket is
  one long connection, so this spreads sessions; clients that keep no cookies, like the load
  test's, are spread the same way).
* A worker that refuses the connection is skipped (the next one is tried); the client gets a 502
  only if none answers.

The workers share `server.cookieSecret` (so XSRF tokens made by one validate on all) and the
runs folder; each loads its own models for the Live probe (N x the models' memory).
Nothing here imports Streamlit.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass, field

COOKIE = "sx_worker"
HEAD_LIMIT = 64 * 1024  # bytes of request head before we give up on a client
HEAD_TIMEOUT_S = 30.0
CHUNK = 64 * 1024
_COOKIE_RE = re.compile(rb"(?im)^cookie:[^\r\n]*?\b" + COOKIE.encode() + rb"=(\d+)")


def worker_from_head(head: bytes, n_workers: int) -> int | None:
    """The worker index a request head's affinity cookie names, or None (absent, not a number,
    out of range)."""
    m = _COOKIE_RE.search(head)
    if m is None:
        return None
    i = int(m.group(1))
    return i if 0 <= i < n_workers else None


def with_cookie(status_line: bytes, worker: int) -> bytes:
    """The response's status line followed by the affinity cookie header."""
    return status_line + f"Set-Cookie: {COOKIE}={worker}; Path=/; HttpOnly; SameSite=Lax\r\n".encode()


@dataclass
class Balancer:
    """Relays each client connection to one of `backends` ((host, port) of the workers)."""

    backends: list[tuple[str, int]]
    open_connections: list[int] = field(init=False)
    served: list[int] = field(init=False)

    def __post_init__(self) -> None:
        if not self.backends:
            raise ValueError("a balancer needs at least one backend")
        self.open_connections = [0] * len(self.backends)
        self.served = [0] * len(self.backends)

    def _order(self, sticky: int | None) -> list[int]:
        n = len(self.backends)
        if sticky is not None:
            return [sticky, *[(sticky + k) % n for k in range(1, n)]]
        return sorted(range(n), key=lambda i: (self.open_connections[i], self.served[i], i))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
                return
            sticky = worker_from_head(head, len(self.backends))
            for i in self._order(sticky):
                # counted before the connect is awaited: connections arriving together see each other
                self.open_connections[i] += 1
                try:
                    b_reader, b_writer = await asyncio.open_connection(*self.backends[i])
                except OSError:
                    self.open_connections[i] -= 1
                    continue
                break
            else:
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                return
            self.served[i] += 1
            try:
                b_writer.write(head)
                await asyncio.gather(self._pipe(reader, b_writer), self._first_response(b_reader, writer, None if sticky == i else i))
            finally:
                self.open_connections[i] -= 1
                b_writer.close()
                with contextlib.suppress(Exception):
                    await b_writer.wait_closed()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await src.read(CHUNK)
                if not data:
                    break
                dst.write(data)
                await dst.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                if dst.can_write_eof():
                    dst.write_eof()

    async def _first_response(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, set_cookie: int | None) -> None:
        """Relay the worker's bytes; the first response's status line gets the affinity cookie
        after it when the client did not send (this worker's) one."""
        if set_cookie is not None:
            try:
                status = await src.readuntil(b"\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            dst.write(with_cookie(status, set_cookie) if status.startswith(b"HTTP/") else status)
        await self._pipe(src, dst)


async def serve(backends: list[tuple[str, int]], host: str, port: int, started: asyncio.Event | None = None) -> None:
    """Listen on (host, port) and relay to `backends` until cancelled."""
    balancer = Balancer(backends)
    server = await asyncio.start_server(balancer.handle, host, port, limit=HEAD_LIMIT)
    async with server:
        if started is not None:
            started.set()
        await server.serve_forever()
