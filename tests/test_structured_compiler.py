"""The grammars each constraint compiles to, checked by feeding them text (bundled tokenizer): what they
accept and refuse, the cache, and the bounds on size and cost."""
import pytest

from scalellm.structured import GrammarCompiler, StructuredOutputError, StructuredOutputsParams
from scalellm.structured.compiler import MAX_SOURCE_BYTES
from tests.checkpoints import bundled_tokenizer


@pytest.fixture(scope="module")
def compiler():
    tok = bundled_tokenizer()
    return GrammarCompiler(tok, 49152, [tok.eos_token_id])


def accepts(compiler, params, text: str) -> bool:
    """Whether the constraint admits `text` as a whole output."""
    matcher = compiler.compile(params).new_matcher()
    ids = compiler.tokenizer.tokenize_str(text)
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


def test_each_kind_accepts_and_refuses(compiler):
    schema = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}},
                                           "required": ["a"], "additionalProperties": False})
    assert accepts(compiler, schema, '{"a":12}')
    assert not accepts(compiler, schema, '{"a": 12}')  # compact by default
    assert not accepts(compiler, schema, '{"a":"x"}')
    spaced = StructuredOutputsParams(json=schema.json, disable_any_whitespace=False)
    assert accepts(compiler, spaced, '{ "a": 12 }')
    assert accepts(compiler, StructuredOutputsParams(json_object=True), '{"k":[1,2]}')
    assert not accepts(compiler, StructuredOutputsParams(json_object=True), '[1]')
    assert accepts(compiler, StructuredOutputsParams(regex=r"\d{3}-[a-z]+"), "123-abc")
    assert not accepts(compiler, StructuredOutputsParams(regex=r"\d{3}-[a-z]+"), "12-abc")
    assert accepts(compiler, StructuredOutputsParams(choice=["red", "green"]), "green")
    assert not accepts(compiler, StructuredOutputsParams(choice=["red", "green"]), "blue")
    lark = StructuredOutputsParams(grammar='start: "n=" /[0-9]+/')
    assert accepts(compiler, lark, "n=42") and not accepts(compiler, lark, "n=x")
    gbnf = StructuredOutputsParams(grammar='root ::= "y" [ab]+')
    assert accepts(compiler, gbnf, "yabba") and not accepts(compiler, gbnf, "yc")


def test_structural_tag(compiler):
    tag = StructuredOutputsParams(structural_tag={
        "type": "structural_tag", "triggers": ["<f="],
        "structures": [{"begin": "<f=weather>", "end": "</f>", "schema": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
            "additionalProperties": False}}]})
    assert accepts(compiler, tag, 'Let me check. <f=weather>{"city":"Paris"}</f> Done.')
    assert accepts(compiler, tag, "No call at all.")
    assert not accepts(compiler, tag, '<f=weather>{"town":"Paris"}</f>')


def test_cache_key_order_and_bounds(compiler):
    first = compiler.compile(StructuredOutputsParams(json={"type": "object", "properties": {"a": {}, "b": {}}}))
    again = compiler.compile(StructuredOutputsParams(json={"type": "object", "properties": {"a": {}, "b": {}}}))
    reordered = compiler.compile(StructuredOutputsParams(json={"type": "object", "properties": {"b": {}, "a": {}}}))
    assert first is again and reordered is not first  # property order orders the output: not the same grammar
    with pytest.raises(StructuredOutputError, match="larger than"):
        compiler.compile(StructuredOutputsParams(regex="a" * (MAX_SOURCE_BYTES + 1)))
    with pytest.raises(StructuredOutputError, match="too complex"):
        compiler.compile(StructuredOutputsParams(regex="(a{100}){100}{100}"))
    with pytest.raises(StructuredOutputError, match="Unimplemented|unimplemented|not supported|Unknown"):
        compiler.compile(StructuredOutputsParams(json={"type": "array", "uniqueItems": True}))
    with pytest.raises(StructuredOutputError):
        StructuredOutputsParams(json={"type": "object"}, regex="a")
