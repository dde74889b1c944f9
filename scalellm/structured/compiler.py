"""Constraints to llguidance grammars: built once per distinct constraint, checked, cached.

llguidance (an Earley parser over a lexer, in Rust) compiles lazily, so even a schema of hundreds of
properties is ready in milliseconds; its parser limits bound the work of a hostile grammar (compile
and every mask step run on fuel, see LLParserLimits). The server compiles on its worker pool, never on
the event loop; a matcher per sequence is a deep copy of the cached one.
"""
from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np

from scalellm.structured.params import StructuredOutputError, StructuredOutputsParams

MAX_SOURCE_BYTES = 1 << 20  # the largest schema or grammar text accepted
# A grammar whose first token mask takes longer is refused: masks are computed inside the batch's step,
# so one request's costly lexer would stall every stream (ordinary schemas stay far below the limit).
MAX_FIRST_MASK_SECONDS = 0.1
# Below llguidance's defaults: a request's grammar must stay cheap for the whole batch.
LIMITS = dict(max_grammar_size=200_000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
              step_max_items=50_000, max_lexer_states=100_000)


@dataclass
class CompiledGrammar:
    key: tuple
    matcher: llguidance.LLMatcher  # the initial state; sequences take deep copies

    def new_matcher(self) -> llguidance.LLMatcher:
        return self.matcher.deep_copy()


class GrammarCompiler:
    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: list[int], compact_json: bool = True,
                 cache_size: int = 512):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.compact_json = compact_json
        self.cache_size = cache_size
        self._hf = hf_tokenizer
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[tuple, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiled = 0

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary (about 0.4 s to build for 49k tokens: once, on first use)."""
        with self._lock:
            if self._tokenizer is None:
                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size,
                                                                   eos_token=self.eos_token_ids)
                except Exception as e:
                    raise StructuredOutputError(f"structured outputs are not available for this model's "
                                                f"tokenizer: {e}") from None
            return self._tokenizer

    def compile(self, params: StructuredOutputsParams, param: str = "structured_outputs") -> CompiledGrammar:
        """The compiled grammar for these constraints (cached); StructuredOutputError if it is invalid."""
        key = params.cache_key(self.compact_json)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        grammar = grammar_text(params, key[2], param)
        limits = llguidance.LLParserLimits(**LIMITS)
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=limits)
        if matcher.is_error():
            raise StructuredOutputError(f"invalid {_describe(params.kind)}: {_first_line(matcher.get_error())}", param)
        self._probe(matcher, params.kind, param)
        compiled = CompiledGrammar(key, matcher)
        with self._lock:
            self._cache[key] = compiled
            self.num_compiled += 1
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _probe(self, matcher: llguidance.LLMatcher, kind: str, param: str) -> None:
        """Compute the first mask here, on the compiling thread: it builds the lexer states the sequences'
        copies start from, and refuses a grammar too costly to run inside a step."""
        mask = np.empty((1, (self.vocab_size + 31) // 32), np.int32)
        start = time.perf_counter()
        llguidance.numpy.fill_next_token_bitmask(matcher, mask, 0)
        elapsed = time.perf_counter() - start
        if matcher.is_error():
            raise StructuredOutputError(f"invalid {_describe(kind)}: {_first_line(matcher.get_error())}", param)
        if elapsed > MAX_FIRST_MASK_SECONDS:
            raise StructuredOutputError(f"the {_describe(kind)} is too complex: its first token mask took "
                                        f"{elapsed * 1000:.0f} ms (at most {MAX_FIRST_MASK_SECONDS * 1000:.0f} ms)",
                                        param)

    def cached(self, params: StructuredOutputsParams) -> bool:
        with self._lock:
            return params.cache_key(self.compact_json) in self._cache


def grammar_text(params: StructuredOutputsParams, compact: bool, param: str) -> str:
    """The llguidance grammar for one constraint (not yet checked against the vocabulary)."""
    kind = params.kind
    value = getattr(params, kind)
    source = value if isinstance(value, str) else json.dumps(value)
    if len(source.encode()) > MAX_SOURCE_BYTES:
        raise StructuredOutputError(f"the {_describe(kind)} is larger than {MAX_SOURCE_BYTES} bytes", param)
    try:
        if kind in ("json", "json_object"):
            schema = {"type": "object"} if kind == "json_object" else _schema(value, param)
            options = {"whitespace_flexible": not compact}
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(value)
        if kind == "choice":
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
        if kind == "grammar":
            return llguidance.grammar_from("grammar", value)  # Lark as is; GBNF converted to Lark
        return _structural_tag(value, param)
    except StructuredOutputError:
        raise
    except Exception as e:
        raise StructuredOutputError(f"invalid {_describe(kind)}: {_first_line(str(e))}", param) from None


def _schema(value, param: str):
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise StructuredOutputError(f"the JSON schema is not valid JSON: {e}", param) from None
    if not isinstance(value, (dict, bool)):
        raise StructuredOutputError("a JSON schema must be an object", param)
    return value


def _structural_tag(value, param: str) -> str:
    """vLLM's structural tag: {"type": "structural_tag", "structures": [{"begin", "schema", "end"}],
    "triggers": [...]}: free text in which each trigger starts a tagged JSON segment."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise StructuredOutputError(f"structural_tag is not valid JSON: {e}", param) from None
    structures, triggers = value.get("structures"), value.get("triggers") if isinstance(value, dict) else None
    if not isinstance(structures, list) or not structures or not isinstance(triggers, list) or not triggers:
        raise StructuredOutputError("structural_tag needs non-empty 'structures' and 'triggers' lists", param)
    tags = []
    for i, s in enumerate(structures):
        if not isinstance(s, dict) or not isinstance(s.get("begin"), str) or not isinstance(s.get("end"), str):
            raise StructuredOutputError(f"structural_tag.structures[{i}] needs 'begin' and 'end' strings", param)
        trigger = max((t for t in triggers if isinstance(t, str) and t and s["begin"].startswith(t)), key=len,
                      default=None)
        if trigger is None:
            raise StructuredOutputError(f"structural_tag.structures[{i}].begin starts with none of the triggers",
                                        param)
        schema = s.get("schema", {"type": "object"})
        tags.append(llguidance.StructTag(trigger=trigger, begin=s["begin"], grammar=_schema(schema, param),
                                         end=s["end"]))
    return llguidance.LLMatcher.grammar_from_lark(llguidance.StructTag.to_grammar(tags))


def _describe(kind: str) -> str:
    return {"json": "JSON schema", "json_object": "JSON object constraint", "regex": "regex",
            "choice": "choice list", "grammar": "grammar", "structural_tag": "structural tag"}[kind]


def _first_line(message: str) -> str:
    return " ".join(message.strip().splitlines()[:6])[:500]
