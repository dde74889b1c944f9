"""What one request may cost, and faults that must stay with the request that caused them: limits with
400s naming their field, admission before tokenizing, a step fault attributed to one request, the engine
loop's death, and every route behind the API key."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import urllib.request
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from scalellm.config import EngineConfig
from scalellm.engine import step_outputs
from scalellm.engine import sampler
from scalellm.engine.async_engine import AsyncEngine, RequestFailed
from scalellm.engine.engine import LLMEngine
from scalellm.sampling_params import SamplingParams
from scalellm.server.app import PUBLIC_PATHS, TOKENIZE_BACKLOG_CHARS, Server
from scalellm.server.lifecycle import serve
from scalellm.server.limits import RequestLimits
from tests.server_utils import ServerProcess, free_port, scrape

KEY = "s3cret"


@pytest.fixture(scope="module")
def engine(llama_folder):
    """One tiny llama engine for this module's in-process servers (each test leaves it idle)."""
    return LLMEngine(EngineConfig(model=llama_folder, dtype="float32", max_model_len=512, kv_cache_memory="32MB",
                                  block_size=16, num_threads=1, max_num_seqs=32))


def run_app(engine: LLMEngine, body, **server_kwargs):
    """Run `await body(client, server)` against an in-process server on `engine`."""
    async def main():
        server = Server(**server_kwargs)
        server.attach(AsyncEngine(engine))
        client = TestClient(TestServer(server.make_app()))
        await client.start_server()
        try:
            return await body(client, server)
        finally:
            await client.close()
            await server.engine.stop()
            server.pool.shutdown(wait=False)
    return asyncio.run(main())


async def error_of(response) -> dict:
    body = await response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


# -- limits ---------------------------------------------------------------------------------------
LIMITS = RequestLimits(max_n=4, max_stop_sequences=2, max_stop_chars=8, max_stop_token_ids=3,
                       max_prompts_per_request=3, max_logprobs=5)
BAD = [  # (path, body, the field the 400 names)
    ("/v1/completions", {"prompt": "hi", "n": 100000}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 5}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 5}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 4, "best_of": 4000}, "best_of"),
    ("/v1/completions", {"prompt": ["a", "b", "c", "d"]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [3], [4], [5]]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c"]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": "a stop string too long"}, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [1, 2, 3, 4]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 6}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 6}, "top_logprobs"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 600}, "max_tokens"),
    ("/v1/completions", {"prompt": list(range(1, 513))}, "prompt"),
    ("/v1/completions", {"prompt": "word " * 100_000}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 100_000}]}, "messages"),
]


def test_each_limit_is_a_400_naming_its_field(engine):
    async def body(client, server):
        for path, request, field in BAD:
            async with client.post(path, json={"max_tokens": 4, **request}) as r:
                assert r.status == 400, (request, await r.text())
                error = await error_of(r)
                assert error["param"] == field, (request, error)
        assert server.in_flight == 0
        async with client.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 4, "max_tokens": 2,
                                                        "stop": ["x", "y"], "logprobs": 5}) as r:
            assert r.status == 200, await r.text()
            assert len((await r.json())["choices"]) == 12
    run_app(engine, body, limits=LIMITS)


def test_a_huge_n_is_refused_by_default(engine):
    async def body(client, server):
        async with client.post("/v1/completions", json={"prompt": "hi", "n": 100000, "max_tokens": 1}) as r:
            assert r.status == 400 and (await error_of(r))["param"] == "n"
        # within --max-n but more sequences than the server ever holds: a 400, never a 503 to retry forever
        async with client.post("/v1/completions", json={"prompt": ["a"] * 200, "n": 100, "max_tokens": 1}) as r:
            assert r.status == 400 and (await error_of(r))["param"] == "n"
        assert engine.stats()["num_running"] == engine.stats()["num_waiting"] == 0
    run_app(engine, body)


