"""Structured outputs over HTTP on the tiny random-weight Llama: its free text is noise, so every valid
reply below is the constraint's doing. Bad constraints get a 400 with an OpenAI error body before
admission, and the server serves the next request."""
import asyncio
import json
import re

import urllib.request

import aiohttp
import jsonschema
import pytest

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Describe a person."}]
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["a", "b"]}}}}
GOOD = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 2}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"],
    "additionalProperties": False}}}


async def _post(url, path, body):
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json=body) as r:
            return r.status, await r.json()


def post(server, path, body):
    return asyncio.run(_post(server.url, path, body))


def chat(server, **fields):
    status, body = post(server, CHAT, {"messages": MESSAGES, "max_tokens": 120, "temperature": 0, **fields})
    assert status == 200, body
    return body["choices"][0]


@pytest.mark.parametrize("fields", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}},
    {"structured_outputs": {"json": PERSON}},
    {"guided_json": PERSON},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
     "temperature": 0.8, "seed": 3},
])
def test_json_schema_spellings(llama_server, fields):
    choice = chat(llama_server, **fields)
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
    assert choice["message"]["refusal"] is None


def test_json_object_regex_choice_grammar(llama_server):
    obj = chat(llama_server, response_format={"type": "json_object"}, max_tokens=60)
    if obj["finish_reason"] == "stop":
        assert isinstance(json.loads(obj["message"]["content"]), dict)
    else:  # a random model may nest forever; what it wrote is still a JSON object's prefix
        assert obj["message"]["content"].startswith("{")
    regex = chat(llama_server, structured_outputs={"regex": r"[0-9]{3}-[a-z]{2,4}"})
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", regex["message"]["content"]), regex
    assert regex["finish_reason"] == "stop"
    for field in ({"structured_outputs": {"choice": ["red", "green", "blue"]}},
                  {"guided_choice": ["red", "green", "blue"]}):
        assert chat(llama_server, **field)["message"]["content"] in ("red", "green", "blue")
    lark = 'start: "x=" NUMBER ";"\nNUMBER: /[1-9][0-9]?/'
    text = chat(llama_server, structured_outputs={"grammar": lark})["message"]["content"]
    assert re.fullmatch(r"x=[1-9][0-9]?;", text), text
    gbnf = 'root ::= "y=" [a-c] [a-c]'
    text = chat(llama_server, guided_grammar=gbnf)["message"]["content"]
    assert re.fullmatch(r"y=[a-c]{2}", text), text


def test_completions_constrained_streamed_and_n(llama_server):
    async def main():
        body = {"model": "tiny-llama", "prompt": "A number:", "max_tokens": 40, "stream": True, "n": 3,
                "temperature": 1.0, "seed": 5, "structured_outputs": {"regex": r"[1-9][0-9]{1,5}"}}
        texts = ["", "", ""]
        finish = [None] * 3
        async with aiohttp.ClientSession() as s:
            async with s.post(llama_server.url + "/v1/completions", json=body) as r:
                assert r.status == 200
                async for line in r.content:
                    line = line.strip()
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    for c in json.loads(line[6:])["choices"]:
                        texts[c["index"]] += c["text"]
                        finish[c["index"]] = c["finish_reason"] or finish[c["index"]]
        return texts, finish
    texts, finish = asyncio.run(main())
    assert all(re.fullmatch(r"[1-9][0-9]{1,5}", t) for t in texts), texts
    assert finish == ["stop"] * 3


def test_length_cut_and_logit_fields(llama_server):
    choice = chat(llama_server, structured_outputs={"regex": "[a-z]{50}"}, max_tokens=3)
    assert choice["finish_reason"] == "length"
    # allowed_token_ids: every token is one of them; a logit bias that dominates: every token is the favoured one
    allowed = {post(llama_server, "/detokenize", {"tokens": [t]})[1]["prompt"] for t in (260, 261)}
    only = chat(llama_server, allowed_token_ids=[260, 261], max_tokens=6, ignore_eos=True, logprobs=True)
    tokens = [t["token"] for t in only["logprobs"]["content"]]
    assert len(tokens) == 6 and set(tokens) <= allowed, (tokens, allowed)
    status, body = post(llama_server, "/v1/completions", {"prompt": "hi", "max_tokens": 5, "temperature": 0,
                                                          "logit_bias": {"300": 100}, "ignore_eos": True})
    assert status == 200
    biased = body["choices"][0]["text"]
    status, body = post(llama_server, "/tokenize", {"prompt": biased, "add_special_tokens": False})
    assert set(body["tokens"]) == {300}, body


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format"),
    ({"structured_outputs": {"json": {"type": "object", "properties": 5}}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs"),
    ({"structured_outputs": {"json": PERSON, "regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"structured_outputs": {"jsn": PERSON}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": {"structures": []}}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "(a{100}){100}{100}"}, "guided_regex"),  # a lexer too costly for a step
    ({"guided_json": {"type": "object", "description": "x" * (1 << 20)}}, "guided_json"),  # over 1 MiB
    ({"guided_whitespace_pattern": " *", "guided_json": PERSON}, "structured_outputs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": "auto"}, "tool_choice"),  # this server has no --enable-auto-tool-choice
    ({"tools": [TOOL]}, "tool_choice"),  # tools default to "auto"
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "sunny"}]}, "messages"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "{bad"}}]}]}, "messages"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"logit_bias": {"five": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"allowed_token_ids": [10 ** 8]}, "allowed_token_ids"),
    ({"best_of": 4}, "best_of"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"prompt_logprobs": 25}, "prompt_logprobs"),  # supported, up to 20
    ({"functions": [{"name": "f"}]}, "functions"),
]


