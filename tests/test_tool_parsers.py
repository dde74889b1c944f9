"""Tool-call parsers, the tools schemas and the ChatML tools template.

Every parser keeps one contract between `parse(text)` and streaming (`feed` per chunk, then `end`): for
any split of the text, the streamed content is parse's content ("" for None), and the streamed calls are
parse's calls in order, each first delta carrying id and name and the rest argument fragments that
concatenate to exactly parse's arguments, which are a JSON object's text.
"""
import importlib.resources
import json
import random
import re

import jsonschema
import pytest

from scalellm.server.tool_parsers import (PARSERS, HermesParser, JsonArrayParser, MistralParser, NamedParser,
                                          get_parser)
from scalellm.server.tool_parsers.schemas import check_tools, named_schema, required_schema

CALL_ID = re.compile(r"call_[0-9a-f]{24}")
MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")
MARKUP = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", '"name"')
MALFORMED = ("1,}", '{"arguments"', "NaN", '{"a": ', "oops", '{"parameters"', "Sure:", '"name": 3',
             "<|python_tag|>print", "{bad}", "sorry")  # in the texts of the cases whose markup stays content


def make(kind):
    return NamedParser("get_weather") if kind == "named" else get_parser(kind)


def run_stream(parser, chunks):
    """(content, [(id, name, arguments)]) of a streamed output, checking the shape of the deltas."""
    pieces = [parser.feed(c) for c in chunks] + [parser.end()]
    calls = []
    for delta in (d for p in pieces for d in p.calls):
        if delta.index == len(calls):
            assert delta.id and delta.name and not delta.arguments, delta  # a call's first delta
            calls.append([delta.id, delta.name, ""])
        else:
            assert delta.index == len(calls) - 1, delta  # calls stream one after the other
            assert delta.id is None and delta.name is None and delta.arguments, delta
            calls[-1][2] += delta.arguments
    return "".join(p.content for p in pieces), [tuple(c) for c in calls]


def splits(text, seed=0):
    yield [text]
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    rng = random.Random(seed)
    for _ in range(4):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(2, 8)))) if len(text) > 1 else []
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def check_id(kind, call_id):
    assert (MISTRAL_ID if kind == "mistral" else CALL_ID).fullmatch(call_id), call_id


def check_contract(kind, text, chunkings=None):
    expected = make(kind).parse(text)
    want = [(c.name, c.arguments) for c in expected.calls]
    for call in expected.calls:
        check_id(kind, call.id)
        assert isinstance(json.loads(call.arguments), dict)
    assert expected.content is None or expected.content == expected.content.strip() != ""
    for chunks in chunkings or splits(text):
        content, calls = run_stream(make(kind), chunks)
        assert content == (expected.content or ""), chunks
        assert [(name, args) for _, name, args in calls] == want, chunks
        for call_id, _, _ in calls:
            check_id(kind, call_id)
    return expected


def call(name, args):
    return name, args


WEATHER = '{"city": "Paris"}'
TRICKY = ('{"text": "h\u00e9llo \u4e16\u754c \\"q\\" {b} [x] </tool_call", "path": "C:\\\\", "u": "\\u00e9\\n", '
          '"odd": "1 \\" } ]"}')
NESTED = '{"trip": {"from": "A", "legs": [{"to": "B"}, {"to": "C", "opts": {}}]}, "n": 2, "ok": true, "x": null}'


def hermes(name, args):
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


