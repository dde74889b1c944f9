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
        # each choice's tokens forwarded so far, as the id lines named them (index -> comma-separated runs)
        self.tokens: dict[bytes, list[bytes]] = {}
        self.finished: set[bytes] = set()
        self.first_event: bytes | None = None  # the first data forwarded (it names the stream's id)
        self.forwarded = False  # an event went to the client
        self.token_events = False  # an id line came: what follows an event without one is not opening
        self.usage_sent = False
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
        self.steady = False  # feed's shortcut applies: a running token stream, written directly
        self.direct = False  # events go straight to the client's connection (after the first write)
        self.pending: list[bytes] = []  # events for the handler to write
        self.pending_tokens = False

    def attach(self, conn, resumable: bool, ttft, itl) -> None:
        self.conn, self.resumable, self.ttft, self.itl = conn, resumable, ttft, itl
        self._buf.clear()  # a part-event of the previous replica is dropped: the client never got it
        self.steady = False

    # -- the data callback -----------------------------------------------------------------------
    def feed(self, piece: bytes) -> None:
        if self.steady and not self._buf and piece.startswith(b"id: "):
            # the steady state, most of a stream: one token event of a running choice, straight through
            line_end = piece.find(b"\n")
            size = len(piece) - line_end - 1
            if size > 2 and piece.find(b"\n\n") == len(piece) - 2:
                index, _, rest = piece[4:line_end].partition(b":")
                ids, finish, _ = rest.partition(b":")
                runs = self.tokens.get(index)
                transport = self.transport
                if not finish and runs is not None and not transport.is_closing():
                    if ids:
                        runs.append(ids)
                    transport.write(b"%x\r\n%s\r\n" % (size, piece[line_end + 1:]))
                    now = time.monotonic()
                    self.itl.observe(now - self.last)
                    self.last = self.last_event = now
                    if transport.get_write_buffer_size() > HIGH_WATER:
                        self._pause()
                    return
        self.steady = False
        if self.ended or self.client_gone:
            return
        buf = self._buf
        if not buf and piece.endswith(b"\n\n"):  # whole events, as they mostly come
            block = piece
        else:
            buf += piece
            end = buf.rfind(b"\n\n")
            if end < 0:
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
                self.ended = True
        if not out:
            return
        if not self.direct or self.ended:  # for the handler to write: the first with the response's head,
            self.pending.append(out)  # the last with the end of the body (one write each, not two)
            self.pending_tokens = self.pending_tokens or tokens
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            self.client_gone = True
            self.conn.close()
            return
        transport.write(b"%x\r\n%s\r\n" % (len(out), out))
        self._forwarded(tokens)
        self.steady = (self.resumable and self.seen_token and self.gap_start is None and self.itl is not None
                       and not self.ended and not self.cut)
        if transport.get_write_buffer_size() > HIGH_WATER:
            self._pause()

    def _pause(self) -> None:
        """The client reads slower than the replica writes: stop reading the replica until it catches up."""
        self.conn.transport.pause_reading()
        asyncio.get_running_loop().call_later(0.01, self._resume_reading)

    def take_pending(self) -> bytes:
        """What waits for the handler to write (it writes it now), counted as forwarded."""
        if not self.pending:
            return b""
        data = self.pending[0] if len(self.pending) == 1 else b"".join(self.pending)
        self.pending.clear()
        self._forwarded(self.pending_tokens)
        self.pending_tokens = False
        return data

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
                self.ended = True
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
        """An id line, `<choice>:<ids>[:<finish>]`: kept as it is, read only if the stream is resumed."""
        index, _, rest = line.partition(b":")
        ids, finish, _ = rest.partition(b":")
        runs = self.tokens.get(index)
        if runs is None:
            runs = self.tokens[index] = []
        if ids:
            runs.append(ids)
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
        if not self.forwarded:  # the client has nothing yet: what the replica sent before is forgotten
            self.tokens.clear()
            self.finished.clear()
            self.token_events, self.first_event = False, None
            return body
        first = msgspec.json.decode(self.first_event[len(b"data: "):])
        choices = [{"index": int(i), "token_ids": [int(t) for run in runs for t in run.split(b",")],
                    "finished": i in self.finished} for i, runs in self.tokens.items()]
        resume = msgspec.json.encode({"id": first["id"], "created": first.get("created", 0), "choices": choices})
        end = body.rstrip().rfind(b"}")
        return body[:end] + b',"resume":' + resume + b"}"
