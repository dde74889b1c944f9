"""Cancellation, load, admission control, auth, overlap with long steps, and graceful shutdown."""
import asyncio
import json
import os
import random
import signal
import time

import aiohttp
import pytest

from tests.server_utils import ServerProcess

LONG = {"model": "tiny-llama", "prompt": "Tell me everything", "max_tokens": 400, "ignore_eos": True}


async def metrics(session, url) -> dict[str, float]:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def wait_idle(session, url, timeout=20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = await metrics(session, url)
        if (m["scalellm:kv_cache_usage_perc"] == 0 and m["scalellm:num_requests_running"] == 0
                and m["scalellm:num_requests_waiting"] == 0) or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.1)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_disconnects_abort_and_free_blocks(llama_server):
    url = llama_server.url

    async def one_stream(i):
        async with aiohttp.ClientSession() as own:  # its own connection, closed when it leaves
            async with own.post(url + "/v1/completions", json={**LONG, "stream": True}) as r:
                assert r.status == 200
                seen = 0
                async for line in r.content:
                    if line.startswith(b"data: "):
                        seen += 1
                        if seen >= 2 + i % 5:
                            break  # leave mid-stream
        return seen

    async def main():
        async with aiohttp.ClientSession() as session:
            results = []
            for _ in range(5):  # 50 clients, ten at a time, each in its own connection
                results += await asyncio.gather(*(one_stream(i) for i in range(10)))
            m = await wait_idle(session, url)
            assert m["scalellm:kv_cache_usage_perc"] == 0 and m["scalellm:num_requests_running"] == 0
            assert m['scalellm:requests_total{outcome="abort"}'] >= 50
            # a non-streamed request whose client gives up is aborted too
            with pytest.raises(asyncio.TimeoutError):
                async with session.post(url + "/v1/completions", json=LONG,
                                        timeout=aiohttp.ClientTimeout(total=0.3)) as r:
                    await r.read()
            m = await wait_idle(session, url)
            assert m["scalellm:kv_cache_usage_perc"] == 0
            async with session.post(url + "/v1/completions", json={**LONG, "max_tokens": 3}) as r:
                assert r.status == 200
        return results

    assert all(n >= 2 for n in asyncio.run(main()))


def test_load_64_streams_with_random_disconnects(llama_server):
    url = llama_server.url
    duration = float(os.environ.get("SCALELLM_LOAD_SECONDS", "30"))
    rng = random.Random(0)
    statuses: dict[int, int] = {}
    counts = {"completed": 0, "disconnected": 0, "errors": 0}

    async def client(session, stop_at):
        while time.monotonic() < stop_at:
            body = {**LONG, "max_tokens": rng.randint(8, 64), "stream": True}
            leave_after = rng.randint(1, 20) if rng.random() < 0.3 else None
            try:
                async with session.post(url + "/v1/completions", json=body) as r:
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    n = 0
                    async for line in r.content:
                        n += line.startswith(b"data: ")
                        if leave_after is not None and n >= leave_after:
                            r.close()
                            counts["disconnected"] += 1
                            break
                        if line.startswith(b"data: [DONE]"):
                            counts["completed"] += 1
            except aiohttp.ClientError:
                counts["errors"] += 1

    async def main():
        async with aiohttp.ClientSession() as session:
            await wait_idle(session, url)
            pid = llama_server.proc.pid
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as pool:
                # a short warm-up so the baseline includes every code path's allocations
                await asyncio.gather(*(client(pool, time.monotonic() + 3) for _ in range(64)))
                await wait_idle(session, url)
                rss_start = rss_bytes(pid)
                await asyncio.gather(*(client(pool, time.monotonic() + duration) for _ in range(64)))
            m = await wait_idle(session, url)
            rss_end = rss_bytes(pid)
            return m, rss_start, rss_end

    m, rss_start, rss_end = asyncio.run(main())
    assert set(statuses) == {200}, statuses
    assert counts["errors"] == 0
    assert counts["completed"] > 64 and counts["disconnected"] > 10
    assert m["scalellm:kv_cache_usage_perc"] == 0 and m["scalellm:num_requests_running"] == 0
    assert rss_end - rss_start < 64 << 20, (rss_start, rss_end)  # flat: no per-request growth
    assert "Traceback" not in llama_server.output()