CASES = {
    "hermes": [
        ("The capital of France is Paris.", "The capital of France is Paris.", []),
        (hermes("get_weather", WEATHER), None, [call("get_weather", WEATHER)]),
        (hermes("a", "{}") + "\n" + hermes("b", '{"x": 1}'), None, [call("a", "{}"), call("b", '{"x": 1}')]),
        ("Let me look.\n" + hermes("get_weather", WEATHER), "Let me look.", [call("get_weather", WEATHER)]),
        ('<tool_call>\n{"name": "f", "arguments": {"a": 1,}}\n</tool_call>',
         '<tool_call>\n{"name": "f", "arguments": {"a": 1,}}\n</tool_call>', []),
        ('Sure <tool_call>{"arguments": {}}</tool_call>', 'Sure <tool_call>{"arguments": {}}</tool_call>', []),
        ('<tool_call>{"name": "f", "arguments": {"a": NaN}}</tool_call>',
         '<tool_call>{"name": "f", "arguments": {"a": NaN}}</tool_call>', []),
        (hermes("say", TRICKY), None, [call("say", TRICKY)]),
        (hermes("book", NESTED), None, [call("book", NESTED)]),
        ('x <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n', "x", [call("f", '{"a": 1}')]),
        ('x <tool_call>\n{"name": "f", "arguments": {"a": ', 'x <tool_call>\n{"name": "f", "arguments": {"a":', []),
        ("A " + hermes("f", "{}") + " B ", "A  B", [call("f", "{}")]),
        ("a < b and <tool_c> <tool_call stays", "a < b and <tool_c> <tool_call stays", []),
        ('<tool_call>{"name": "now"}</tool_call>', None, [call("now", "{}")]),
        ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [call("f", '{"a": 1}')]),
        ("<tool_call>oops</tool_call>\n" + hermes("f", "{}"), "<tool_call>oops</tool_call>", [call("f", "{}")]),
        ("  \n ", None, []),
    ],
    "llama3_json": [
        ("Paris is the capital.", "Paris is the capital.", []),
        ('{"name": "get_weather", "parameters": ' + WEATHER + "}", None, [call("get_weather", WEATHER)]),
        ('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}', None,
         [call("a", "{}"), call("b", '{"x": 1}')]),
        ('{"name": "a", "arguments": {"y": 2}}\n{"name": "b", "parameters": {}};', None,
         [call("a", '{"y": 2}'), call("b", "{}")]),
        ('Sure: {"name": "f", "parameters": {}}', 'Sure: {"name": "f", "parameters": {}}', []),
        ('{"name": "f", "parameters": {"a": 1,}}', '{"name": "f", "parameters": {"a": 1,}}', []),
        ('{"parameters": {"a": 1}}', '{"parameters": {"a": 1}}', []),
        ('{"name": "say", "parameters": ' + TRICKY + "}", None, [call("say", TRICKY)]),
        (' \n{"name": "book", "parameters": ' + NESTED + "}\n", None, [call("book", NESTED)]),
        ('{"name": "f", "parameters": {}}\nDone.', "Done.", [call("f", "{}")]),
        ('{"name": "f", "parameters": {}}; {"name": 3}', '{"name": 3}', [call("f", "{}")]),
        ('{"name": "f", "parameters": {"a": ', '{"name": "f", "parameters": {"a":', []),
        ("<|python_tag|>print(1)", "<|python_tag|>print(1)", []),
    ],
    "mistral": [
        ("Hello there.", "Hello there.", []),
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": ' + WEATHER + "}]", None, [call("get_weather", WEATHER)]),
        ('[TOOL_CALLS] [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]', None,
         [call("a", "{}"), call("b", '{"x": 1}')]),
        ('Let me check. [TOOL_CALLS][{"name": "f", "arguments": {}}]', "Let me check.", [call("f", "{}")]),
        ("[TOOL_CALLS]get_weather" + WEATHER, None, [call("get_weather", WEATHER)]),
        ('[TOOL_CALLS]a[ARGS]{}[TOOL_CALLS]b [ARGS] {"x": 1}', None, [call("a", "{}"), call("b", '{"x": 1}')]),
        ('Hi [TOOL_CALLS][{"name": "f", "arguments": {"a": }}]', 'Hi [TOOL_CALLS][{"name": "f", "arguments": {"a": }}]',
         []),
        ('[TOOL_CALLS][{"arguments": {}}]', '[TOOL_CALLS][{"arguments": {}}]', []),
        ("[TOOL_CALLS]say[ARGS]" + TRICKY, None, [call("say", TRICKY)]),
        ('[TOOL_CALLS][{"name": "book", "arguments": ' + NESTED + "}]", None, [call("book", NESTED)]),
        ("[TOOL_CALLS]f[ARGS]{} ok", "ok", [call("f", "{}")]),
        ("[TOOL_CALLS] sorry, I cannot", "[TOOL_CALLS] sorry, I cannot", []),
        ("[TOOL_CALLS]f[ARGS]{} [TOOL_CALLS]{bad}", "[TOOL_CALLS]{bad}", [call("f", "{}")]),
        ("text [TOOL", "text [TOOL", []),
    ],
    "json_array": [
        ('[{"name": "get_weather", "parameters": ' + WEATHER + "}]", None, [call("get_weather", WEATHER)]),
        ('[{"name": "a", "parameters": {}}, {"name": "b", "parameters": {"x": 1}}]', None,
         [call("a", "{}"), call("b", '{"x": 1}')]),
        ('[{"parameters": {"x": [1, 2.5]}, "name": "b"}]', None, [call("b", '{"x": [1, 2.5]}')]),
        ('[{"name":"say","parameters":' + TRICKY + "}]", None, [call("say", TRICKY)]),
        ('\n [\n  {"name": "book", "parameters": ' + NESTED + "}\n ]\n", None, [call("book", NESTED)]),
        ('[{"n": 12, "name": "f", "parameters": {}, "m": [1.5e3, -2]}]', None, [call("f", "{}")]),
        ("sorry", "sorry", []),
        ('[{"parameters": {}}]', '[{"parameters": {}}]', []),
        ("[]", None, []),
    ],
    "named": [
        (WEATHER, None, [call("get_weather", WEATHER)]),
        ("\n " + NESTED + " \n", None, [call("get_weather", NESTED)]),
        (TRICKY, None, [call("get_weather", TRICKY)]),
        ("sorry", "sorry", []),
        ("", None, []),
    ],
}
CASE_IDS = [(kind, i) for kind, cases in CASES.items() for i in range(len(cases))]


