"""Hermes-style calls (Qwen, Hermes, SmolLM with the bundled tools template):

    some text<tool_call>
    {"name": "f", "arguments": {...}}
    </tool_call>

Each block holds one call object; the first "</tool_call>" after an opening tag closes the block.
An unterminated last block is a call when its text is a whole call object, else content. A block
whose text is not one call object (optionally surrounded by whitespace) stays in the content as written.
A call is sent once its block closes: a malformed block must end up as content, so nothing of it can
go out before the whole of it has been seen.
"""
from __future__ import annotations

from .base import Parsed, ToolParser, held_prefix, read_call

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def block_call(body: str) -> tuple[str, str] | None:
    """(name, arguments) when a block's text is exactly one call object, give or take whitespace."""
    text = body.strip()
    call = read_call(text, 0) if text.startswith("{") else None
    return call[:2] if call is not None and call[2] == len(text) else None


class HermesParser(ToolParser):
    def __init__(self):
        super().__init__()
        self._buf = ""  # outside a block: undecided text; inside: the block's text so far
        self._in_block = False
        self._scan = 0  # inside a block: where to look for the closing tag next

    def parse(self, text: str) -> Parsed:
        parts, calls, i = [], [], 0
        while (j := text.find(OPEN, i)) >= 0:
            parts.append(text[i:j])
            body_start = j + len(OPEN)
            k = text.find(CLOSE, body_start)
            body_end = len(text) if k < 0 else k
            i = len(text) if k < 0 else k + len(CLOSE)
            call = block_call(text[body_start:body_end])
            if call is None:
                parts.append(text[j:i])
            else:
                calls.append(call)
        parts.append(text[i:])
        return self._parsed(parts, calls)

    def _step(self, delta: str) -> None:
        self._buf += delta
        while True:
            if self._in_block:
                k = self._buf.find(CLOSE, self._scan)
                if k < 0:
                    self._scan = max(0, len(self._buf) - len(CLOSE) + 1)
                    return
                self._block(self._buf[:k], CLOSE)
                self._buf = self._buf[k + len(CLOSE):]
                self._in_block = False
            else:
                j = self._buf.find(OPEN)
                if j < 0:
                    keep = len(self._buf) - held_prefix(self._buf, OPEN)
                    self._content(self._buf[:keep])
                    self._buf = self._buf[keep:]
                    return
                self._content(self._buf[:j])
                self._buf = self._buf[j + len(OPEN):]
                self._in_block, self._scan = True, 0

    def _block(self, body: str, close: str) -> None:
        call = block_call(body)
        if call is None:
            self._content(OPEN + body + close)
        else:
            self._call(*call)

    def _finish(self) -> None:
        if self._in_block:
            self._block(self._buf, "")
        else:
            self._content(self._buf)
        self._buf, self._in_block = "", False
