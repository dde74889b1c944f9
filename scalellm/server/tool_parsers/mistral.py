"""Mistral calls, after "[TOOL_CALLS]" (text before it is content):

    [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]     (v3 tokenizers)
    [TOOL_CALLS]f{...}  or  [TOOL_CALLS]f[ARGS]{...}         (newer ones; one call per marker)

Whitespace is allowed around the name and "[ARGS]". Text after a call is content again, and may hold
further markers. From a marker whose calls do not parse on, the rest of the output is content. Calls
are sent once their JSON closes. Call ids are 9 letters and digits, as Mistral's templates require.
"""
from __future__ import annotations

import secrets
import string

from .base import DECODER, JsonEnd, Parsed, ToolParser, array_calls, held_prefix, skip_space

MARK, ARGS = "[TOOL_CALLS]", "[ARGS]"
NAME_CHARS = frozenset(string.ascii_letters + string.digits + "_-.")
ID_CHARS = string.ascii_letters + string.digits


def head(text: str, i: int):
    """What follows a marker at text[i:]: ("array", start), ("name", name, start of the arguments),
    None while undecided, False when it is neither form."""
    i = skip_space(text, i)
    if i == len(text):
        return None
    if text[i] == "[":
        return "array", i
    j = i
    while j < len(text) and text[j] in NAME_CHARS:
        j += 1
    k = skip_space(text, j)
    if k == len(text):
        return None
    if j == i:
        return False
    if text.startswith(ARGS, k):
        k = skip_space(text, k + len(ARGS))
    elif ARGS.startswith(text[k:]):
        return None
    if k == len(text):
        return None
    return ("name", text[i:j], k) if text[k] == "{" else False


def named_call(name: str, text: str, start: int) -> tuple[list[tuple[str, str]], int] | None:
    try:
        args, end = DECODER.raw_decode(text, start)
    except ValueError:
        return None
    return ([(name, text[start:end])], end) if isinstance(args, dict) else None


def block_calls(text: str, i: int):
    """The calls after a marker at text[i:] and where they end, or None."""
    form = head(text, i)
    if not form:
        return None
    if form[0] == "array":
        return array_calls(text, form[1])
    return named_call(form[1], text, form[2])


class MistralParser(ToolParser):
    def __init__(self):
        super().__init__()
        self._buf = ""  # in a block: the text after its marker
        self._state = "text"  # text | head | json | content
        self._end = JsonEnd()
        self._scan = 0

    def new_id(self) -> str:
        return "".join(secrets.choice(ID_CHARS) for _ in range(9))

    def parse(self, text: str) -> Parsed:
        parts, calls, i = [], [], 0
        while (m := text.find(MARK, i)) >= 0:
            parts.append(text[i:m])
            got = block_calls(text, m + len(MARK))
            if got is None:
                i = m
                break
            calls += got[0]
            i = got[1]
        parts.append(text[i:])
        return self._parsed(parts, calls)

    def _step(self, delta: str) -> None:
        self._buf += delta
        steps = {"text": self._in_text, "head": self._in_head, "json": self._in_json, "content": self._in_content}
        while steps[self._state]():
            pass

    def _in_text(self) -> bool:
        m = self._buf.find(MARK)
        if m < 0:
            keep = len(self._buf) - held_prefix(self._buf, MARK)
            self._content(self._buf[:keep])
            self._buf = self._buf[keep:]
            return False
        self._content(self._buf[:m])
        self._buf, self._state = self._buf[m + len(MARK):], "head"
        return True

    def _in_head(self) -> bool:
        form = head(self._buf, 0)
        if form is None:
            return False
        if form is False:
            self._malformed()
        else:
            self._end = JsonEnd()
            self._scan = form[-1]
            self._state = "json"
        return True

    def _in_json(self) -> bool:
        end = self._end.feed(self._buf[self._scan:])
        if end < 0:
            self._scan = len(self._buf)
            return False
        end += self._scan
        got = block_calls(self._buf[:end], 0)
        if got is None:
            self._malformed()
            return True
        for call in got[0]:
            self._call(*call)
        self._buf, self._state = self._buf[end:], "text"
        return True

    def _in_content(self) -> bool:
        self._content(self._buf)
        self._buf = ""
        return False

    def _malformed(self) -> None:
        self._buf, self._state = MARK + self._buf, "content"

    def _finish(self) -> None:
        if self._state in ("head", "json"):
            self._malformed()
        self._content(self._buf)
        self._buf = ""