def test_registry():
    assert set(PARSERS) == {"hermes", "llama3_json", "mistral", "json_array", "named"}
    assert isinstance(get_parser("hermes"), HermesParser)
    assert get_parser("named", "f").name == "f"
    with pytest.raises(ValueError, match="unknown tool call parser"):
        get_parser("nope")


@pytest.mark.parametrize("kind,i", CASE_IDS, ids=[f"{k}-{i}" for k, i in CASE_IDS])
def test_parse_and_stream(kind, i):
    text, content, calls = CASES[kind][i]
    parsed = check_contract(kind, text)
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.calls] == calls
    # Markup stays out of the content (the exact contents above), but for calls that do not parse.
    if content is not None and all(m not in text for m in MALFORMED):
        assert not any(m in content for m in MARKUP), content


FRAGMENTS = {
    "hermes": ["<tool_call>", "</tool_call>", "\n", " ", "<", "tool", '{"name": "f", "arguments": {"a": 1}}', "{", "}",
               '"name"', ": ", '"g"', ',"arguments":', '{"x": "}"}', "hi", "\\", '"'],
    "llama3_json": ["<|python_tag|>", '{"name": "f", "parameters": {"a": 1}}', ";", " ", "\n", "{", "}", '"name"',
                    ': "g"', ', "parameters": ', "[", "]", '"', "\\", "hi", "<|py"],
    "mistral": ["[TOOL_CALLS]", "[ARGS]", '[{"name": "f", "arguments": {"a": 1}}]', "f", " ", "{", "}", "[", "]", '"',
                '{"x": "]"}', ",", "\\", "hi", "[TOOL", "get_weather"],
}


@pytest.mark.parametrize("kind", list(FRAGMENTS))
def test_stream_matches_parse_on_random_text(kind):
    """The free-form formats keep the contract on any text at all, markup-like garbage included."""
    rng = random.Random(1234)
    for _ in range(150):
        text = "".join(rng.choice(FRAGMENTS[kind]) for _ in range(rng.randint(1, 12)))
        chunkings = [list(text), [text]] + [s for s in splits(text, rng.random()) if len(s) > 2][-3:]
        cut = rng.randint(0, len(text))
        check_contract(kind, text, chunkings + [[text[:cut], text[cut:]]])


def test_hermes_holds_back_a_possible_tag():
    p = HermesParser()
    assert p.feed("Hello <tool").content == "Hello"
    piece = p.feed("_call>\n{\"name\": \"f\", \"arguments\": {}}\n")
    assert piece.content == "" and piece.calls == []  # a call goes out once its block closes
    piece = p.feed("</tool_call>")
    assert [(d.name, d.arguments) for d in piece.calls] == [("f", ""), (None, "{}")]
    p = HermesParser()
    assert p.feed("a <tool").content == "a"
    assert p.feed("box> b").content == " <toolbox> b"
    assert p.end().content == ""


def test_mistral_holds_back_a_possible_marker():
    p = MistralParser()
    assert p.feed("Sure [TOOL_").content == "Sure"
    assert p.feed("CALLS]f[AR").calls == []
    piece = p.feed('GS]{"a": 1}')
    assert [(d.name, d.arguments) for d in piece.calls] == [("f", ""), (None, '{"a": 1}')]


