"""What every tool-call format shares: the result types, call ids, the content rule and JSON helpers.

A parser reads a model's output two ways: `parse(text)` on the whole of it, and `feed(delta)` per
generated piece followed by `end()`. Both give the same answer for any split of the text:

* content: the text outside the calls, concatenated and stripped of leading and trailing whitespace
  (`str.strip`); `None` (non-streamed) or nothing (streamed) when that leaves nothing. Whitespace
  between two pieces of content survives even when a call stands between them.
* calls: in order, each with the arguments object's JSON text exactly as the model wrote it. Streamed,
  a call's first delta carries its index, id and name (and `arguments=""`), later ones argument
  fragments that concatenate to that text.
* call markup that does not parse (bad JSON, no name, unterminated) stays in the content as written.
"""
from __future__ import annotations

import abc

import hashlib
import json
import secrets
from dataclasses import dataclass, field


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # the JSON text of an object


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass
class Parsed:
    content: str | None
    calls: list[ToolCall] = field(default_factory=list)


@dataclass
class Piece:
    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _not_json(name: str):
    raise ValueError(f"{name} is not JSON")


# Strict JSON: Python's json also reads NaN and Infinity, which other clients' parsers reject.
DECODER = json.JSONDecoder(parse_constant=_not_json)


def is_json_object(text: str) -> bool:
    try:
        return isinstance(DECODER.decode(text), dict)
    except ValueError:
        return False


def skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def held_prefix(text: str, tag: str) -> int:
    """How many characters at the end of text could be the start of tag (to hold back until decided)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def member_spans(text: str, start: int) -> dict[str, tuple[int, int]]:
    """Top-level members of the valid JSON object at text[start]: key -> (start, end) of its value."""
    spans = {}
    i = skip_space(text, start + 1)
    while text[i] != "}":
        key, i = DECODER.raw_decode(text, i)
        i = skip_space(text, skip_space(text, i) + 1)  # past the colon
        _, end = DECODER.raw_decode(text, i)
        spans[key] = (i, end)
        i = skip_space(text, end)
        if text[i] == ",":
            i = skip_space(text, i + 1)
    return spans


def arguments_text(value) -> str | None:
    """The arguments of a call given as something other than an object: absent/null, or an object's JSON text."""
    if value is None:
        return "{}"
    if isinstance(value, str) and is_json_object(value):
        return value.strip()
    return None


def read_call(text: str, start: int) -> tuple[str, str, int] | None:
    """The call object {"name": ..., "arguments" or "parameters": {...}} at text[start]:
    (name, arguments JSON text, end), or None when there is none there."""
    try:
        obj, end = DECODER.raw_decode(text, start)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = "arguments" if "arguments" in obj else "parameters"
    if isinstance(obj.get(key), dict):
        a, b = member_spans(text, start)[key]
        args = text[a:b]
    else:
        args = arguments_text(obj.get(key))
    return None if args is None else (obj["name"], args, end)


def array_calls(text: str, start: int) -> tuple[list[tuple[str, str]], int] | None:
    """The JSON array of call objects at text[start]: ([(name, arguments)], end), or None."""
    try:
        items, end = DECODER.raw_decode(text, start)
    except ValueError:
        return None
    if not isinstance(items, list):
        return None
    calls, i = [], skip_space(text, start + 1)
    for _ in items:
        call = read_call(text, i)
        if call is None:
            return None
        calls.append(call[:2])
        i = skip_space(text, call[2])
        if text[i] == ",":
            i = skip_space(text, i + 1)
    return calls, end


class JsonEnd:
    """Fed the text of one JSON object or array from its opening bracket on, finds its closing bracket
    (brackets inside strings do not count). Right on valid JSON; on invalid JSON it may stop anywhere,
    and the caller's validation of the span it gives rejects it."""

    def __init__(self):
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def feed(self, text: str) -> int:
        """Index in text just past the closing bracket, or -1 when it has not come yet."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    return i + 1
        return -1


class ToolParser(abc.ABC):
    """One model output's tool calls: `parse` the whole text, or `feed` deltas then `end` once."""

    def __init__(self):
        self._piece = Piece()
        self._count = 0  # calls started so far
        self._started = False  # content: something other than whitespace has been sent
        self._space = ""  # content: trailing whitespace held until more content follows
        # streamed: call ids derived from this (the stream's id and choice) and the call's number, so
        # a stream resumed elsewhere names its calls as the first server did
        self.id_seed: str | None = None

    @abc.abstractmethod
    def parse(self, text: str) -> Parsed:
        """The whole output's content and calls."""

    def feed(self, delta: str) -> Piece:
        self._step(delta)
        return self._take()

    def end(self) -> Piece:
        self._finish()
        return self._take()

    # -- for the formats -------------------------------------------------------------------------
    @abc.abstractmethod
    def _step(self, delta: str) -> None:
        """Take the next piece of streamed text (emit through _content, _start_call, _args)."""

    @abc.abstractmethod
    def _finish(self) -> None:
        """The output ended: emit what was held back."""

    def new_id(self) -> str:
        if self.id_seed is None:
            return new_call_id()
        return "call_" + hashlib.blake2b(f"{self.id_seed}:{self._count}".encode(), digest_size=12).hexdigest()

    def _parsed(self, parts: list[str], calls: list[tuple[str, str]]) -> Parsed:
        content = "".join(parts).strip() or None
        return Parsed(content, [ToolCall(self.new_id(), name, args) for name, args in calls])

    def _content(self, text: str) -> None:
        if not self._started:
            text = text.lstrip()
            if not text:
                return
            self._started = True
        text = self._space + text
        body = text.rstrip()
        self._space = text[len(body):]
        self._piece.content += body

    def _start_call(self, name: str) -> None:
        self._piece.calls.append(ToolCallDelta(self._count, self.new_id(), name, ""))
        self._count += 1

    def _args(self, fragment: str) -> None:
        if fragment:
            self._piece.calls.append(ToolCallDelta(self._count - 1, arguments=fragment))

    def _call(self, name: str, args: str) -> None:
        self._start_call(name)
        self._args(args)

    def _take(self) -> Piece:
        piece, self._piece = self._piece, Piece()
        return piece
