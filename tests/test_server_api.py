"""End-to-end: the real server on loopback, driven by the official openai client."""
import json
import urllib.request

import openai
import pytest

from scalellm import SamplingParams

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def client(llama_server):
    return openai.OpenAI(base_url=llama_server.url + "/v1", api_key="unused", max_retries=0)


def _post(server, path, body):
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_matches_offline_engine(client, llama_llm):
    out = client.completions.create(model=MODEL, prompt="The meaning of life is", max_tokens=12, temperature=0)
    offline = llama_llm.generate(["The meaning of life is"], SamplingParams(temperature=0, max_tokens=12))[0]
    assert out.choices[0].text == offline.outputs[0].text
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == len(offline.prompt_token_ids)
    assert out.usage.completion_tokens == len(offline.outputs[0].token_ids)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")


def test_streamed_text_equals_non_streamed(client):
    kwargs = dict(model=MODEL, prompt="Write a list of fruits:", max_tokens=24, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].choices[0].finish_reason is not None
    chat_kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Hi there"}], max_tokens=20, temperature=0)
    chat_full = client.chat.completions.create(**chat_kwargs).choices[0].message.content
    stream = list(client.chat.completions.create(stream=True, **chat_kwargs))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat_full


def test_chat_message_shapes(client):
    out = client.chat.completions.create(
        model=MODEL, max_completion_tokens=5, temperature=0,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "!"}]},
                  {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Again"}])
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens <= 5


def test_n2_streamed_and_not(client):
    kwargs = dict(model=MODEL, prompt="Colors:", max_tokens=10, temperature=1.0, n=2, seed=5)
    out = client.completions.create(**kwargs)
    assert sorted(c.index for c in out.choices) == [0, 1]
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1}
    assert texts == {c.index: c.text for c in out.choices}  # same seed, same samples
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2,
                                          max_tokens=4, seed=1)
    assert len(chat.choices) == 2


def test_stop_strings(client):
    full = client.completions.create(model=MODEL, prompt="Numbers:", max_tokens=30, temperature=0).choices[0].text
    stop = full[5:8]
    out = client.completions.create(model=MODEL, prompt="Numbers:", max_tokens=30, temperature=0, stop=[stop])
    assert out.choices[0].text == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="Numbers:", max_tokens=30, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full[:full.index(stop)]


def test_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(t) == 3 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset[0] == 0
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob)


def test_seed_reproducible(client):
    kwargs = dict(model=MODEL, prompt="Once", max_tokens=16, temperature=1.0, seed=42)
    a = client.completions.create(**kwargs).choices[0].text
    b = client.completions.create(**kwargs).choices[0].text
    assert a == b


def test_include_usage(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=6, stream=True, stream_options={"include_usage": True}))
    streamed = sum(1 for c in chunks[:-1] for ch in c.choices if ch.delta.content)
    assert chunks[-1].choices == [] and 1 <= chunks[-1].usage.completion_tokens <= 6
    assert chunks[-1].usage.completion_tokens >= streamed  # a chunk carries at least one token
    assert all(c.usage is None for c in chunks[:-1])
    chunks = list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.total_tokens == 6 + chunks[-1].usage.prompt_tokens


def test_token_id_prompts_and_batches(client, llama_server):
    ids = _post(llama_server, "/tokenize", {"prompt": "The quick brown fox"})["tokens"]
    by_text = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model=MODEL, prompt=[ids, ids[:2]], max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text[:len(batch.choices[0].text)]
    texts = client.completions.create(model=MODEL, prompt=["a", "b", "c"], max_tokens=3, temperature=0)
    assert len(texts.choices) == 3


def test_echo(client):
    out = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=3, temperature=0, echo=True)
    assert out.choices[0].text.startswith("Echo me")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Echo me", max_tokens=3, temperature=0, echo=True, stream=True) if c.choices)
    assert streamed == out.choices[0].text


def test_tokenize_detokenize(llama_server):
    tok = _post(llama_server, "/tokenize", {"prompt": "héllo wörld"})
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 512
    assert _post(llama_server, "/detokenize", {"tokens": tok["tokens"]})["prompt"] == "héllo wörld"
    chat = _post(llama_server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert chat["count"] > tok["count"]


def _sse_texts(server, body) -> list[str]:
    """Each event's text; every event must be whole UTF-8 on its own."""
    req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        events = r.read().split(b"\n\n")
    chunks = [json.loads(e[6:].decode("utf-8")) for e in events if e.startswith(b"data: {")]
    return [c["choices"][0]["text"] for c in chunks]


def test_streamed_utf8_split_across_tokens(llama_server, llama_llm):
    """Characters that byte-level BPE splits over two tokens arrive whole in the stream, and the text
    equals the non-streamed one and the tokenizer's decode of the same tokens."""
    tok = llama_llm.tokenizer
    smile, cjk = tok.encode("\U0001F642", add_special_tokens=False), tok.encode("\u4642", add_special_tokens=False)
    assert len(smile) == len(cjk) == 2 and smile[1] == cjk[1]  # lead bytes, then shared continuation bytes
    allowed = set(smile) | set(cjk)
    # every other token is a stop token, banned while fewer than min_tokens are out: only the
    # allowed three can be drawn, in a seeded random order
    stop = [t for t in range(llama_llm.engine.model_config.vocab_size) if t not in allowed]
    fields = dict(temperature=1.0, seed=3, stop_token_ids=stop)
    ids = llama_llm.generate(["Faces:"], SamplingParams(max_tokens=40, min_tokens=40, **fields))[0].outputs[0].token_ids
    k = max(i + 1 for i in range(1, 40) if [ids[i - 1], ids[i]] in (smile, cjk))  # end on a whole character
    expected = tok.decode(ids[:k])
    assert "\U0001F642" in expected and "\u4642" in expected
    body = {"model": MODEL, "prompt": "Faces:", "max_tokens": k, "min_tokens": k, **fields}
    assert _post(llama_server, "/v1/completions", body)["choices"][0]["text"] == expected
    assert "".join(_sse_texts(llama_server, body)) == expected

    prompt = tok.encode("Emoji \U0001F600, \u4e2d\u6587 and caf\u00e9", add_special_tokens=False)
    echo = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": True}
    full = _post(llama_server, "/v1/completions", echo)["choices"][0]["text"]
    assert full.startswith("Emoji \U0001F600, \u4e2d\u6587 and caf\u00e9")
    assert "".join(_sse_texts(llama_server, echo)) == full