def test_forced_arguments_stream_as_generated():
    p = JsonArrayParser()
    piece = p.feed('[{"name": "f", "parameters": {"city": "Pa')
    assert [(d.index, d.name, d.arguments) for d in piece.calls] == [(0, "f", ""), (0, None, '{"city": "Pa')]
    assert [d.arguments for d in p.feed('ris"}}, {"parameters": {"x"').calls] == ['ris"}']
    piece = p.feed(': 1}, "name": "g"}]')  # arguments before the name wait for it
    assert [(d.index, d.name, d.arguments) for d in piece.calls] == [(1, "g", ""), (1, None, '{"x": 1}')]
    assert p.end() == type(piece)()
    p = NamedParser("f")
    piece = p.feed(' \n{"a": ')
    assert [(d.name, d.arguments) for d in piece.calls] == [("f", ""), (None, '{"a":')]
    assert [d.arguments for d in p.feed('2} \n').calls] == [' 2}']


def test_forced_output_cut_short():
    """Cut before a call starts, streamed and parsed agree (content); after, parse gives content while
    the stream has sent the call's start: the caller, who knows the output was cut, decides."""
    text = '[{"name": "get_weather", "parameters": {"city": "Paris"}}]'
    for n in range(len(text)):
        parsed = JsonArrayParser().parse(text[:n])
        assert parsed.calls == [] and parsed.content == (text[:n].strip() or None)
        content, calls = run_stream(JsonArrayParser(), list(text[:n]))
        if calls:
            assert content == "" and calls[0][1] == "get_weather"
            assert text[text.index('{"city'):n].startswith(calls[0][2])  # the arguments as far as they go
        else:
            assert content == text[:n].strip()


# -- tools schemas ---------------------------------------------------------------------------------------
def fn_tool(name, parameters=None, **extra):
    function = {"name": name, **extra}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [fn_tool("get_weather", CITY, description="Weather now"), fn_tool("now"),
         fn_tool("add", {"properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}, strict=True)]


def test_check_tools_accepts_good_tools():
    check_tools(TOOLS)
    check_tools([fn_tool("f", {})])
    check_tools([])


@pytest.mark.parametrize("tools,message", [
    ("nope", r"^tools must be an array$"),
    ([1], r"^tools\[0\] must be an object$"),
    ([{"type": "code", "function": {"name": "f"}}], r'^tools\[0\]\.type must be "function"'),
    ([{"type": "function"}], r"^tools\[0\]\.function is required$"),
    ([{"type": "function", "function": "f"}], r"^tools\[0\]\.function must be an object$"),
    ([fn_tool("ok"), {"type": "function", "function": {}}], r"^tools\[1\]\.function\.name is required$"),
    ([fn_tool("")], r"^tools\[0\]\.function\.name must be 1 to 64 characters"),
    ([fn_tool("get weather")], r"^tools\[0\]\.function\.name must be"),
    ([fn_tool("x" * 65)], r"^tools\[0\]\.function\.name must be"),
    ([fn_tool("f", description=3)], r"^tools\[0\]\.function\.description must be a string$"),
    ([fn_tool("ok"), fn_tool("f", {"type": "string"})],
     r"^tools\[1\]\.function\.parameters must be a JSON schema of type object$"),
    ([fn_tool("f", {"type": "array", "properties": {}})], r"parameters must be a JSON schema of type object"),
    ([fn_tool("f", {"required": ["a"]})], r"parameters must be a JSON schema of type object"),
    ([fn_tool("f", {"type": "object", "properties": []})], r"parameters must be a JSON schema of type object"),
    ([fn_tool("f", [])], r"parameters must be a JSON schema of type object"),
    ([fn_tool("f", strict="yes")], r"^tools\[0\]\.function\.strict must be a boolean$"),
    ([fn_tool("f"), fn_tool("g"), fn_tool("f")], r"^tools\[2\]\.function\.name 'f' is already the name of tools\[0\]$"),
])
def test_check_tools_errors(tools, message):
    with pytest.raises(ValueError, match=message):
        check_tools(tools)


def test_named_schema():
    assert named_schema(TOOLS[0]) is CITY
    assert named_schema(TOOLS[1]) == {"type": "object", "properties": {}}
    assert named_schema(TOOLS[2])["type"] == "object"
    schema = named_schema(TOOLS[0])
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate({"city": "Paris"}, schema)
    for bad in ({}, {"city": 3}, ["Paris"], "Paris"):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], named_schema(TOOLS[1]))
    parsed = NamedParser("get_weather").parse('{"city": "Paris"}')
    jsonschema.validate(json.loads(parsed.calls[0].arguments), schema)


def test_required_schema():
    one, many = required_schema(TOOLS, parallel=False), required_schema(TOOLS, parallel=True)
    for schema in (one, many):
        jsonschema.Draft202012Validator.check_schema(schema)
    good = '[{"name": "get_weather", "parameters": {"city": "Paris"}}]'
    two = '[{"name": "now", "parameters": {}}, {"name": "add", "parameters": {"a": 1, "b": 2}}]'
    for text, schema in ((good, one), (good, many), (two, many)):
        jsonschema.validate(json.loads(text), schema)
        parsed = JsonArrayParser().parse(text)
        assert parsed.content is None and len(parsed.calls) == len(json.loads(text))
        for c in parsed.calls:
            tool = next(t for t in TOOLS if t["function"]["name"] == c.name)
            jsonschema.validate(json.loads(c.arguments), named_schema(tool))
    bad = ['[]', two, '[{"name": "get_weather", "parameters": {"city": 1}}]', '[{"name": "nope", "parameters": {}}]',
           '[{"name": "now"}]', '[{"name": "now", "parameters": {}, "x": 1}]', '{"name": "now", "parameters": {}}']
    for text in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(json.loads(text), one)


# -- the ChatML tools template -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from os.path import basename, dirname

    from transformers import AutoTokenizer

    from scalellm.model.loader import default_model_path

    try:
        path = default_model_path()
    except ValueError as e:
        pytest.skip(str(e))
    return AutoTokenizer.from_pretrained(dirname(path), gguf_file=basename(path))


@pytest.fixture(scope="module")
def template():
    return (importlib.resources.files("scalellm") / "server" / "chat_templates" / "chatml_tools.jinja").read_text()


PLAIN = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a {joke} \u2014 <b>now</b>\n\nplease"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": " "}, {"role": "assistant", "content": "ok"}],
]


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_template_without_tools_is_the_models_own(tokenizer, template, generation_prompt):
    for conversation in PLAIN:
        own = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
        ours = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
        assert ours == own
        assert tokenizer.apply_chat_template(conversation, chat_template=template, tools=[], tokenize=False,
                                             add_generation_prompt=generation_prompt) == own


