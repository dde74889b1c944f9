"""Structured outputs and tool calls from the bundled model, through the `openai` client, on one server
(float32 weights so batch mates cannot change a free request's greedy tokens).

The JSON-schema corpus (tests/json_schemas.py): every constrained reply, greedy and sampled, streamed
and not, ends with "stop" and validates; most unconstrained replies to the same prompts do not.
"""
import asyncio
import json

import pydantic
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.json_schemas import SCHEMAS, validate
from tests.server_utils import ServerProcess

MAX_TOKENS = 256
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a city", "strict": True,
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 20}}}}}
ASK = [{"role": "user", "content": "What's the weather like in Paris?"}]


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--quantization", "none", "--dtype", "float32", "--max-model-len", "4096",
                      "--enable-auto-tool-choice", "--tool-call-parser", "hermes", timeout=300)
    yield s
    s.stop()


def _format(case) -> dict:
    return {"type": "json_schema", "json_schema": {"name": case.name, "schema": case.schema, "strict": True}}


async def _ask(client: AsyncOpenAI, case, stream: bool, constrained: bool = True, **sampling) -> tuple[str, str]:
    """(text, finish_reason) of one chat reply."""
    extra = {"response_format": _format(case)} if constrained else {}
    messages = [{"role": "user", "content": case.prompt}]
    if not stream:
        r = await client.chat.completions.create(model="default", messages=messages, max_tokens=MAX_TOKENS,
                                                 **extra, **sampling)
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, finish = "", None
    async for chunk in await client.chat.completions.create(model="default", messages=messages, stream=True,
                                                            max_tokens=MAX_TOKENS, **extra, **sampling):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish


def _client(server, cls=AsyncOpenAI):
    return cls(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)


def _model(server) -> str:
    return _client(server, OpenAI).models.list().data[0].id


def test_corpus_replies_stop_and_validate(server):
    assert len(SCHEMAS) >= 20

    async def main():
        client = _client(server)
        client.chat.completions.create = _with_model(client.chat.completions.create, _model(server))
        # greedy streamed and not; sampled with two seeds, one of them streamed
        settings = [(False, dict(temperature=0)), (True, dict(temperature=0)),
                    (False, dict(temperature=0.8, seed=1)), (True, dict(temperature=0.8, seed=2))]
        jobs = [(case, stream, s) for case in SCHEMAS for stream, s in settings]
        replies = await asyncio.gather(*(_ask(client, case, stream, **s) for case, stream, s in jobs))
        return jobs, replies
    jobs, replies = asyncio.run(main())
    failures = []
    for (case, stream, s), (text, finish) in zip(jobs, replies):
        try:
            assert finish == "stop", f"finish_reason {finish}"
            validate(case.schema, text)
        except Exception as e:
            failures.append(f"{case.name} stream={stream} {s}: {type(e).__name__}: {str(e)[:120]} | {text[:160]!r}")
    assert not failures, "\n".join(failures)


def test_unconstrained_replies_mostly_do_not_validate(server):
    async def main():
        client = _client(server)
        client.chat.completions.create = _with_model(client.chat.completions.create, _model(server))
        return await asyncio.gather(*(_ask(client, c, False, constrained=False, temperature=0) for c in SCHEMAS))
    valid = 0
    for case, (text, _) in zip(SCHEMAS, asyncio.run(main())):
        try:
            validate(case.schema, text)
            valid += 1
        except Exception:
            pass
    assert valid < len(SCHEMAS) / 2, f"{valid} of {len(SCHEMAS)} free replies already validate"


def _with_model(create, model):
    async def call(**kwargs):
        kwargs["model"] = model
        return await create(**kwargs)
    return call


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    country: str = pydantic.Field(max_length=20)
    population_millions: int = pydantic.Field(ge=0, le=40)


def test_parse_with_pydantic_model(server):
    client = _client(server, OpenAI)
    r = client.chat.completions.parse(model=_model(server), response_format=City, max_tokens=MAX_TOKENS, temperature=0,
                                      messages=[{"role": "user", "content": "Describe Paris as a city record."}])
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, City) and message.refusal is None


