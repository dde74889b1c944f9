"""return_token_ids (vLLM's field): the prompt's and the output's token ids ride along with the text,
whole in a response and per delta in a stream, so that a client (or a router) holds exactly what the
model produced."""
from __future__ import annotations

import json
import urllib.request

import pytest

MODEL = "tiny-llama"
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"],
    "additionalProperties": False}}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def post(server, path: str, body: dict) -> dict:
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def stream(server, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(server.url + path, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        events = r.read().split(b"\n\n")
    return [json.loads(e[6:]) for e in events if e.startswith(b"data: {")]


def streamed_ids(chunks: list[dict], n: int) -> list[list[int]]:
    ids = [[] for _ in range(n)]
    for chunk in chunks:
        for choice in chunk["choices"]:
            ids[choice["index"]] += choice.get("token_ids", [])
    return ids


@pytest.mark.parametrize("fields", [{"temperature": 0}, {"temperature": 1.0, "seed": 7, "n": 2},
                                    {"temperature": 0, "stop": ["e"], "logprobs": 2}])
def test_completions_carry_their_token_ids(llama_server, fields):
    body = {"model": MODEL, "prompt": "The weather today is", "max_tokens": 24, "ignore_eos": True,
            "return_token_ids": True, **fields}
    whole = post(llama_server, "/v1/completions", body)
    prompt_ids = post(llama_server, "/tokenize", {"prompt": body["prompt"]})["tokens"]
    n = fields.get("n", 1)
    assert len(whole["choices"]) == n
    for choice in whole["choices"]:
        assert choice["prompt_token_ids"] == prompt_ids
        assert choice["token_ids"]
        if choice["finish_reason"] == "length":
            assert post(llama_server, "/detokenize", {"tokens": choice["token_ids"]})["prompt"] == choice["text"]
    assert sum(len(c["token_ids"]) for c in whole["choices"]) == whole["usage"]["completion_tokens"]

    chunks = stream(llama_server, "/v1/completions", body)
    assert streamed_ids(chunks, n) == [c["token_ids"] for c in whole["choices"]]
    firsts = {}
    for chunk in chunks:  # each choice's first chunk names its prompt's ids, the others do not
        for choice in chunk["choices"]:
            firsts.setdefault(choice["index"], choice)
            if choice is not firsts[choice["index"]]:
                assert "prompt_token_ids" not in choice
    assert all(c["prompt_token_ids"] == prompt_ids for c in firsts.values())


def test_chat_carries_its_token_ids(llama_server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 20, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    whole = post(llama_server, "/v1/chat/completions", body)
    prompt_ids = post(llama_server, "/tokenize", {"messages": MESSAGES})["tokens"]
    assert whole["prompt_token_ids"] == prompt_ids
    ids = whole["choices"][0]["token_ids"]
    assert len(ids) == whole["usage"]["completion_tokens"] == 20
    chunks = stream(llama_server, "/v1/chat/completions", body)
    assert chunks[0]["prompt_token_ids"] == prompt_ids
    assert streamed_ids(chunks, 1) == [ids]


def test_a_tool_call_stream_keeps_ids_the_parser_holds_back():
    """A tool-call parser holds text back while a call may be starting; its chunks still go out with
    their token ids (a frame is skipped only when it carries nothing at all)."""
    from types import SimpleNamespace

    from scalellm.outputs import StreamDelta
    from scalellm.server.sse import Framer

    class HoldingParser:  # holds every piece back until the end
        def __init__(self):
            self.text = ""

        def feed(self, text):
            self.text += text
            return SimpleNamespace(content="", calls=[])

        def end(self):
            return SimpleNamespace(content=self.text, calls=[])

    def frames(with_ids: bool) -> list[bytes]:
        framer = Framer("chat", "chatcmpl-x", 0, MODEL, None, 1, None, [0])
        framer.stream_tool_calls(HoldingParser, True)
        if with_ids:
            framer.return_token_ids([[1, 2, 3]])
        deltas = [StreamDelta("r", 0, "a", [5]), StreamDelta("r", 0, "b", [6]),
                  StreamDelta("r", 0, "c", [7], finish_reason="length")]
        return [f for f in (framer.frame(0, d) for d in deltas) if f]
    assert len(frames(False)) == 1  # held back: only the final frame goes out
    sent = [json.loads(f[6:]) for f in frames(True)]
    assert streamed_ids(sent, 1) == [[5, 6, 7]]
    assert sent[-1]["choices"][0]["delta"]["content"] == "abc"


def test_a_tool_call_stream_loses_no_token_ids(llama_server):
    """A forced tool call streamed: the chunks carry every token id the whole answer has."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 40, "temperature": 0, "return_token_ids": True,
            "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    whole = post(llama_server, "/v1/chat/completions", body)
    assert whole["choices"][0]["message"]["tool_calls"]
    chunks = stream(llama_server, "/v1/chat/completions", body)
    assert streamed_ids(chunks, 1) == [whole["choices"][0]["token_ids"]]


def test_without_the_flag_no_ids_are_sent(llama_server):
    body = {"model": MODEL, "prompt": "The weather today is", "max_tokens": 4}
    whole = post(llama_server, "/v1/completions", body)
    assert "token_ids" not in whole["choices"][0] and "prompt_token_ids" not in whole["choices"][0]
    for chunk in stream(llama_server, "/v1/completions", body):
        assert all("token_ids" not in c and "prompt_token_ids" not in c for c in chunk["choices"])
    chat = stream(llama_server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 4})
    assert all("prompt_token_ids" not in c for c in chat)
