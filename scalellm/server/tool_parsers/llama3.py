"""Llama 3.x JSON calls: the whole output, after optional whitespace and an optional "<|python_tag|>",
is a call object {"name": ..., "parameters": {...}} ("arguments" is read too), or several separated by
";" and/or whitespace (or nothing). Output that does not start with "{" there is content. The calls are
read in order; from the first object that is not a call on, the rest of the output is content, and so is
any text after the last call that does not start another object. Each call is sent once its object closes.
"""
from __future__ import annotations

from .base import JsonEnd, Parsed, ToolParser, read_call, skip_space

PYTHON_TAG = "<|python_tag|>"


def lead(text: str) -> int | None:
    """Where the first call object starts; -1 when the output is content; None while undecided."""
    i = skip_space(text, 0)
    if text.startswith(PYTHON_TAG, i):
        i = skip_space(text, i + len(PYTHON_TAG))
    elif PYTHON_TAG.startswith(text[i:]):
        return None
    if i == len(text):
        return None
    return i if text[i] == "{" else -1


def skip_separator(text: str, i: int) -> int:
    i = skip_space(text, i)
    if i < len(text) and text[i] == ";":
        i = skip_space(text, i + 1)
    return i


class Llama3JsonParser(ToolParser):
    def __init__(self):
        super().__init__()
        self._buf = ""
        self._state = "lead"  # lead | object | between | content
        self._end = JsonEnd()
        self._scan = 0

    def parse(self, text: str) -> Parsed:
        i = lead(text)
        if i is None or i < 0:
            return self._parsed([text], [])
        calls = []
        while (call := read_call(text, i)) is not None:
            calls.append(call[:2])
            i = skip_separator(text, call[2])
            if i == len(text) or text[i] != "{":
                break
        return self._parsed([text[i:]], calls)

    def _step(self, delta: str) -> None:
        self._buf += delta
        while self._advance():
            pass

    def _advance(self) -> bool:
        """One step of the reading; False when it needs more text."""
        if self._state == "content":
            self._content(self._buf)
            self._buf = ""
            return False
        if self._state == "object":
            return self._object()
        i = lead(self._buf) if self._state == "lead" else skip_separator(self._buf, 0)
        if i is None or i == len(self._buf):
            return False
        if i < 0 or self._buf[i] != "{":
            self._state = "content"
        else:
            self._state, self._end, self._scan = "object", JsonEnd(), 0
        if i >= 0:
            self._buf = self._buf[i:]
        return True

    def _object(self) -> bool:
        end = self._end.feed(self._buf[self._scan:])
        if end < 0:
            self._scan = len(self._buf)
            return False
        end += self._scan
        call = read_call(self._buf[:end], 0)
        if call is None:
            self._state = "content"
        else:
            self._call(*call[:2])
            self._buf, self._state = self._buf[end:], "between"
        return True

    def _finish(self) -> None:
        if self._state != "between":
            self._content(self._buf)
        self._buf = ""
