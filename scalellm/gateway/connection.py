"""Bare HTTP/1.1 connections to the replicas for streamed answers, on asyncio's protocol callbacks, kept
alive between requests.

A stream's events are forwarded from the callback that receives them (StreamRelay.feed), with no task
woken per event: that is most of what a proxied token costs. A request goes out as bytes; the answer's
head is parsed once, then its body (chunked, sized, or up to the end of the connection) is handed on
as it arrives, de-chunked. A connection whose answer ended cleanly goes back to its replica's idle
list for the next request (a stale one, closed by the replica meanwhile, fails before any byte of the
answer: the "lost" case, which is safe to send again).
"""
from __future__ import annotations

import asyncio
from collections import defaultdict
from urllib.parse import urlsplit


class ConnectFailed(ConnectionError):
    """No connection could be made (nothing was sent)."""


class Lost(ConnectionError):
    """The connection ended before the answer did."""


class TimedOut(Lost):
    """Nothing arrived for the quiet limit; the connection was closed."""


class ReplicaConnection(asyncio.Protocol):
    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False  # served an earlier request: if it fails before any byte it was stale
        self._loop = asyncio.get_running_loop()
        self.reset()

    def reset(self) -> None:
        """Ready for the next request's answer."""
        loop = self._loop
        self.head: asyncio.Future = loop.create_future()  # (status, headers)
        self.ended: asyncio.Future = loop.create_future()  # None, or raises Lost
        self.on_body = None  # called with each piece of the body; set once the head is in
        self.last_data = loop.time()  # of the last bytes received (or the request)
        self.keep_alive = True
        self.timed_out = False
        self._buf = bytearray()
        self._mode = "head"  # head, chunked, sized, eof, done
        self._left = 0  # sized: bytes still to come
        self._pending: list[bytes] = []  # body pieces that came with the head, before on_body was set

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.last_data = self._loop.time()
        mode = self._mode
        if mode == "chunked":
            if not self._buf:  # mostly one whole chunk
                line_end = data.find(b"\r\n")
                if line_end > 0:
                    try:
                        size = int(data[:line_end], 16)
                    except ValueError:
                        size = 0
                    if size and len(data) == line_end + size + 4:
                        self._emit(data[line_end + 2:line_end + 2 + size])
                        return
            self._buf += data
            self._dechunk()
        elif mode == "head":
            self._buf += data
            self._parse_head()
        elif mode == "sized":
            piece = data[:self._left]
            self._left -= len(piece)
            self._emit(piece)
            if not self._left:
                self._finish()
        elif mode == "eof":
            self._emit(data)

    def eof_received(self):
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self._mode == "eof":
            self._finish()
        error = (TimedOut if self.timed_out else Lost)(str(exc) if exc else "the replica closed the connection")
        if not self.head.done():
            self.head.set_exception(error)
        if not self.ended.done():
            self.ended.set_exception(error)

    # -- use -----------------------------------------------------------------------------------
    def listen(self, on_body) -> None:
        """Hand the body to on_body from now on (what came with the head first)."""
        self.on_body = on_body
        pending, self._pending = self._pending, []
        for piece in pending:
            on_body(piece)
        if self._mode == "done" and not self.ended.done():
            self.ended.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def complete(self) -> bool:
        """The whole answer arrived."""
        return self._mode == "done"

    async def wait(self, future: asyncio.Future, quiet_limit: float):
        """Await head or ended; nothing received for quiet_limit seconds closes the connection and
        raises TimedOut. One timer per wait, moved on only when it fires."""
        loop = asyncio.get_running_loop()

        def check():
            nonlocal timer
            if loop.time() - self.last_data >= quiet_limit:
                self.timed_out = True
                self.close()
            else:
                timer = loop.call_at(self.last_data + quiet_limit, check)

        timer = loop.call_at(self.last_data + quiet_limit, check)
        try:
            return await future
        finally:
            timer.cancel()

    # -- parsing -------------------------------------------------------------------------------
    def _emit(self, piece: bytes) -> None:
        if not piece:
            return
        if self.on_body is not None:
            self.on_body(piece)
        else:
            self._pending.append(piece)

    def _finish(self) -> None:
        self._mode = "done"
        if self.on_body is not None and not self.ended.done():
            self.ended.set_result(None)

    def _parse_head(self) -> None:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        rest = bytes(self._buf[end + 4:])
        self._buf.clear()
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            self.head.set_exception(Lost(f"a malformed status line: {lines[0]!r}"))
            self.close()
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.keep_alive = headers.get("connection", "").lower() != "close"
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._mode = "chunked"
        elif "content-length" in headers:
            self._mode, self._left = "sized", int(headers["content-length"])
        else:
            self._mode, self.keep_alive = "eof", False
        self.head.set_result((status, headers))
        if self._mode == "sized" and not self._left:
            self._finish()
        elif rest:
            self.data_received(rest)

    def _dechunk(self) -> None:
        buf, pos, pieces = self._buf, 0, []
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                break
            size = int(bytes(buf[pos:line_end]).split(b";", 1)[0], 16)
            if size == 0:  # the last chunk (no trailers are sent to us)
                pos = len(buf)
                self._mode = "done"
                break
            start = line_end + 2
            if len(buf) < start + size + 2:
                break
            pieces.append(bytes(buf[start:start + size]))
            pos = start + size + 2
        del buf[:pos]
        if pieces:
            self._emit(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        if self._mode == "done":
            self._finish()


class ConnectionPool:
    """Idle keep-alive connections per replica address."""

    def __init__(self, max_idle: int = 256):
        self.max_idle = max_idle
        self.idle: dict[str, list[ReplicaConnection]] = defaultdict(list)

    async def send(self, url: str, path: str, body: bytes, headers: dict[str, str], connect_timeout: float
                   ) -> ReplicaConnection:
        """Send the request on an idle connection to url, or a new one; ConnectFailed if none could be made."""
        parts = urlsplit(url)
        idle = self.idle.get(url)
        conn = None
        while idle:
            candidate = idle.pop()
            if not candidate.closed and not candidate.transport.is_closing():
                conn = candidate
                conn.reset()
                conn.reused = True
                break
        if conn is None:
            loop = asyncio.get_running_loop()
            try:
                _, conn = await asyncio.wait_for(
                    loop.create_connection(ReplicaConnection, parts.hostname, parts.port or 80), connect_timeout)
            except (OSError, asyncio.TimeoutError) as e:
                raise ConnectFailed(f"cannot connect to {url}: {e}") from None
        lines = [f"POST {parts.path.rstrip('/')}{path} HTTP/1.1", f"Host: {parts.netloc}",
                 f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
        conn.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body)
        return conn

    def release(self, url: str, conn: ReplicaConnection) -> None:
        """A connection whose answer ended cleanly: kept for the next request, or closed."""
        idle = self.idle[url]
        if conn.complete and conn.keep_alive and not conn.closed and len(idle) < self.max_idle:
            conn.on_body = None
            idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for idle in self.idle.values():
            for conn in idle:
                conn.close()
        self.idle.clear()
