"""One request's way to the replicas and its answer's way back.

A request is sent again, to another replica (up to `retries` times, with backoff), only when the replica
provably did not run it:
- the connection was refused or could not be made (the replica is ejected at once);
- the connection was lost before any byte of the answer (a stale keep-alive connection, a replica that
  just died; one failure toward `eject_after`);
- a refusal: 503 with Retry-After, or 429. Every 503 a scalellm server sends before running a request
  (loading, draining, at capacity) carries Retry-After; its one 503 without (`server_shutdown`, when its
  drain's grace ran out) comes after the request ran. 429 is a refusal by definition (RFC 6585): a
  scalellm server never sends it, other OpenAI-compatible servers and rate limiters in front of them do,
  before running anything. A refusal is busy, not broken: it does not count toward ejection.
Nothing else is re-sent, as the request may have run: 5xx answers are relayed as they are (each one
failure toward ejection), no byte within the read timeout is a 504 `replica_timeout` (not a failure: a
slow replica is alive, and the health checks take out a hung one), a connection lost while the answer
came a 502 `replica_failed`. Streams take their own path (streams.py), on the same rules, and go on
on another replica when theirs dies mid-stream.

Every attempt carries the same `x-request-id`, and the gateway's own upstream key, never the client's
Authorization. Whole answers pass through unparsed.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from scalellm.gateway.replicas import Replica
from scalellm.gateway.streams import StreamForwarder
from scalellm.server.errors import APIError

log = logging.getLogger("scalellm.gateway")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_CONNECT_FAILED = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


@dataclass(slots=True, eq=False)
class Exchange:
    """One client request on its way through the gateway."""
    rid: str
    start: float  # time.monotonic() at arrival
    model: str | None  # as requested
    label: str  # its metric label: a model a replica serves, or "other"
    text: str | None = None  # what cache-aware routing hashes
    session: str | None = None
    kind: str | None = None  # "completion" | "chat" for generation requests
    stream: bool = False
    n: int = 1  # choices in the stream
    include_usage: bool = False
    resumable: bool = False  # a stream of one prompt: it can go on elsewhere if its replica dies
    replica: Replica | None = None  # the one sent it last


def send_failure(e: Exception) -> str:
    """Why sending failed before the answer's head arrived: "refused" (no connection made), "lost" (the
    connection ended before any byte of the answer), "timeout" (no answer in time) or "failed"."""
    if isinstance(e, _CONNECT_FAILED):
        return "refused"
    if isinstance(e, asyncio.TimeoutError):
        return "timeout"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "lost" if isinstance(e.message, str) else "failed"  # not a str: the part of the head that came
    if isinstance(e, (aiohttp.ClientOSError, ConnectionResetError)):
        return "lost"
    return "failed"


def is_refusal(upstream: aiohttp.ClientResponse) -> bool:
    return upstream.status == 429 or (upstream.status == 503 and "Retry-After" in upstream.headers)


def _retry_after(upstream: aiohttp.ClientResponse, default: float) -> float:
    try:
        return min(2.0, max(default, float(upstream.headers.get("Retry-After", default))))
    except ValueError:
        return default


class Upstream:
    def __init__(self, gateway):
        self.gw = gateway

    async def forward(self, request: web.Request, body: bytes, ex: Exchange) -> web.StreamResponse:
        if ex.stream:
            return await StreamForwarder(self, request, body, ex).run()
        gw = self.gw
        headers = {"Content-Type": "application/json", "x-request-id": ex.rid, **gw.upstream_headers}
        tried: set[str] = set()
        for attempt in range(gw.retries + 1):
            replica = gw.pick(ex, tried)
            tried.add(replica.url)
            ex.replica = replica
            replica.in_flight += 1
            replica.requests += 1
            try:
                last = attempt == gw.retries or not gw.has_other(ex.model, tried)
                try:
                    upstream = await gw.session.post(replica.url + request.path, data=body, headers=headers)
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    self._send_failed(replica, e, last, ex)
                    gw.metrics.retries.inc()
                    await asyncio.sleep(0.02 * 2 ** attempt)
                    continue
                if is_refusal(upstream) and not last:
                    backoff = 0.02 * 2 ** attempt  # another replica: its own Retry-After only on 429
                    wait = _retry_after(upstream, backoff) if upstream.status == 429 else backoff
                    upstream.release()
                    gw.replicas.report(replica, ok=True)  # busy, not broken
                    log.info("%s: replica %s refused (%d); trying another", ex.rid, replica.url, upstream.status)
                    gw.metrics.retries.inc()
                    await asyncio.sleep(wait)
                    continue
                return await self._relay(request, upstream, replica, ex)
            finally:
                replica.in_flight -= 1
        raise AssertionError("unreachable")

    def _send_failed(self, replica: Replica, e: Exception, last: bool, ex: Exchange) -> None:
        """Returns when the request may go to another replica; raises the client's error otherwise."""
        kind = send_failure(e)
        if kind == "timeout":
            log.warning("%s: replica %s sent no answer within %g s", ex.rid, replica.url, self.gw.request_timeout)
            raise APIError(504, f"the replica sent no answer within {self.gw.request_timeout:g} s",
                           code="replica_timeout")
        self.gw.replicas.report(replica, ok=False, connection_error=kind == "refused")
        if kind == "refused" and last:
            raise APIError(502, f"the replica could not be reached: {e}", code="replica_unreachable")
        if kind == "failed" or last:
            raise APIError(502, f"the replica failed before answering: {e}", code="replica_failed")
        log.info("%s: replica %s %s (%s); trying another", ex.rid, replica.url, kind, e.__class__.__name__)

    def answer_failed(self, replica: Replica, e: Exception, ex: Exchange, mid_stream: bool) -> APIError:
        """The client's error for an answer cut after its head arrived (never re-sent)."""
        where = "mid-stream" if mid_stream else "while answering"
        if isinstance(e, asyncio.TimeoutError):
            log.warning("%s: replica %s failed %s: nothing for %g s", ex.rid, replica.url, where,
                        self.gw.request_timeout)
            return APIError(504, f"the replica sent nothing for {self.gw.request_timeout:g} s {where}",
                            code="replica_timeout")
        self.gw.replicas.report(replica, ok=False)
        log.warning("%s: replica %s failed %s: %s", ex.rid, replica.url, where, e)
        message = ("the replica serving this request failed mid-stream; retry the request" if mid_stream
                   else f"the replica failed while answering: {e}")
        return APIError(502, message, code="replica_failed")

    async def _relay(self, request, upstream: aiohttp.ClientResponse, replica: Replica,
                     ex: Exchange) -> web.StreamResponse:
        try:
            return await self._relay_whole(upstream, replica, ex)
        except asyncio.CancelledError:
            upstream.close()  # the client left: closing the connection makes the replica abort the request
            raise
        finally:
            upstream.release()

    async def _relay_whole(self, upstream: aiohttp.ClientResponse, replica: Replica, ex: Exchange) -> web.Response:
        try:
            data = await upstream.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise self.answer_failed(replica, e, ex, mid_stream=False) from None
        self.gw.replicas.report(replica, ok=upstream.status < 500 or is_refusal(upstream))
        if ex.kind is not None and upstream.status == 200:
            self.gw.metrics.ttft.labels(replica.name, ex.label).observe(time.monotonic() - ex.start)
        headers = {"Content-Type": upstream.headers.get("Content-Type", "application/json"), "x-request-id": ex.rid}
        if "Retry-After" in upstream.headers:
            headers["Retry-After"] = upstream.headers["Retry-After"]
        return web.Response(status=upstream.status, body=data, headers=headers)
