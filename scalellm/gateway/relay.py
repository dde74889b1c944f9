"""Forwarding one stream's events to its client, and what it takes to resume the stream elsewhere.

The replica is asked for token events (server/resume.py: an `id: <choice>:<token ids>[:<finish>]` line
before each event). StreamRelay.feed runs in the upstream connection's data callback: it cuts the
body into whole events, keeps each choice's tokens from the id lines, drops those lines, and writes
the events to the client's connection as one HTTP/1.1 chunk. The client only ever gets whole events,
so when the replica dies mid-stream the stream can go on from another replica's continuation
(`resume`) with no byte missing or repeated.
"""
from __future__ import annotations

import asyncio
import time

import msgspec

DONE = b"data: [DONE]"
HIGH_WATER = 1 << 20  # bytes waiting for the client before the replica's connection stops being read


class StreamRelay:
    def __init__(self, transport: asyncio.Transport, n: int, include_usage: bool, start: float, chat: bool):
        self.transport = transport
        self.chat = chat
        self.resumable = False  # the replica answered with token events (its x-stream-token-ids header)
        self.n = n
        self.include_usage = include_usage
        self.tokens: dict[int, list[int]] = {}  # each choice's tokens forwarded so far
        self.finished: set[int] = set()
        self.first_event: bytes | None = None  # the first data forwarded (it names the stream's id)
        self.forwarded = False  # an event went to the client
        self.token_events = False  # an id line came: what follows an event without one is not opening
        self.usage_sent = False
        self.done = False  # [DONE] went out
        self.ended = False  # the stream ended for good: [DONE] or an error event forwarded
        self.cut = False  # the replica reported its own death in-band (engine_dead): resume
        self.client_gone = False
        self.last = start  # when the last token went out (or the request arrived)
        self.last_event = start  # when the last event went out
        self.gap_start: float | None = None  # after a cut, until the next event goes out: the last event's time
        self.conn = None
        self.ttft = self.itl = None  # the replica's histograms (labels bound)
        self.seen_token = False
        self._buf = bytearray()

    def attach(self, conn, resumable: bool, ttft, itl) -> None:
        self.conn, self.resumable, self.ttft, self.itl = conn, resumable, ttft, itl
        self._buf.clear()  # a part-event of the previous replica is dropped: the client never got it

    # -- the data callback -----------------------------------------------------------------------
    def feed(self, piece: bytes) -> None:
        buf = self._buf
        buf += piece
        end = buf.rfind(b"\n\n")
        if end < 0 or self.ended or self.client_gone:
            return
        block = bytes(buf[:end + 2])
        del buf[:end + 2]
        if self.resumable:
            out, tokens = self._events(block)
        else:  # no token events to read (a replica that sends none): forward as it is
            # a chat stream's opening chunk (the role, no token yet) is no first token
            tokens = self.forwarded or not self.chat or block.count(b"data: ") != 1 or b'"role"' not in block
            out = block
            if block.endswith(DONE + b"\n\n"):
                self.done = self.ended = True
        if not out:
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            self.client_gone = True
            self.conn.close()
            return
        transport.write(b"%x\r\n%s\r\n" % (len(out), out))
        self._forwarded(tokens)
        if transport.get_write_buffer_size() > HIGH_WATER:
            self.conn.transport.pause_reading()
            asyncio.get_running_loop().call_later(0.01, self._resume_reading)

    def _events(self, block: bytes) -> tuple[bytes, bool]:
        """The block's events as the client gets them, and whether any carried tokens."""
        out, tokens = [], False
        for event in block.split(b"\n\n")[:-1]:
            if event.startswith(b"id: "):
                line_end = event.find(b"\n")
                line = event[4:] if line_end < 0 else event[4:line_end]
                self._note(line)
                self.token_events = tokens = True
                if line_end < 0:
                    continue  # tokens whose text is held back: nothing for the client yet
                event = event[line_end + 1:]
            elif event == DONE:
                self.done = self.ended = True
            elif self.all_finished:
                self.usage_sent = True
            elif self.token_events:
                if b'"engine_dead"' in event:  # the replica's engine died: another one carries on
                    self.cut = True
                    self.conn.close()
                    break
                self.ended = True  # an error for this request: it is the stream's end
            if self.first_event is None:
                self.first_event = event
            out.append(event)
            out.append(b"\n\n")
            if self.ended:
                break
        return b"".join(out), tokens

    def _note(self, line: bytes) -> None:
        index, ids, *finish = line.split(b":")
        index = int(index)
        if ids:
            self.tokens.setdefault(index, []).extend(map(int, ids.split(b",")))
        else:
            self.tokens.setdefault(index, [])
        if finish:
            self.finished.add(index)

    def _forwarded(self, tokens: bool) -> None:
        now = time.monotonic()
        self.forwarded = True
        if self.gap_start is not None:  # the first event after a cut (the gap is observed apart)
            self.gap_start = None
        elif tokens and self.ttft is not None:
            (self.itl if self.seen_token else self.ttft).observe(now - self.last)
        if tokens:
            self.seen_token = True
            self.last = now
        self.last_event = now

    def _resume_reading(self) -> None:
        transport = self.transport
        if self.conn is None or self.conn.transport.is_closing():
            return
        if transport is None or transport.is_closing():
            self.client_gone = True
            self.conn.close()
        elif transport.get_write_buffer_size() > HIGH_WATER // 2:
            asyncio.get_running_loop().call_later(0.01, self._resume_reading)
        else:
            self.conn.transport.resume_reading()

    # -- after a cut -----------------------------------------------------------------------------
    @property
    def all_finished(self) -> bool:
        return len(self.finished) == self.n

    def what_is_left(self) -> str:
        """After the replica's answer ended or was cut: "done" (nothing is missing), "done_but_marker"
        (every choice and the usage went out: only [DONE] is missing), "resume", or "lost" (events
        went out but no token events to resume from)."""
        if self.ended:
            return "done"
        if self.all_finished and (self.usage_sent or not self.include_usage):
            return "done_but_marker"
        if self.forwarded and not self.resumable:
            return "lost"
        return "resume"

    def resume_body(self, body: bytes) -> bytes:
        """The original request with `resume` added: what the client has of each choice. Before any
        event went out it is the original request (the stream starts afresh, under a new id)."""
        if not self.forwarded:
            return body
        first = msgspec.json.decode(self.first_event[len(b"data: "):])
        choices = [{"index": i, "token_ids": ids, "finished": i in self.finished} for i, ids in self.tokens.items()]
        resume = msgspec.json.encode({"id": first["id"], "created": first.get("created", 0), "choices": choices})
        end = body.rstrip().rfind(b"}")
        return body[:end] + b',"resume":' + resume + b"}"
