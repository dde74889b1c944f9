"""A streamed generation's way through the gateway, resumed on another replica when its own dies.

Sending follows upstream.py's rules (sent again only where the replica provably did not run it:
refused, lost before any byte, 503 with Retry-After, 429). Once the stream's head went to the client,
its events go through a StreamRelay (relay.py) straight from the replica connection's callback. When
the replica dies mid-stream (the connection reset or closed before `[DONE]`, or its engine reported
dead), the request goes to another healthy replica with `resume` (what the client has of each choice),
and that replica's events carry on in the same response: one stream, no byte missing or repeated.
Up to `retries` resumes per stream; `scalellm_gateway:streams_resumed_total` counts them and
`scalellm_gateway:resume_gap_seconds` is the pause the client saw.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from scalellm.gateway.connection import ConnectFailed, Lost, ReplicaConnection, TimedOut
from scalellm.gateway.relay import StreamRelay
from scalellm.server import protocol as P
from scalellm.server.errors import APIError, error_body
from scalellm.server.resume import TOKEN_IDS_HEADER

log = logging.getLogger("scalellm.gateway")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class HeadWithFirstWrite(web.StreamResponse):
    """A stream whose head goes out with its first events in one write, as aiohttp's web.Response
    sends its head with its body (a write less per request)."""
    _send_headers_immediately = False


class StreamForwarder:
    def __init__(self, upstream, request: web.Request, body: bytes, ex):
        self.up, self.gw = upstream, upstream.gw
        self.request, self.body, self.ex = request, body, ex
        self.headers = {"Content-Type": "application/json", "x-request-id": ex.rid, **self.gw.upstream_headers}
        if ex.resumable:
            self.headers[TOKEN_IDS_HEADER] = "1"
        self.relay = StreamRelay(request.transport, ex.n, ex.include_usage, ex.start, ex.kind == "chat")
        self.resp: web.StreamResponse | None = None

    async def run(self) -> web.StreamResponse:
        gw, relay = self.gw, self.relay
        tried: set[str] = set()
        resumes = attempt = 0
        while True:
            last = attempt >= gw.retries or not gw.has_other(self.ex.model, tried)
            if self.resp is not None and not gw.has_other(self.ex.model, tried):
                return await self._fail(APIError(502, "the replica serving this stream failed and no other "
                                                      "could take it over", code="replica_failed"))
            replica = gw.pick(self.ex, tried)
            tried.add(replica.url)
            self.ex.replica = replica
            replica.in_flight += 1
            replica.requests += 1
            try:
                outcome = await self._attempt(replica, last)
            except APIError as e:
                if self.resp is None:
                    raise
                return await self._fail(e)
            finally:
                replica.in_flight -= 1
            if outcome == "retry":
                attempt += 1
                gw.metrics.retries.inc()
                await asyncio.sleep(0.02 * 2 ** (attempt - 1))
                continue
            if outcome == "answered":
                return self.resp
            left = relay.what_is_left()  # the stream was cut
            if left == "done_but_marker":
                return await self._end(b"data: [DONE]\n\n")
            if left == "lost" or resumes >= gw.retries:
                return await self._fail(APIError(502, "the replica serving this request failed mid-stream; retry "
                                                      "the request", code="replica_failed"))
            resumes += 1
            tried = {replica.url}
            if relay.gap_start is None:
                relay.gap_start = relay.last_event
            gw.metrics.resumed.labels(replica.name, self.ex.label).inc()
            log.warning("%s: replica %s failed mid-stream; resuming on another", self.ex.rid, replica.url)

    async def _attempt(self, replica, last: bool) -> str:
        """One replica's try: "retry" (it did not run the request), "answered" (a whole answer relayed or
        the stream ended), or "cut" (the stream stopped early). Raises the client's APIError."""
        gw, relay = self.gw, self.relay
        body = relay.resume_body(self.body) if self.resp is not None else self.body
        try:
            conn = await gw.pool.send(replica.url, self.request.path, body, self.headers, 5.0)
        except ConnectFailed as e:
            gw.replicas.report(replica, ok=False, connection_error=True)
            if last:
                raise APIError(502, f"the replica could not be reached: {e}", code="replica_unreachable") from None
            return "retry"
        try:
            status, headers = await self._wait(conn, conn.head)
        except Lost as e:
            if not conn.reused:  # a kept-alive connection the replica had closed is no fault of it
                gw.replicas.report(replica, ok=False)
            if last:
                raise APIError(502, f"the replica failed before answering: {e}", code="replica_failed") from None
            return "retry"
        except BaseException:
            conn.close()
            raise
        if status != 200 or "text/event-stream" not in headers.get("content-type", ""):
            return await self._whole(conn, replica, status, headers, last)
        ttft = gw.metrics.ttft.labels(replica.name, self.ex.label)
        itl = gw.metrics.itl.labels(replica.name, self.ex.label)
        if self.resp is None:
            self.resp = HeadWithFirstWrite(status=200, headers={**SSE_HEADERS, "x-request-id": self.ex.rid})
            self.resp.enable_chunked_encoding()
            await self.resp.prepare(self.request)
        relay.attach(conn, headers.get(TOKEN_IDS_HEADER) == "1", ttft, itl)
        gap_from = relay.gap_start
        conn.listen(relay.feed)  # what came with the replica's head is pending now
        try:
            if not relay.direct and not relay.ended:
                # the head goes out now, with the events that came along (one write), and every later
                # event straight from the connection's callback: no wake-up of this task per event
                await self.resp.write(relay.take_pending())
                relay.direct = True
            await self._wait(conn, conn.ended)
        except Lost:
            pass
        except ConnectionResetError:  # the client left
            relay.client_gone = True
            conn.close()
        except BaseException:
            conn.close()
            raise
        finally:
            if gap_from is not None and relay.gap_start is None:  # an event went out after the cut
                gw.metrics.resume_gap.labels(replica.name, self.ex.label).observe(relay.last_event - gap_from)
        if relay.client_gone:
            return "answered"
        if relay.ended:  # the last events go out with the end of the body, in one write
            gw.replicas.report(replica, ok=True)
            gw.pool.release(replica.url, conn)
            await self._end(relay.take_pending())
            return "answered"
        gw.replicas.report(replica, ok=False)
        before_cut = relay.take_pending()
        if before_cut:  # the client gets what came before the cut, then the continuation
            with contextlib.suppress(ConnectionResetError):
                await self.resp.write(before_cut)
                relay.direct = True
        return "cut"

    async def _wait(self, conn: ReplicaConnection, future: asyncio.Future):
        """Await a connection's future; nothing received for request_timeout seconds is a 504 (not a
        failure of the replica: the health checks take a hung one out)."""
        timeout = self.gw.request_timeout
        try:
            return await conn.wait(future, timeout)
        except TimedOut:
            where = "mid-stream" if self.resp is not None else "before answering"
            log.warning("%s: replica sent nothing for %g s %s", self.ex.rid, timeout, where)
            raise APIError(504, f"the replica sent nothing for {timeout:g} s", code="replica_timeout") from None

    async def _whole(self, conn: ReplicaConnection, replica, status: int, headers: dict, last: bool) -> str:
        """An answer that is not a stream (an error, a refusal): relayed whole, or retried if a refusal."""
        pieces: list[bytes] = []
        conn.listen(pieces.append)
        try:
            await self._wait(conn, conn.ended)
        except Lost as e:
            raise self.up.answer_failed(replica, e, self.ex, mid_stream=False) from None
        self.gw.pool.release(replica.url, conn)
        refusal = status == 429 or (status == 503 and "retry-after" in headers)
        if refusal and not last:
            self.gw.replicas.report(replica, ok=True)
            return "retry"
        self.gw.replicas.report(replica, ok=status < 500 or refusal)
        if self.resp is not None:  # a resume refused: the stream ends with the replica's error
            await self._end(b"data: " + b"".join(pieces) + b"\n\n")
            return "answered"
        out = {"Content-Type": headers.get("content-type", "application/json"), "x-request-id": self.ex.rid}
        if "retry-after" in headers:
            out["Retry-After"] = headers["retry-after"]
        self.resp = web.Response(status=status, body=b"".join(pieces), headers=out)
        return "answered"

    async def _end(self, tail: bytes) -> web.StreamResponse:
        with contextlib.suppress(ConnectionResetError):
            await self.resp.write_eof(tail)
        return self.resp

    async def _fail(self, e: APIError) -> web.StreamResponse:
        """End the stream with an OpenAI-style error event (the client has its head already)."""
        event = b"data: " + P.encoder.encode(error_body(e.status, e.message, code=e.code)) + b"\n\n"
        return await self._end(self.relay.take_pending() + event)
