"""The gateway against small fake replicas on loopback: which failures are sent again (only where the
replica provably did not run the request), which keys go where, bounded metric labels, the latency
its clients see, a replica file's removals that stay removed, model lists read again, and every route
behind the API key."""
import asyncio
import contextlib
import json
import socket
import time

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from scalellm.gateway.proxy import PUBLIC_PATHS, Gateway
from scalellm.gateway.replicas import ReplicaSet
from scalellm.gateway.routing import Router

BODY = {"model": "m", "prompt": "Hi", "max_tokens": 2}


class FakeReplica:
    """An OpenAI-ish replica whose generation answer is set by `mode`; it records each request's headers."""

    def __init__(self, models=("m",)):
        self.models = list(models)
        self.mode = "ok"
        self.health_delay = 0.0
        self.health_asked = asyncio.Event()
        self.hits: list = []  # headers of each generation request
        self.model_reads: list = []  # headers of each /v1/models read
        self.server: TestServer | None = None

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def start(self) -> "FakeReplica":
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def health(self, request):
        self.health_asked.set()
        await asyncio.sleep(self.health_delay)
        return web.json_response({"status": "ok"})

    async def list_models(self, request):
        self.model_reads.append(request.headers.copy())
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    async def generate(self, request):
        self.hits.append(request.headers.copy())
        body = await request.json()
        mode = self.mode
        if mode == "slow":
            await asyncio.sleep(1.0)
        elif mode in ("503", "503-shutdown", "502", "500"):
            headers = {"Retry-After": "1"} if mode == "503" else None
            return web.json_response({"error": {"message": mode, "type": "x", "code": mode}},
                                     status=int(mode[:3]), headers=headers)
        elif mode == "reset":
            request.transport.close()  # gone before any byte of the answer
            await asyncio.sleep(0.5)
        if body.get("stream"):
            return await self.stream(request, chat="messages" in body, stall=mode == "stall")
        return web.json_response({"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "hi"}]})

    async def stream(self, request, chat: bool, stall: bool):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if chat:  # OpenAI's opening chunk: the role, no token yet
            await resp.write(b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n')
            await asyncio.sleep(0.2)
        for i in range(3):
            await resp.write(b'data: {"choices":[{"index":0,"text":"t%d"}]}\n\n' % i)
            await asyncio.sleep(1.0 if stall else 0.03)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def stop(self):
        if self.server is not None:
            await self.server.close()


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed


def gateway_over(*urls: str, models=("m",), **options) -> Gateway:
    """A gateway whose replicas are healthy from the start (no health checks: each test sets the scene)."""
    rs = ReplicaSet()
    for url in urls:
        replica = rs.add(url, None, "flag")
        replica.state = "healthy"
        replica.cards = {m: {"id": m, "object": "model"} for m in models}
    return Gateway(rs, Router("round_robin"), log_requests=False, **options)


@contextlib.asynccontextmanager
async def serving(gateway: Gateway, app: web.Application | None = None):
    client = TestClient(TestServer(app or gateway.make_app(), host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def fakes(n: int, **kw) -> list[FakeReplica]:
    return [await FakeReplica(**kw).start() for _ in range(n)]


def scrape(text: str) -> dict[str, list]:
    """Samples of the gateway's own series by name: [(labels, value)]."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


# -- retries: only where the replica provably did not run the request ------------------------------
def test_a_read_timeout_is_neither_retried_nor_ejected():
    async def main():
        a, b = await fakes(2)
        a.mode = "slow"
        gw = gateway_over(a.url, b.url, request_timeout=0.3)
        try:
            async with serving(gw) as client:
                r = await client.post("/v1/completions", json=BODY)
                body = await r.json()
            return r.status, body, len(a.hits), len(b.hits), gw.replicas.replicas[a.url].state
        finally:
            await a.stop()
            await b.stop()
    status, body, a_hits, b_hits, a_state = asyncio.run(main())
    assert status == 504 and body["error"]["code"] == "replica_timeout" and body["error"]["message"]
    assert (a_hits, b_hits) == (1, 0)  # never sent again: the replica may be running it
    assert a_state == "healthy"  # slow is alive, not ejected


def test_a_stream_that_stalls_ends_with_a_timeout_event_and_no_ejection():
    async def main():
        a, b = await fakes(2)
        a.mode = "stall"
        gw = gateway_over(a.url, b.url, request_timeout=0.3)
        try:
            async with serving(gw) as client:
                r = await client.post("/v1/completions", json={**BODY, "stream": True})
                events = [line async for line in r.content if line.startswith(b"data: ")]
            return r.status, events, len(b.hits), gw.replicas.replicas[a.url].state
        finally:
            await a.stop()
            await b.stop()
    status, events, b_hits, a_state = asyncio.run(main())
    assert status == 200 and events[0].startswith(b'data: {"choices"')
    assert json.loads(events[-1][6:])["error"]["code"] == "replica_timeout"
    assert b_hits == 0 and a_state == "healthy"


def test_a_refused_connection_is_retried_and_ejects():
    async def main():
        (b,) = await fakes(1)
        dead = refused_url()
        gw = gateway_over(dead, b.url)
        try:
            async with serving(gw) as client:
                r = await client.post("/v1/completions", json=BODY, headers={"x-request-id": "rid-1"})
                await r.read()
            return r.status, b.hits, gw.replicas.replicas[dead].state
        finally:
            await b.stop()
    status, b_hits, dead_state = asyncio.run(main())
    assert status == 200 and len(b_hits) == 1 and b_hits[0]["x-request-id"] == "rid-1"
    assert dead_state == "ejected"


def test_refusals_and_lost_connections_are_retried_with_the_same_request_id():
    async def main():
        out = {}
        for mode in ("503", "reset"):
            a, b = await fakes(2)
            a.mode = mode
            gw = gateway_over(a.url, b.url)
            try:
                async with serving(gw) as client:
                    r = await client.post("/v1/completions", json=BODY, headers={"x-request-id": f"rid-{mode}"})
                    await r.read()
                out[mode] = r.status, [h["x-request-id"] for h in a.hits + b.hits]
            finally:
                await a.stop()
                await b.stop()
        return out
    out = asyncio.run(main())
    assert out["503"] == (200, ["rid-503", "rid-503"])  # 503 with Retry-After: refused before running
    assert out["reset"] == (200, ["rid-reset", "rid-reset"])  # lost before any byte of the answer


def test_answers_after_the_request_may_have_run_are_relayed_not_retried():
    async def main():
        out = {}
        for mode in ("500", "502", "503-shutdown"):  # a 503 without Retry-After: the server's drain ran out
            a, b = await fakes(2)
            a.mode = mode
            gw = gateway_over(a.url, b.url)
            try:
                async with serving(gw) as client:
                    r = await client.post("/v1/completions", json=BODY)
                    await r.read()
                out[mode] = r.status, len(a.hits), len(b.hits)
            finally:
                await a.stop()
                await b.stop()
        return out
    assert asyncio.run(main()) == {"500": (500, 1, 0), "502": (502, 1, 0), "503-shutdown": (503, 1, 0)}


# -- keys --------------------------------------------------------------------------------------------
def test_the_clients_key_never_reaches_a_replica():
    async def main():
        (a,) = await fakes(1)
        gw = gateway_over(a.url, api_key="client-key")
        try:
            async with serving(gw) as client:
                r = await client.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer client-key"})
                await r.read()
            return r.status, a.hits
        finally:
            await a.stop()
    status, hits = asyncio.run(main())
    assert status == 200 and "Authorization" not in hits[0]


def test_the_upstream_key_goes_to_replicas_and_to_launched_servers(tmp_path):
    from scalellm.gateway.__main__ import build, parse_args

    async def main():
        (a,) = await fakes(1)
        gw = gateway_over(a.url, api_key="client-key", upstream_api_key="up-key")
        try:
            async with serving(gw) as client:
                r = await client.post("/v1/completions", json=BODY,
                                      headers={"Authorization": "Bearer client-key", "x-request-id": "rid-k"})
                await r.read()
            return r.status, a.hits, gw.replicas.headers
        finally:
            await a.stop()
    status, hits, check_headers = asyncio.run(main())
    assert status == 200 and hits[0]["Authorization"] == "Bearer up-key" and hits[0]["x-request-id"] == "rid-k"
    assert check_headers == {"Authorization": "Bearer up-key"}  # health checks' /v1/models too

    def launched(*flags: str) -> list[str]:
        args, server_args = parse_args(["--launch", "1", "--launch-log-dir", str(tmp_path), *flags,
                                        "--", "--model", "x"])
        return build(args, server_args)[2].children[0].command()
    assert launched("--api-key", "client-key")[-2:] == ["--model", "x"]  # the clients' key stays at the gateway
    assert launched("--api-key", "client-key", "--upstream-api-key", "up-key")[-2:] == ["--api-key", "up-key"]


# -- metrics -----------------------------------------------------------------------------------------
def test_bogus_model_names_do_not_grow_the_metric_labels():
    async def main():
        (a,) = await fakes(1)
        gw = gateway_over(a.url)
        try:
            async with serving(gw) as client:
                async def bogus(n):
                    for i in range(n):
                        r = await client.post("/v1/completions", json={**BODY, "model": f"bogus-{i}-{time.time()}"})
                        assert r.status == 404
                        await r.read()
                    return await (await client.get("/metrics")).text()
                r = await client.post("/v1/completions", json=BODY)
                assert r.status == 200
                few, many = await bogus(3), await bogus(60)
            return few, many
        finally:
            await a.stop()
    few, many = asyncio.run(main())
    label_sets = lambda text: {(name, tuple(sorted(labels.items())))  # noqa: E731
                               for name, samples in scrape(text).items() for labels, _ in samples}
    assert label_sets(few) == label_sets(many)
    assert "bogus" not in many
    requests = {(s["replica"], s["model"], s["status"]): v for s, v in scrape(many)["scalellm_gateway:requests_total"]}
    assert requests[("-", "other", "404")] == 63
    assert sum(v for (replica, model, status), v in requests.items() if model == "m" and status == "200") == 1


def test_metrics_report_the_latency_clients_see():
    async def main():
        (a,) = await fakes(1)
        gw = gateway_over(a.url)
        try:
            async with serving(gw) as client:
                for body, path in (({**BODY, "stream": True}, "/v1/completions"), (BODY, "/v1/completions"),
                                   ({"model": "m", "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
                                    "/v1/chat/completions")):
                    r = await client.post(path, json=body)
                    assert r.status == 200
                    await r.read()
                return await (await client.get("/metrics")).text(), gw.replicas.replicas[a.url].name
        finally:
            await a.stop()
    text, name = asyncio.run(main())
    samples = scrape(text)

    def value(metric: str) -> float:
        (v,) = [v for labels, v in samples[metric] if labels == {"replica": name, "model": "m"}]
        return v
    assert value("scalellm_gateway:e2e_request_latency_seconds_count") == 3
    assert value("scalellm_gateway:time_to_first_token_seconds_count") == 3
    assert value("scalellm_gateway:time_to_first_token_seconds_sum") >= 0.2  # the chat's role chunk is no token
    assert value("scalellm_gateway:inter_token_latency_seconds_count") >= 2  # two streams, up to 3 gaps each
    assert value("scalellm_gateway:inter_token_latency_seconds_sum") >= 0.03


# -- replica sources and model lists -------------------------------------------------------------------
def test_a_replica_taken_out_of_the_file_stays_out_and_model_lists_are_read_again(tmp_path):
    listing = tmp_path / "replicas.txt"

    async def wait_for(predicate, timeout=5.0):
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return predicate()

    async def main():
        a, b = await fakes(2)
        listing.write_text(f"{a.url}\n{b.url}\n")
        rs = ReplicaSet(replicas_file=str(listing), interval=0.05, dns_interval=0.05, check_timeout=0.2)
        await rs.start()
        try:
            assert await wait_for(lambda: len(rs.routable("m")) == 2)
            b.models = ["m2"]  # b starts serving another model
            assert await wait_for(lambda: [r.url for r in rs.routable("m2")] == [b.url])
            assert [r.url for r in rs.routable("m")] == [a.url]
            a.health_delay = 0.5  # a's checks now time out: one is under way when a leaves the file
            a.health_asked.clear()
            await a.health_asked.wait()
            listing.write_text(f"{b.url}\n")
            await rs.refresh_file()
            assert await wait_for(lambda: a.url not in rs.replicas or rs.replicas[a.url].state == "removed")
            a.health_delay = 0.0  # a answers again: only the file could bring it back
            await asyncio.sleep(0.6)
            return {u: r.state for u, r in rs.replicas.items()}, b.url
        finally:
            await rs.stop()
            await a.stop()
            await b.stop()
    states, b_url = asyncio.run(main())
    assert states == {b_url: "healthy"}  # a was drained and forgotten, and never came back


# -- every route but the allow-list needs the key -------------------------------------------------------
def test_every_route_but_the_allow_list_needs_the_key():
    async def main():
        gw = gateway_over(refused_url(), api_key="secret")
        seen, app = [], gw.make_app()
        async with serving(gw, app) as client:
            for route in app.router.routes():
                path = route.resource.canonical.replace("{model}", "x")
                if path in PUBLIC_PATHS:
                    continue
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer secret"}):
                    if route.method == "HEAD" and headers.get("Authorization") == "Bearer secret":
                        continue  # GET answers it (HEAD /dashboard/stream would send its events anyway)
                    async with client.request(route.method, path, headers=headers) as r:
                        body = await r.json() if r.status == 401 and route.method != "HEAD" else None
                        seen.append((route.method, path, bool(headers.get("Authorization", "").endswith("secret")),
                                     r.status, body))
        return seen
    seen = asyncio.run(main())
    assert {path for _, path, *_ in seen} >= {"/metrics", "/replicas", "/v1/models", "/v1/completions",
                                              "/dashboard/stream", "/dashboard/snapshot", "/tokenize"}
    for method, path, keyed, status, body in seen:
        if keyed:
            assert status != 401, (method, path)
        else:
            assert status == 401, (method, path, status)
            if method != "HEAD":
                assert set(body["error"]) >= {"message", "type"} and body["error"]["code"] == "invalid_api_key"
    assert PUBLIC_PATHS == {"/health", "/dashboard"}
