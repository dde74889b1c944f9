"""Calls whose shape a grammar forced on the output, so arguments can stream as they are generated:

* JsonArrayParser (tool_choice "required"): the output is a JSON array of call objects
  [{"name": "f", "parameters": {...}}, ...] and nothing else.
* NamedParser (tool_choice names one function): the output is that function's arguments object.

Both assume the grammar held. Output that is not what the grammar allows is content in `parse`, and
also when streamed as long as no call has gone out yet. Output cut short (max_tokens) after a call
started streaming leaves that call's arguments incomplete in the stream, while `parse` gives the
text as content: only the caller knows the output was cut, and it decides what to send.
"""
from __future__ import annotations

from .base import DECODER, JsonEnd, Parsed, ToolParser, array_calls, arguments_text, is_json_object, skip_space

ARG_KEYS = ("arguments", "parameters")


class NamedParser(ToolParser):
    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self._state = "lead"  # lead | args | content
        self._arg_space = ""  # trailing whitespace of the arguments, held back (they are the stripped text)

    def parse(self, text: str) -> Parsed:
        args = text.strip()
        if args.startswith("{") and is_json_object(args):
            return self._parsed([], [(self.name, args)])
        return self._parsed([text], [])

    def _step(self, delta: str) -> None:
        if self._state == "lead":
            delta = delta.lstrip()
            if not delta:
                return
            self._state = "args" if delta[0] == "{" else "content"
            if self._state == "args":
                self._start_call(self.name)
        if self._state == "content":
            self._content(delta)
            return
        text = self._arg_space + delta
        body = text.rstrip()
        self._arg_space = text[len(body):]
        self._args(body)

    def _finish(self) -> None:
        pass


class JsonArrayParser(ToolParser):
    def __init__(self):
        super().__init__()
        self._buf = ""
        self._pos = 0  # next character of _buf to read
        self._state = "open"  # open | item | key | colon | value | args | after | done | bad
        self._first = True  # no item read yet
        self._key = None
        self._new_item()

    def _new_item(self) -> None:
        self._name = None
        self._open = False  # the call's first delta has gone out
        self._arg_kind = None  # None: no arguments yet; "object": streamed as read; "value": anything else
        self._arg_value = None
        self._held = ""  # an arguments object read before the name
        self._end = JsonEnd()

    def parse(self, text: str) -> Parsed:
        body = text.strip()
        got = array_calls(body, 0) if body.startswith("[") else None
        if got is None or got[1] != len(body):
            return self._parsed([text], [])
        return self._parsed([], got[0])

    def _step(self, delta: str) -> None:
        self._buf += delta
        while self._advance():
            pass

    def _finish(self) -> None:
        if self._state != "done" and self._count == 0:
            self._content(self._buf)  # not what the grammar allows, or cut short: parse gives it as content
        self._buf = ""

    def _advance(self) -> bool:
        """Read one step; False when it needs more text."""
        if self._state == "args":
            return self._in_args()
        i = skip_space(self._buf, self._pos)
        if self._state in ("bad", "done") or i == len(self._buf):
            if self._state == "done" and i < len(self._buf):
                self._state = "bad"
            return False
        ch, state = self._buf[i], self._state
        self._pos = i + 1
        if state == "value":
            return self._in_value(i)
        if state == "open" and ch == "[":
            self._state = "item"
        elif state == "item" and ch == "{":
            self._new_item()
            self._state, self._first = "key", False
        elif (state == "item" and self._first or state == "after") and ch == "]":
            self._state = "done"
        elif state == "after" and ch == ",":
            self._state = "item"
        elif state == "key" and ch == '"':
            return self._in_key(i)
        elif state == "key" and ch == "}":
            self._close_item()
        elif state == "colon" and ch == ":":
            self._state = "value"
        elif not (state == "key" and ch == ","):
            self._state = "bad"
        return True

    def _in_key(self, i: int) -> bool:
        try:
            self._key, self._pos = DECODER.raw_decode(self._buf, i)
        except ValueError:  # not closed yet
            self._pos = i
            return False
        self._state = "colon"
        return True

    def _in_value(self, i: int) -> bool:
        self._pos = i
        if self._key in ARG_KEYS and self._arg_kind is None and self._buf[i] == "{":
            self._arg_kind, self._state = "object", "args"
            return True
        try:
            value, end = DECODER.raw_decode(self._buf, i)
        except ValueError:  # not complete yet
            return False
        if isinstance(value, (int, float)) and not isinstance(value, bool) and end == len(self._buf):
            return False  # a number may go on
        if self._key == "name" and isinstance(value, str) and value and self._name is None:
            self._name = value
            self._open_call()
        elif self._key in ARG_KEYS and self._arg_kind is None:
            self._arg_kind, self._arg_value = "value", value
        self._pos, self._state = end, "key"
        return True

    def _in_args(self) -> bool:
        end = self._end.feed(self._buf[self._pos:])
        stop = len(self._buf) if end < 0 else self._pos + end
        chunk = self._buf[self._pos:stop]
        if self._open:
            self._args(chunk)
        else:
            self._held += chunk
        self._pos = stop
        if end < 0:
            return False
        self._state = "key"
        return True

    def _open_call(self) -> None:
        if not self._open:
            self._start_call(self._name)
            self._open = True
            self._args(self._held)

    def _close_item(self) -> None:
        args = None if self._arg_kind == "object" else arguments_text(self._arg_value)
        if self._name is None or self._arg_kind != "object" and args is None:
            self._state = "bad"
            return
        self._open_call()
        if args is not None:
            self._args(args)
        self._state = "after"
