"""A client that leaves aborts its requests, streamed or not, and the engine frees their KV blocks.

The server here has a 64k context and every request asks for 60000 tokens with ignore_eos: at the
test model's few hundred tokens a second that is minutes of work, so within the waits below only an
abort can leave the engine idle.
"""
import asyncio

import aiohttp
import pytest

from tests.server_utils import ServerProcess, is_idle, scrape, wait_idle, wait_running

MODEL = "tiny-llama"
LONG = {"model": MODEL, "prompt": "Tell me everything", "max_tokens": 60000, "ignore_eos": True}
WAIT = 10.0  # seconds the engine gets to become idle after the clients leave
ABORTS = 'scalellm:request_success_total{finished_reason="abort"}'


@pytest.fixture(scope="module")
def long_server(llama_long_folder):
    server = ServerProcess("--model", llama_long_folder, "--dtype", "float32", "--served-model-name", MODEL,
                           "--max-model-len", "65536", "--kv-cache-memory", "64MB", "--shutdown-grace", "5")
    yield server
    server.stop()


async def check_still_serving(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/completions", json={**LONG, "max_tokens": 3}) as r:
            assert r.status == 200
            assert (await r.json())["usage"]["completion_tokens"] == 3


def test_streams_left_mid_way_are_aborted(long_server):
    url = long_server.url
    before = wait_idle(url)

    async def one_stream(i):
        async with aiohttp.ClientSession() as own:  # its own connection, closed when it leaves
            async with own.post(url + "/v1/completions", json={**LONG, "stream": True}) as r:
                assert r.status == 200
                seen = 0
                async for line in r.content:
                    if line.startswith(b"data: "):
                        seen += 1
                        if seen >= 2 + i % 5:
                            break
        return seen

    async def main():
        results = []
        for _ in range(5):  # 50 clients, ten at a time
            results += await asyncio.gather(*(one_stream(i) for i in range(10)))
        return results

    assert all(n >= 2 for n in asyncio.run(main()))
    after = wait_idle(url, WAIT)
    assert is_idle(after), after
    assert after[ABORTS] - before.get(ABORTS, 0) == 50
    asyncio.run(check_still_serving(url))


@pytest.mark.parametrize("shape", ["one prompt", "two prompts", "n=2"])
def test_non_streamed_requests_are_aborted_when_the_client_leaves(long_server, shape):
    url = long_server.url
    body = {"one prompt": LONG, "two prompts": {**LONG, "prompt": ["Tell me", "everything"]},
            "n=2": {**LONG, "n": 2}}[shape]
    before = wait_idle(url)

    async def main():
        async with aiohttp.ClientSession() as own:
            request = asyncio.create_task(own.post(url + "/v1/completions", json=body))
            running = await asyncio.to_thread(wait_running, url, 2 if shape != "one prompt" else 1)
            assert running["scalellm:kv_cache_usage_perc"] > 0
            request.cancel()  # the client gives up waiting
            with pytest.raises(asyncio.CancelledError):
                await request
        # leaving the session closes its connection

    asyncio.run(main())
    after = wait_idle(url, WAIT)
    assert is_idle(after), after
    assert after[ABORTS] - before.get(ABORTS, 0) == (1 if shape == "one prompt" else 2)
    asyncio.run(check_still_serving(url))


def test_metrics_show_a_running_request_until_it_is_aborted(long_server):
    """The gauges themselves: a request in flight is counted as running and holds KV blocks."""
    url = long_server.url

    async def main():
        async with aiohttp.ClientSession() as own:
            async with own.post(url + "/v1/completions", json={**LONG, "stream": True}) as r:
                await r.content.readline()
                m = await asyncio.to_thread(scrape, url)
                assert m["scalellm:num_requests_running"] == 1
                assert 0 < m["scalellm:kv_cache_usage_perc"] < 1

    wait_idle(url)
    asyncio.run(main())
    assert is_idle(wait_idle(url, WAIT))
