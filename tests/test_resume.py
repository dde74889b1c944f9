"""A stream cut after any of its events and resumed from the token ids sent so far (`resume`) comes out
as the uninterrupted stream: same events, same text and token ids, logprobs within float tolerance,
usage counting every token once. Each case is cut at every event boundary."""
import json
import urllib.request

import pytest

from tests.server_utils import post_json

MODEL = "tiny-llama"
HEADERS = {"Content-Type": "application/json", "x-stream-token-ids": "1"}


def stream(url: str, path: str, body: dict, headers=HEADERS) -> list[tuple[str | None, bytes | None]]:
    """The stream's events as (id line's value, data line's value)."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=60) as r:
        raw = r.read()
    assert raw.endswith(b"\n\n"), raw[-200:]
    events = []
    for event in raw[:-2].split(b"\n\n"):
        ident = data = None
        for line in event.split(b"\n"):
            if line.startswith(b"id: "):
                ident = line[4:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
            else:
                raise AssertionError(f"unexpected line {line!r}")
        events.append((ident, data))
    return events


def resume_of(events) -> dict:
    """What a router sends after forwarding these events: the stream's id and each choice's tokens."""
    first = json.loads(next(d for _, d in events if d is not None))
    choices: dict[int, dict] = {}
    for ident, _ in events:
        if ident is None:
            continue
        index, ids, *finish = ident.split(":")
        c = choices.setdefault(int(index), {"index": int(index), "token_ids": [], "finished": False})
        c["token_ids"] += [int(t) for t in ids.split(",") if t]
        c["finished"] = c["finished"] or bool(finish)
    return {"id": first["id"], "created": first["created"], "choices": list(choices.values())}


def close(a, b, path="") -> None:
    """Equal JSON, floats within 1e-4 (a prefill and a decode step round differently in float32)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-4), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def client_view(events) -> list:
    return [json.loads(d) if d != b"[DONE]" else "[DONE]" for _, d in events if d is not None]


def by_choice(chunks) -> dict:
    """Each choice's chunks in order, and the others (usage, [DONE]) in order: how n choices' events
    interleave depends on the steps that made them, which a resumed run takes differently."""
    out: dict = {"other": []}
    for c in chunks:
        if c != "[DONE]" and len(c["choices"]) == 1:
            out.setdefault(c["choices"][0]["index"], []).append(c)
        else:
            out["other"].append(c)
    return out


def check_every_cut(url: str, path: str, body: dict) -> list:
    full = stream(url, path, {**body, "stream": True})
    expected = client_view(full)
    assert expected[-1] == "[DONE]"
    n = body.get("n", 1)
    for cut in range(1, len(full)):
        head = full[:cut]
        resume = resume_of(head)
        if head[-1][0] is None and len(resume["choices"]) == n and all(c["finished"] for c in resume["choices"]):
            rest = [(None, b"[DONE]")]  # the usage went out: a router ends the stream itself
        else:
            rest = stream(url, path, {**body, "stream": True, "resume": resume})
        got = client_view(head) + client_view(rest)
        close(by_choice(got), by_choice(expected), f"cut after event {cut}")
    return expected


def text_of(chunks, index=0) -> str:
    out = []
    for c in chunks:
        if c == "[DONE]":
            continue
        for choice in c["choices"]:
            if choice["index"] == index:
                out.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(out)


def test_greedy_completion_with_logprobs(llama_server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "logprobs": 2, "stream_options": {"include_usage": True}}
    chunks = check_every_cut(llama_server.url, "/v1/completions", body)
    assert chunks[-2]["usage"]["completion_tokens"] == 24


def test_seeded_n2_with_stop_strings_straddling_the_cut(llama_server):
    url = llama_server.url
    base = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 30, "temperature": 1.0, "seed": 7,
            "n": 2, "ignore_eos": True}
    whole = post_json(url, "/v1/completions", base)["choices"][0]["text"]
    stop = whole[20:26]  # a stop string that ends choice 0 mid-way, spread over several tokens
    assert len(stop) == 6
    body = {**base, "stop": [stop, "zzzz"], "logprobs": 1, "stream_options": {"include_usage": True}}
    chunks = check_every_cut(url, "/v1/completions", body)
    assert text_of(chunks, 0) == whole[:20]


def test_chat_n2_with_penalties_min_tokens_and_logprobs(llama_server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 20,
            "min_tokens": 12, "temperature": 0.8, "seed": 3, "n": 2, "presence_penalty": 0.5,
            "frequency_penalty": 0.7, "repetition_penalty": 1.3, "logprobs": True, "top_logprobs": 2,
            "stream_options": {"include_usage": True}}
    chunks = check_every_cut(llama_server.url, "/v1/chat/completions", body)
    assert chunks[-2]["usage"]["completion_tokens"] > 24


def test_structured_output_and_tool_call_state_are_rebuilt(llama_server):
    url = llama_server.url
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer"}}, "required": ["name", "age"],
              "additionalProperties": False}
    body = {"model": MODEL, "prompt": "Person:", "max_tokens": 40, "temperature": 1.0, "seed": 11,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}}
    chunks = check_every_cut(url, "/v1/completions", body)
    json.loads(text_of(chunks))  # the grammar held across every cut
    tool = {"type": "function", "function": {"name": "lookup", "parameters": schema}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Who?"}], "tools": [tool],
            "tool_choice": "required", "max_tokens": 40, "temperature": 1.0, "seed": 5}
    chunks = check_every_cut(url, "/v1/chat/completions", body)
    calls = [c for ch in chunks if ch != "[DONE]" for choice in ch["choices"]
             for c in choice["delta"].get("tool_calls", [])]
    assert calls and calls[0]["function"]["name"] == "lookup"
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_token_events_only_when_asked_and_bad_resumes_are_400s(llama_server):
    url = llama_server.url
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}
    plain = stream(url, "/v1/completions", body, headers={"Content-Type": "application/json"})
    assert all(ident is None for ident, _ in plain)
    resume = {"id": "cmpl-x", "created": 1, "choices": []}
    for extra, why in (({"stream": False}, "stream"), ({"prompt": ["a", "b"]}, "one prompt"),
                       ({"resume": {**resume, "choices": [{"index": 3, "token_ids": []}]}}, "index 3")):
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "resume": resume, **extra})
                                     .encode(), headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 400
        assert why in json.loads(e.value.read())["error"]["message"]
    bad = {**resume, "choices": [{"index": 0, "token_ids": [10 ** 9]}]}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "resume": bad}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400


def test_one_stream_resumed_twice_at_once(llama_server):
    from concurrent.futures import ThreadPoolExecutor

    url = llama_server.url
    body = {"model": MODEL, "prompt": "Twice", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    full = stream(url, "/v1/completions", body)
    resume = resume_of(full[:3])
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda _: stream(url, "/v1/completions", {**body, "resume": resume}), range(2))
    assert client_view(a) == client_view(b) == client_view(full)[3:]