def test_free_requests_unchanged_by_constrained_batch_mates(server):
    """One batch of 32: 16 constrained by different schemas, 16 free. The free replies are
    token-identical to the same requests run alone; the constrained ones are valid."""
    model = _model(server)
    free_prompts = [f"Tell me one short fact about the number {i}." for i in range(16)]
    cases = SCHEMAS[:16]

    async def free(client, prompt):
        r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=40, temperature=0, logprobs=True)
        return [t.token for t in r.choices[0].logprobs.content], r.choices[0].message.content

    async def constrained(client, case):
        r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": case.prompt}],
                                                 max_tokens=MAX_TOKENS, temperature=0, response_format=_format(case))
        return r.choices[0].message.content, r.choices[0].finish_reason

    async def main():
        client = _client(server)
        alone = [await free(client, p) for p in free_prompts]
        together = await asyncio.gather(*(free(client, p) for p in free_prompts),
                                        *(constrained(client, c) for c in cases))
        return alone, together
    alone, together = asyncio.run(main())
    assert together[:16] == alone
    for case, (text, finish) in zip(cases, together[16:]):
        assert finish == "stop", case.name
        validate(case.schema, text)


# -- tools ---------------------------------------------------------------------------------------
def _stream_calls(chunks) -> tuple[dict, str, str | None]:
    """Reassemble streamed tool-call deltas: {index: {id, name, arguments}}, content, finish_reason."""
    calls, content, finish = {}, "", None
    for chunk in chunks:
        for c in chunk.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id:
                    assert call["id"] is None, "a call's id comes once, first"
                    call["id"], call["name"] = d.id, d.function.name
                else:
                    assert call["id"] is not None, "arguments before the call's id and name"
                call["arguments"] += d.function.arguments or ""
    return calls, content, finish


def test_named_and_required_tool_calls(server):
    client, model = _client(server, OpenAI), _model(server)
    named = {"type": "function", "function": {"name": "get_time"}}
    for choice, name in ((named, "get_time"), ("required", None)):
        kw = dict(model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=MAX_TOKENS,
                  temperature=0, parallel_tool_calls=False)
        r = client.chat.completions.create(**kw)
        m = r.choices[0]
        assert m.finish_reason == "tool_calls" and m.message.content is None, m
        assert len(m.message.tool_calls) == 1
        call = m.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in ({name} if name else {"get_weather", "get_time"})
        assert isinstance(json.loads(call.function.arguments)["city"], str)
        calls, content, finish = _stream_calls(client.chat.completions.create(**kw, stream=True))
        assert finish == "tool_calls" and content == ""
        assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
            [(call.function.name, json.loads(call.function.arguments))]


def test_tool_round_trip_and_none(server):
    client, model = _client(server, OpenAI), _model(server)
    first = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], max_tokens=MAX_TOKENS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}]
    final = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], tool_choice="none",
                                           max_tokens=40, temperature=0)
    m = final.choices[0]
    assert m.message.tool_calls is None and m.finish_reason in ("stop", "length") and m.message.content
    # "none" never yields a call even where the model writes the call format itself
    few_shot = _few_shot()
    none = client.chat.completions.create(model=model, messages=few_shot, tools=[WEATHER], tool_choice="none",
                                          max_tokens=60, temperature=0)
    assert none.choices[0].message.tool_calls is None and "<tool_call>" in none.choices[0].message.content


def _few_shot() -> list[dict]:
    """A conversation whose earlier turns called get_weather: the bundled model answers the last question
    the same way, in the hermes format its tools template asks for."""
    turns = []
    for i, city in enumerate(("Paris", "Berlin")):
        turns += [{"role": "user", "content": f"What's the weather in {city}?"},
                  {"role": "assistant", "content": None, "tool_calls": [{"id": f"call_{i}", "type": "function", "function": {
                      "name": "get_weather", "arguments": json.dumps({"city": city})}}]}]
    return turns + [{"role": "user", "content": "What's the weather in London?"}]


def test_auto_tool_choice_end_to_end(server):
    client, model = _client(server, OpenAI), _model(server)
    kw = dict(model=model, messages=_few_shot(), tools=[WEATHER], max_tokens=60, temperature=0)
    r = client.chat.completions.create(**kw, tool_choice="auto")
    m = r.choices[0]
    assert m.finish_reason == "tool_calls" and m.message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in m.message.tool_calls] == \
        [("get_weather", {"city": "London"})]
    calls, content, finish = _stream_calls(client.chat.completions.create(**kw, stream=True))
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "London"})]