# -- admission before tokenizing ------------------------------------------------------------------
def counting_tokenizer(server) -> list[int]:
    calls = []
    encode, template = server.tokenizer.encode, server.tokenizer.apply_chat_template

    def counted_encode(*a, **k):
        calls.append(1)
        return encode(*a, **k)

    def counted_template(*a, **k):
        calls.append(1)
        return template(*a, **k)
    server.tokenizer.encode, server.tokenizer.apply_chat_template = counted_encode, counted_template
    return calls


def test_a_full_server_refuses_before_tokenizing(engine):
    async def body(client, server):
        calls = counting_tokenizer(server)
        try:
            server.in_flight = engine.config.max_num_seqs + server.max_queue_len  # at capacity
            for path, request in (("/v1/completions", {"prompt": "word " * 2000}),
                                  ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
                async with client.post(path, json=request) as r:
                    assert r.status == 503 and r.headers["Retry-After"]
                    assert (await error_of(r))["code"] == "server_overloaded"
            assert calls == []
            server.in_flight = 0
            server.tokenizing_chars = TOKENIZE_BACKLOG_CHARS  # the pool's backlog is full
            async with client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 1}) as r:
                assert r.status == 503 and r.headers["Retry-After"]
            assert calls == [] and server.in_flight == 0
            server.tokenizing_chars = 0
            # too long for the context whatever it tokenizes to: a 400 without tokenizing it
            async with client.post("/v1/completions", json={"prompt": "x" * (512 * server.longest_token_chars + 1)}) as r:
                assert r.status == 400
            assert calls == []
            async with client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 1}) as r:
                assert r.status == 200
            assert calls and server.in_flight == 0 and server.tokenizing_chars == 0
        finally:
            del server.tokenizer.encode, server.tokenizer.apply_chat_template
    run_app(engine, body, max_queue_len=4)


# -- faults attributed to one request -------------------------------------------------------------
PROMPTS = [f"request {i}: the weather is" for i in range(16)]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


async def run_batch(engine: LLMEngine, params=GREEDY) -> dict[str, object]:
    """Start the 16 prompts together; each request's (text, chosen tokens' logprobs), or the exception
    it ended with."""
    async_engine = AsyncEngine(engine)

    async def one(i: int):
        text, logprobs = [], []
        async for delta in async_engine.generate(f"r{i}", engine.tokenize(PROMPTS[i]), params):
            text.append(delta.text)
            logprobs += [round(lp.logprob, 4) for lp in delta.logprobs or ()]
        return "".join(text), logprobs
    try:
        results = await asyncio.gather(*(one(i) for i in range(16)), return_exceptions=True)
    finally:
        await async_engine.stop()
    return {f"r{i}": r for i, r in enumerate(results)}


def poison_sampling(monkeypatch, engine, poisoned: str) -> None:
    launch = engine.sampler.launch

    def poisoned_launch(logits, seqs):
        if any(s.request_id == poisoned for s in seqs):
            raise RuntimeError("injected sampling fault")
        return launch(logits, seqs)
    monkeypatch.setattr(engine.sampler, "launch", poisoned_launch)


def poison_detokenizing(monkeypatch, engine, poisoned: str) -> None:
    detokenize = step_outputs.detokenize_new

    def poisoned_detokenize(detokenizer, seq):
        if seq.request_id == poisoned and seq.num_output_tokens >= 3:
            raise UnicodeError("injected detokenizer fault")
        return detokenize(detokenizer, seq)
    monkeypatch.setattr(step_outputs, "detokenize_new", poisoned_detokenize)


@pytest.mark.parametrize("stage,poison", [("sampling", poison_sampling), ("detokenization", poison_detokenizing)])
def test_a_fault_in_one_request_fails_only_that_request(engine, monkeypatch, caplog, stage, poison):
    clean = asyncio.run(run_batch(engine))
    assert all(isinstance(t, tuple) and t[0] for t in clean.values())
    poison(monkeypatch, engine, "r7")
    with caplog.at_level(logging.ERROR, logger="scalellm.engine.engine"):
        faulty = asyncio.run(run_batch(engine))
    assert isinstance(faulty.pop("r7"), RequestFailed)
    clean.pop("r7")
    assert faulty == clean  # the other 15, token for token as without the fault
    logged = [r for r in caplog.records if "r7" in r.getMessage()]
    assert logged and logged[0].exc_info is not None and stage in logged[0].getMessage()
    assert engine.block_manager.num_used_blocks == 0 and not engine.requests