@pytest.mark.parametrize("fields, param", BAD)
def test_bad_constraints(llama_server, fields, param):
    status, body = post(llama_server, CHAT, {"messages": MESSAGES, "max_tokens": 4, **fields})
    assert status == 400, body
    err = body["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and "Traceback" not in err["message"]
    assert err["param"] == param, err
    status, body = post(llama_server, "/v1/completions", GOOD)  # the server serves on
    assert status == 200 and body["choices"][0]["text"] is not None


def test_completion_refusals(llama_server):
    status, body = post(llama_server, "/v1/completions", {**GOOD, "suffix": "tail"})
    assert status == 400 and body["error"]["param"] == "suffix"
    # fields that do not change the output are accepted
    status, body = post(llama_server, CHAT, {"messages": MESSAGES, "max_tokens": 2, "user": "u", "store": False,
                                             "metadata": {"k": "v"}, "service_tier": "auto"})
    assert status == 200, body


def test_constrained_requests_counted(llama_server):
    chat(llama_server, guided_choice=["x", "y"])
    text = urllib.request.urlopen(llama_server.url + "/metrics").read().decode()
    counts = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("scalellm:structured_output_requests_total{") and 'kind="choice"' in line]
    assert counts and counts[0] >= 1
    steps = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith("scalellm:grammar_mask_steps_total")]
    assert steps and steps[0] >= 1


def _sse_chunks(server, body):
    async def main():
        out = []
        async with aiohttp.ClientSession() as s:
            async with s.post(server.url + CHAT, json={**body, "stream": True}) as r:
                assert r.status == 200
                async for line in r.content:
                    line = line.strip()
                    if line.startswith(b"data: ") and line != b"data: [DONE]":
                        out.append(json.loads(line[6:]))
        return out
    return asyncio.run(main())


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_tool_call_whole_and_streamed(llama_server, tool_choice):
    """The random model's call is the grammar's doing: a valid call either way, the same when streamed."""
    body = {"messages": MESSAGES, "max_tokens": 120, "temperature": 0, "tools": [TOOL], "tool_choice": tool_choice,
            "parallel_tool_calls": False}
    choice = chat(llama_server, **{k: v for k, v in body.items() if k != "messages"})
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather" and call["id"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), TOOL["function"]["parameters"])
    streamed, finish = {}, None
    for chunk in _sse_chunks(llama_server, body):
        for c in chunk["choices"]:
            finish = c["finish_reason"] or finish
            assert not c["delta"].get("content")
            for d in c["delta"].get("tool_calls", []):
                entry = streamed.setdefault(d["index"], {"name": None, "arguments": ""})
                if "id" in d:
                    entry["name"] = d["function"]["name"]
                entry["arguments"] += d["function"].get("arguments", "")
    assert finish == "tool_calls"
    assert [(e["name"], json.loads(e["arguments"])) for e in streamed.values()] == \
        [("get_weather", json.loads(call["function"]["arguments"]))]


def test_chat_template_flag_and_config(llama_folder, tmp_path):
    from tests.checkpoints import bundled_tokenizer
    from tests.server_utils import ServerProcess

    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if tools %}tools: {{ tools | length }}\n{% endif %}assistant:")
    with ServerProcess("--model", llama_folder, "--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory",
                       "64MB", "--chat-template", str(template), "--structured-outputs-config",
                       '{"backend": "guidance", "disable_any_whitespace": false}') as server:
        status, body = post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 200
        assert bundled_tokenizer().decode(body["tokens"]) == "user: hi\nassistant:"
        # free whitespace allowed: more of it than the only string (8 characters at most) could hold
        text = chat(server, structured_outputs={"json": PERSON}, max_tokens=60)["message"]["content"]
        assert sum(c.isspace() for c in text) > 8, text
    from scalellm.server.__main__ import parse_args
    for bad in ('{"backend": "xgrammar"}', "[1]", '{"nope": 1}'):
        with pytest.raises(SystemExit):
            parse_args(["--structured-outputs-config", bad])
    with pytest.raises(SystemExit):
        parse_args(["--enable-auto-tool-choice"])