def test_admission_control_rejects_with_retry_after(llama_folder):
    with ServerProcess("--model", llama_folder, "--dtype", "float32", "--served-model-name", "tiny-llama",
                       "--max-num-seqs", "2", "--max-queue-len", "2", "--max-model-len", "512") as server:
        async def main():
            async with aiohttp.ClientSession() as session:
                async def long_request():
                    async with session.post(server.url + "/v1/completions", json=LONG) as r:
                        return r.status
                admitted = [asyncio.create_task(long_request()) for _ in range(4)]
                await asyncio.sleep(0.5)
                async with session.post(server.url + "/v1/completions", json=LONG) as r:
                    assert r.status == 503
                    assert r.headers["Retry-After"]
                    assert (await r.json())["error"]["code"] == "server_overloaded"
                assert await asyncio.gather(*admitted) == [200] * 4
                async with session.post(server.url + "/v1/completions", json={**LONG, "max_tokens": 2}) as r:
                    assert r.status == 200
        asyncio.run(main())


def test_api_key(llama_folder):
    with ServerProcess("--model", llama_folder, "--dtype", "float32", "--api-key", "s3cret",
                       "--max-model-len", "256") as server:
        async def main():
            async with aiohttp.ClientSession() as s:
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                    async with s.get(server.url + "/v1/models", headers=headers) as r:
                        assert r.status == 401
                        assert (await r.json())["error"]["type"] == "authentication_error"
                async with s.get(server.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}) as r:
                    assert r.status == 200
                for path in ("/health", "/metrics"):
                    async with s.get(server.url + path) as r:
                        assert r.status == 200
        asyncio.run(main())


def test_graceful_shutdown_finishes_in_flight(llama_folder):
    server = ServerProcess("--model", llama_folder, "--dtype", "float32", "--served-model-name", "tiny-llama",
                           "--max-model-len", "512", "--shutdown-grace", "60")

    async def main():
        async with aiohttp.ClientSession() as s:
            body = {**LONG, "max_tokens": 500, "stream": True, "stream_options": {"include_usage": True}}
            async with s.post(server.url + "/v1/completions", json=body) as stream:
                await stream.content.readline()  # the request is running
                server.proc.send_signal(signal.SIGTERM)
                for _ in range(100):  # draining: health flips to 503, new work is refused
                    async with s.get(server.url + "/health") as r:
                        if r.status == 503:
                            break
                    await asyncio.sleep(0.01)
                assert r.status == 503
                async with s.post(server.url + "/v1/completions", json=LONG) as r:
                    assert r.status == 503
                frames = [line async for line in stream.content if line.startswith(b"data: ")]
            assert frames[-1] == b"data: [DONE]\n"
            usage = json.loads(frames[-2][6:])["usage"]
            assert usage["completion_tokens"] == 500
    try:
        asyncio.run(main())
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def test_default_model_health_while_loading_and_during_a_long_prefill():
    """Serves the bundled SmolLM2; /health answers promptly while a ~4000-token prefill step runs."""
    server = ServerProcess("--max-num-batched-tokens", "4096", "--max-model-len", "4200", wait=False)
    try:
        codes = set()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and 200 not in codes:
            if server.proc.poll() is not None:
                raise RuntimeError(server.output())
            code = server.status()
            if code is not None:
                codes.add(code)
            time.sleep(0.05)
        assert codes == {503, 200}  # loading, then serving

        async def main():
            async with aiohttp.ClientSession() as s:
                body = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
                        "max_tokens": 16, "temperature": 0}
                async with s.post(server.url + "/v1/chat/completions", json=body) as r:
                    assert "Paris" in (await r.json())["choices"][0]["message"]["content"]
                prompt = list(range(1000, 5000))
                start = time.monotonic()
                req = asyncio.create_task(s.post(server.url + "/v1/completions",
                                                 json={"prompt": prompt, "max_tokens": 1}))
                worst, probes = 0.0, 0
                while not req.done():
                    t = time.monotonic()
                    async with s.get(server.url + "/health") as r:
                        assert r.status == 200
                    worst = max(worst, time.monotonic() - t)
                    probes += 1
                    await asyncio.sleep(0.05)
                prefill = time.monotonic() - start
                (await req).close()
                return worst, probes, prefill
        worst, probes, prefill = asyncio.run(main())
        assert prefill > 1.0 and probes >= 5  # the step really was long, and we probed throughout
        assert worst < prefill / 4, (worst, prefill)
    finally:
        server.stop()