def test_a_sampling_fault_with_logit_bias_adds_the_bias_once(engine, monkeypatch):
    """After the fault the batch's rows are sampled again one by one: a bias already added to a row is
    not added twice (the chosen tokens' logprobs, taken from the biased logits, show it)."""
    biased = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0,
                            logit_bias={t: 2.5 for t in range(3, 40)})
    clean = asyncio.run(run_batch(engine, biased))
    build = sampler.sampling_arrays

    def poisoned_build(seqs, *a):  # raises after the logits processor added the biases
        if any(s.request_id == "r3" for s in seqs):
            raise RuntimeError("injected sampling fault")
        return build(seqs, *a)
    monkeypatch.setattr(sampler, "sampling_arrays", poisoned_build)
    faulty = asyncio.run(run_batch(engine, biased))
    assert isinstance(faulty.pop("r3"), RequestFailed)
    clean.pop("r3")
    assert faulty == clean


def test_engine_errors_reach_clients_as_openai_errors(engine, monkeypatch):
    poison_detokenizing(monkeypatch, engine, "cmpl-poisoned")
    from scalellm.server import serving

    ids = iter(["poisoned", "poisoned", "fine"])  # the request ids the server gives its next three requests
    monkeypatch.setattr(serving.uuid, "uuid4", lambda: type("U", (), {"hex": next(ids)})())

    async def body(client, server):
        request = {"prompt": "the weather is", "max_tokens": 8, "ignore_eos": True}
        async with client.post("/v1/completions", json=request) as r:
            assert r.status == 500
            assert (await error_of(r))["code"] == "engine_error"
        async with client.post("/v1/completions", json={**request, "stream": True}) as r:
            events = [line for line in (await r.text()).split("\n\n") if line]
            error = json.loads(events[-1].removeprefix("data: "))["error"]
            assert error["code"] == "engine_error" and "detokenization" in error["message"]
        async with client.post("/v1/completions", json=request) as r:
            assert r.status == 200
        assert server.in_flight == 0
    run_app(engine, body)


def test_a_request_whose_admission_raises_fails_alone(engine, monkeypatch):
    add = engine.add_request

    def poisoned_add(request_id, *a, **k):
        if request_id == "r2":
            raise KeyError("injected admission fault")
        return add(request_id, *a, **k)
    monkeypatch.setattr(engine, "add_request", poisoned_add)
    out = asyncio.run(run_batch(engine))
    assert isinstance(out.pop("r2"), RequestFailed)
    assert all(isinstance(t, tuple) and t[0] for t in out.values())


# -- the engine loop's death ----------------------------------------------------------------------
def test_the_engine_loop_dying_fails_every_request_and_exits_nonzero(engine, monkeypatch):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    long_request = {"prompt": "the weather is", "max_tokens": 400, "ignore_eos": True}

    async def main():
        server = Server()
        ready, stop = asyncio.Event(), asyncio.Event()
        serving = asyncio.create_task(serve(server, lambda: engine, "127.0.0.1", port, 5.0, ready=ready, stop=stop,
                                            stats_interval=0))
        await asyncio.wait_for(ready.wait(), 60)
        async with aiohttp.ClientSession() as session:
            async def plain():
                async with session.post(url + "/v1/completions", json=long_request) as r:
                    return r.status, await r.json()

            async def streamed():
                async with session.post(url + "/v1/completions", json={**long_request, "stream": True}) as r:
                    return r.status, await r.text()
            tasks = [asyncio.create_task(plain()), asyncio.create_task(streamed())]
            while engine.stats()["num_running"] < 2:
                await asyncio.sleep(0.01)
            monkeypatch.setattr(engine, "has_unfinished", lambda: 1 / 0)  # outside any step: the loop dies
            (status, body), (stream_status, text) = await asyncio.wait_for(asyncio.gather(*tasks), 30)
            health = await server.health(None)
        code = await asyncio.wait_for(serving, 30)
        return status, body, stream_status, text, health.status, code

    status, body, stream_status, text, health, code = asyncio.run(main())
    assert status == 500 and body["error"]["code"] == "engine_dead"
    events = [e for e in text.split("\n\n") if e]
    assert stream_status == 200 and json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "engine_dead"
    assert health == 503
    assert code == 1
    monkeypatch.undo()  # the engine object is shared: clear what the dead loop left in it
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    while engine.has_unfinished():
        engine.step()
    engine.take_failures()


