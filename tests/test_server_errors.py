"""Bad input: the right 4xx, an OpenAI error body, and the server still serving the next request."""
import json

import aiohttp
import asyncio
import pytest

GOOD = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 2}
CASES = [
    # (path, raw body, expected status, expected param or None)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2, 3]", 400, None),
    ("/v1/completions", b'"just a string"', 400, None),
    ("/v1/completions", json.dumps({"prompt": 5}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"prompt": "x", "temperature": "hot"}).encode(), 400, "temperature"),
    ("/v1/completions", json.dumps({"max_tokens": 5}).encode(), 400, "prompt"),
    ("/v1/chat/completions", json.dumps({"model": "tiny-llama"}).encode(), 400, "messages"),
    ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": -1}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 10**9}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"prompt": "x", "temperature": -1}).encode(), 400, "temperature"),
    ("/v1/completions", json.dumps({"prompt": "x", "top_p": 0}).encode(), 400, "top_p"),
    ("/v1/completions", json.dumps({"prompt": "x", "top_p": 1.5}).encode(), 400, "top_p"),
    ("/v1/completions", json.dumps({"prompt": "x", "n": 0}).encode(), 400, "n"),
    ("/v1/completions", json.dumps({"prompt": "x", "model": "gpt-17"}).encode(), 404, "model"),
    ("/v1/chat/completions", json.dumps({"messages": []}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [{"content": "x"}]}).encode(), 400, "messages[0].role"),
    ("/v1/completions", b'{"prompt": "\xff\xfe invalid utf-8"}', 400, None),
    ("/v1/completions", json.dumps({"prompt": [5] * 600}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": [1, 2, 10**7]}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": [1, -2]}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": ""}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": []}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": "x", "logprobs": 21}).encode(), 400, "logprobs"),
    ("/v1/completions", json.dumps({"prompt": "x", "logprobs": -1}).encode(), 400, "logprobs"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                         "top_logprobs": 50}).encode(), 400, "top_logprobs"),
    ("/v1/completions", json.dumps({"prompt": "x", "stop": [""]}).encode(), 400, "stop"),
    ("/v1/completions", json.dumps({"prompt": "x", "presence_penalty": 9}).encode(), 400, "presence_penalty"),
    ("/detokenize", json.dumps({"tokens": [10**8]}).encode(), 400, "tokens"),
]


async def _check(url, path, body, status, param):
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, data=body, headers={"Content-Type": "application/json"}) as r:
            assert r.status == status, (path, body[:80], await r.text())
            err = (await r.json())["error"]
            assert isinstance(err["message"], str) and err["message"]
            assert err["type"] and "param" in err and "code" in err
            if param is not None:
                assert err["param"] == param, err
            assert "Traceback" not in err["message"]
        async with s.post(url + "/v1/completions", json=GOOD) as r:  # still serving
            assert r.status == 200
            assert (await r.json())["choices"][0]["text"] is not None


@pytest.mark.parametrize("path, body, status, param", CASES)
def test_bad_input(llama_server, path, body, status, param):
    asyncio.run(_check(llama_server.url, path, body, status, param))


def test_oversized_body_and_unknown_routes(llama_server):
    async def main():
        async with aiohttp.ClientSession() as s:
            big = json.dumps({"prompt": "x" * (9 << 20)})
            async with s.post(llama_server.url + "/v1/completions", data=big) as r:
                assert r.status == 413
                assert "error" in await r.json()
            async with s.get(llama_server.url + "/v1/nothing-here") as r:
                assert r.status == 404
                assert "error" in await r.json()
            async with s.get(llama_server.url + "/v1/completions") as r:
                assert r.status == 405
            async with s.post(llama_server.url + "/v1/completions", json=GOOD) as r:
                assert r.status == 200
    asyncio.run(main())