def test_template_with_tools(tokenizer, template):
    conversation = [
        {"role": "user", "content": "Weather in Paris, and the time?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 18}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
        {"role": "assistant", "content": "It is 18 \u00b0C at noon."},
        {"role": "user", "content": "Thanks"},
    ]
    text = tokenizer.apply_chat_template(conversation, tools=TOOLS, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in TOOLS)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                           "\n\n# Tools\n")
    assert f"<tools>\n{lines}\n</tools>" in text
    assert ('<tool_call>\n{"name": <function name>, "arguments": <arguments as a JSON object>}\n</tool_call>'
            "<|im_end|>\n<|im_start|>user\nWeather in Paris, and the time?<|im_end|>\n") in text
    turn = ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call><|im_end|>\n')
    assert turn in text
    assert ('<|im_start|>user\n<tool_response>\n{"celsius": 18}\n</tool_response>\n<tool_response>\n12:00\n'
            "</tool_response><|im_end|>\n<|im_start|>assistant\nIt is 18 \u00b0C at noon.<|im_end|>\n") in text
    assert text.endswith("<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|im_start|>system") == 1
    reply = turn[len("<|im_start|>assistant\n"):-len("<|im_end|>\n")]
    parsed = HermesParser().parse(reply)  # the template writes calls the way the hermes parser reads them
    assert parsed.content is None
    assert [(c.name, c.arguments) for c in parsed.calls] == [("get_weather", '{"city": "Paris"}'), ("now", "{}")]


def test_template_with_tools_and_system(tokenizer, template):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Checking.", "tool_calls": [
                        {"type": "function", "function": {"name": "now", "arguments": None}}]}]
    text = tokenizer.apply_chat_template(conversation, tools=TOOLS[1:2], chat_template=template, tokenize=False)
    assert text.startswith('<|im_start|>system\nBe brief.\n\n# Tools\n')
    assert '<tools>\n{"type": "function", "function": {"name": "now"}}\n</tools>' in text
    assert text.count("Be brief.") == 1 and "SmolLM" not in text
    assert text.endswith('<|im_start|>assistant\nChecking.\n<tool_call>\n{"name": "now", "arguments": {}}\n'
                         "</tool_call><|im_end|>\n")