# -- the API key ----------------------------------------------------------------------------------
def concrete(path: str) -> str:
    return path.replace("{model:.+}", "some-model").replace("{model}", "some-model")


def test_every_route_but_the_allow_list_needs_the_key():
    """Enumerates the application's routes: one added later is covered without editing this test."""
    async def main():
        server = Server(api_key=KEY)
        app = server.make_app()
        client = TestClient(TestServer(app))
        await client.start_server()
        checked = []
        try:
            for route in app.router.routes():
                path = concrete(route.resource.canonical)
                method = route.method if route.method != "*" else "GET"
                if method == "HEAD":
                    continue
                async with client.request(method, path) as r:
                    if path in PUBLIC_PATHS:
                        assert r.status != 401, path
                    else:
                        assert r.status == 401, (method, path, r.status)
                        assert (await error_of(r))["type"] == "authentication_error"
                async with client.request(method, path, headers={"Authorization": f"Bearer {KEY}"}) as r:
                    assert r.status != 401, path
                checked.append(path)
        finally:
            await client.close()
            server.pool.shutdown(wait=False)
        return checked
    checked = asyncio.run(main())
    assert {"/metrics", "/load", "/tokenize", "/detokenize", "/dashboard/snapshot", "/v1/models"} <= set(checked)
    assert PUBLIC_PATHS == {"/health", "/version", "/dashboard"}



# -- slow readers ---------------------------------------------------------------------------------
def open_unread_stream(url: str, body: dict):
    """A streamed request on a socket with a small receive buffer, whose answer is never read."""
    parts = urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parts.hostname, parts.port))
    payload = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return sock


@pytest.mark.parametrize("prompts", [1, 2])  # one prompt streams from the step's hand-over; two through a task
def test_a_slow_reader_is_disconnected_and_its_request_aborted(llama_long_folder, prompts):
    with ServerProcess("--model", llama_long_folder, "--dtype", "float32", "--max-model-len", "65536",
                       "--kv-cache-memory", "64MB", "--block-size", "16", "--num-threads", "1",
                       "--max-stream-buffer-bytes", "65536") as server:
        prompt = "the weather is" if prompts == 1 else ["the weather is"] * prompts
        sock = open_unread_stream(server.url, {"prompt": prompt, "max_tokens": 60000, "n": 2, "ignore_eos": True,
                                               "logprobs": 20, "stream": True})
        try:
            async def others():  # a normal client meanwhile is served in full
                async with aiohttp.ClientSession() as session:
                    for _ in range(3):
                        async with session.post(server.url + "/v1/completions",
                                                json={"prompt": "hello", "max_tokens": 16}) as r:
                            assert r.status == 200 and (await r.json())["choices"][0]["finish_reason"] == "length"
            asyncio.run(others())
            key = "scalellm:slow_readers_disconnected_total"
            for _ in range(1200):
                if scrape(server.url).get(key):
                    break
                time.sleep(0.1)
            metrics = scrape(server.url)
            assert metrics.get(key) == 1, server.output()
            for _ in range(100):  # its request is aborted and its KV freed
                with urllib.request.urlopen(server.url + "/load") as r:
                    load = json.loads(r.read())
                if load["num_requests_running"] == 0 and load["kv_cache_usage"] == 0:
                    break
                time.sleep(0.1)
            assert load["num_requests_running"] == 0 and load["kv_cache_usage"] == 0 and load["in_flight"] == 0
        finally:
            sock.close()
