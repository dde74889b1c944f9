"""The gateway's HTTP side: one OpenAI endpoint in front of the replicas.

A generation request's body is read once (size-limited) and validated with the server's own msgspec
structs, so malformed input gets the server's OpenAI error from the gateway and never reaches a
replica. It is then admitted (a cap on requests in flight and a bounded queue; 503 with Retry-After
beyond), routed, and forwarded as the same bytes (upstream.py: sent again only where the replica
provably did not run it). A client that leaves closes its upstream connection, so the replica aborts
the request and frees its KV blocks. `x-request-id` is propagated (or made) and logged.

Keys: `api_key` is what the gateway's own clients must send (on every path but PUBLIC_PATHS);
`upstream_api_key` is what the gateway sends to the replicas. The client's Authorization header never
goes upstream.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import deque

import aiohttp
from aiohttp import web

from scalellm.gateway.connection import ConnectionPool
from scalellm.gateway.dashboard import GatewayDashboard
from scalellm.gateway.metrics import NO_REPLICA, OTHER, GatewayMetrics
from scalellm.gateway.replicas import Replica, ReplicaSet
from scalellm.gateway.routing import Router
from scalellm.gateway.upstream import Exchange, Upstream
from scalellm.server import protocol as P
from scalellm.server.errors import APIError, decode_body, respond

log = logging.getLogger("scalellm.gateway")
# with an API key set, the only paths answered without it (the dashboard's data routes need the key)
PUBLIC_PATHS = frozenset({"/health", "/dashboard"})


def prompt_text(kind: str, req) -> str:
    """The text cache-aware routing hashes: the prompt, or the conversation as role/content lines."""
    if kind == "chat":
        parts = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else \
                "".join(p.text or "" for p in m.content)
            parts.append(f"{m.role}\n{content or ''}\n")
        return "".join(parts)
    prompt = req.prompt
    if isinstance(prompt, str):
        return prompt
    return "\n".join(p if isinstance(p, str) else ",".join(map(str, p)) if isinstance(p, list) else str(p)
                     for p in prompt)


_SMALL_DECODERS = {"/tokenize": P.tokenize_decoder, "/detokenize": P.detokenize_decoder,
                   "/v1/embeddings": P.embedding_decoder}  # requests forwarded whole to a replica of their model


class Gateway:
    def __init__(self, replicas: ReplicaSet, router: Router, api_key: str | None = None, max_in_flight: int = 1024,
                 max_queue: int = 1024, max_body_bytes: int = 8 << 20, retries: int = 2,
                 session_header: str = "x-session-id", request_timeout: float = 600.0, log_requests: bool = True,
                 upstream_api_key: str | None = None):
        self.replicas = replicas
        self.router = router
        self.api_key = api_key
        self.upstream_headers = {"Authorization": f"Bearer {upstream_api_key}"} if upstream_api_key else {}
        replicas.headers.update(self.upstream_headers)  # health checks and dashboard snapshots too
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.max_body_bytes = max_body_bytes
        self.retries = retries
        self.session_header = session_header
        self.request_timeout = request_timeout
        self.log_requests = log_requests
        self.in_flight = 0
        self._rid_prefix, self._rids = secrets.token_hex(8), itertools.count()  # request ids made here
        self.draining = False  # after SIGTERM: /health 503 and no new requests
        self._queue: deque[asyncio.Future] = deque()
        self.metrics = GatewayMetrics(self)
        self.dashboard = GatewayDashboard(self)
        self.upstream = Upstream(self)
        self.pool = ConnectionPool()  # keep-alive connections for streams (gateway/connection.py)
        self.session: aiohttp.ClientSession | None = None

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._middleware])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/tokenize", self.forward_small)
        app.router.add_post("/detokenize", self.forward_small)
        app.router.add_post("/v1/embeddings", self.forward_small)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_handler)
        app.router.add_get("/replicas", self.replicas_handler)
        app.router.add_get("/dashboard", self.dashboard.page)
        app.router.add_get("/dashboard/stream", self.dashboard.stream, allow_head=False)  # an endless stream
        app.router.add_get("/dashboard/snapshot", self.dashboard.snapshot)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, app) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=self.request_timeout)
        self.session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0),
                                             auto_decompress=False)

    async def _close(self, app) -> None:
        self.pool.close()
        if self.session is not None:
            await self.session.close()

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        response, _ = await respond(request, handler, self.api_key, PUBLIC_PATHS, self.max_body_bytes)
        return response

    # -- small endpoints ---------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        if self.replicas.routable():
            return web.json_response({"status": "ok", "replicas": len(self.replicas.routable())})
        return web.json_response({"status": "no routable replica"}, status=503)

    async def replicas_handler(self, request: web.Request) -> web.Response:
        return web.json_response({"policy": self.router.policy, "in_flight": self.in_flight,
                                  "queued": len(self._queue),
                                  "replicas": [r.describe() for r in self.replicas.replicas.values()]})

    async def metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain")

    async def models(self, request: web.Request) -> web.Response:
        cards = {}
        for r in self.replicas.replicas.values():
            if r.state != "removed":
                cards.update({m: card for m, card in r.cards.items() if m not in cards})
        return web.json_response({"object": "list", "data": [cards[m] for m in sorted(cards)]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        for r in self.replicas.replicas.values():
            if name in r.cards:
                return web.json_response(r.cards[name])
        raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    # -- generation ------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion", P.completion_decoder)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat", P.chat_decoder)

    async def forward_small(self, request: web.Request) -> web.StreamResponse:
        decoder = _SMALL_DECODERS[request.path]
        body = await request.read()
        req = decode_body(decoder, body)
        return await self._dispatch(request, body, req.model)

    async def _generate(self, request: web.Request, kind: str, decoder) -> web.StreamResponse:
        body = await request.read()
        req = decode_body(decoder, body)
        text = prompt_text(kind, req) if self.router.policy == "cache_aware" else None
        session = request.headers.get(self.session_header)
        stream = None
        if req.stream:
            single = kind == "chat" or isinstance(req.prompt, str) or (
                isinstance(req.prompt, list) and (len(req.prompt) == 1 or all(isinstance(t, int) for t in req.prompt)))
            stream = (req.n, bool(req.stream_options and req.stream_options.include_usage),
                      single and req.resume is None)
        return await self._dispatch(request, body, req.model, text, session, kind, stream)

    async def _dispatch(self, request, body: bytes, model: str | None, text: str | None = None,
                        session: str | None = None, kind: str | None = None,
                        stream: tuple[int, bool, bool] | None = None) -> web.StreamResponse:
        """stream: (n, include_usage, resumable) for a streamed generation."""
        known = self.replicas.known_models()
        rid = request.headers.get("x-request-id") or f"{self._rid_prefix}{next(self._rids):x}"
        ex = Exchange(rid, time.monotonic(), model, model if model in known else OTHER, text, session, kind)
        if stream is not None:
            ex.stream = True
            ex.n, ex.include_usage, ex.resumable = stream
        status, admitted = 499, False  # 499: the client left first
        try:
            if self.draining:
                raise APIError(503, "the gateway is shutting down", headers={"Retry-After": "1"})
            if model is not None and model not in known:
                raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
            await self._admit()
            admitted = True
            response = await self.upstream.forward(request, body, ex)
            status = response.status
            return response
        except APIError as e:
            status = e.status
            raise
        finally:
            if admitted:
                self._release()
            self._account(request, ex, status)

    def _account(self, request, ex: Exchange, status: int) -> None:
        elapsed = time.monotonic() - ex.start
        name = ex.replica.name if ex.replica is not None else NO_REPLICA
        self.metrics.count(name, ex.label, status)
        if ex.kind is not None and ex.replica is not None and status < 400:
            self.metrics.e2e.labels(name, ex.label).observe(elapsed)
        if self.log_requests:
            log.info("%s %s %s -> %s %s in %.3f s", ex.rid, request.method, request.path,
                     ex.replica.url if ex.replica is not None else NO_REPLICA, status, elapsed)

    async def _admit(self) -> None:
        if self.in_flight < self.max_in_flight and not self._queue:
            self.in_flight += 1
            return
        if len(self._queue) >= self.max_queue:
            raise APIError(503, "the gateway is at capacity; retry shortly", code="server_overloaded",
                           headers={"Retry-After": "1"})
        waiter = asyncio.get_running_loop().create_future()
        self._queue.append(waiter)
        try:
            await waiter  # the releasing request hands its slot over
        except asyncio.CancelledError:
            if waiter in self._queue:
                self._queue.remove(waiter)
            elif waiter.done() and not waiter.cancelled():
                self._release()  # the slot was handed over just as the client left
            raise

    def _release(self) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; in_flight is unchanged
                return
        self.in_flight -= 1

    def pick(self, ex: Exchange, tried: set[str]) -> Replica:
        candidates = [r for r in self.replicas.routable(ex.model) if r.url not in tried]
        if not candidates:
            raise APIError(503, "no replica is available to serve this request", code="no_replica",
                           headers={"Retry-After": "1"})
        return self.router.choose(candidates, self.in_flight, ex.text, ex.session)

    def has_other(self, model: str | None, tried: set[str]) -> bool:
        return any(r.url not in tried for r in self.replicas.routable(model))
