"""Server-sent events for streamed completions: each delta's frame, and a stream that writes a request's
frames from the engine step's hand-over on the loop, without waking the request's task per token."""
from __future__ import annotations

import asyncio
import time

from msgspec import UNSET

from scalellm.engine.async_engine import SlowReader
from scalellm.outputs import StreamDelta
from scalellm.server import protocol as P
from scalellm.server.metrics import Tracker
from scalellm.server.resume import event_id


def sse(obj) -> bytes:
    return b"data: " + P.encoder.encode(obj) + b"\n\n"


class Framer:
    """The SSE frame of each delta of one streamed request (chat or completion chunks)."""

    def __init__(self, kind: str, rid: str, created: int, model: str, fmt, n: int, usage_field, offsets: list[int]):
        self.chat = kind == "chat"
        self.rid, self.created, self.model, self.fmt, self.n = rid, created, model, fmt, n
        self.usage_field = usage_field
        self.offsets = offsets  # completion text offsets per choice, for logprobs' text_offset
        self.completion_tokens = 0
        self.new_parser = None  # chat with tools: each choice's text goes through a tool-call parser
        self.parsers: dict = {}
        self.called: set[int] = set()  # choices that streamed a call
        self.parallel = True
        self.prompt_ids: list[list[int]] | None = None  # return_token_ids: each prompt's ids, and each delta's
        self.prompt_sent: set[int] = set()  # completion choices whose first chunk carried its prompt's ids
        self.token_events = False  # each event led by its token ids' id line (server/resume.py)
        self.prompt_logprobs: int | None = None  # vLLM's prompt_logprobs: on each choice's first chunk
        self.echo_logprobs: list[list[int]] | None = None  # echo with logprobs: each prompt's ids
        self.echo_top = 0  # and how many top logprobs each token gets

    def return_token_ids(self, prompt_ids: list[list[int]]) -> None:
        self.prompt_ids = prompt_ids

    def stream_tool_calls(self, new_parser, parallel: bool) -> None:
        self.new_parser, self.parallel = new_parser, parallel

    def frame(self, i: int, d: StreamDelta) -> bytes:
        """The frame of prompt i's delta d: b"" for a replayed one, which only advances the stream's state."""
        data = self._frame(i, d)
        if d.replayed:
            return b""
        if self.token_events:
            head = event_id(i * self.n + d.index, d.token_ids, d.finish_reason)
            return head + data if data else head + b"\n"
        return data

    def _frame(self, i: int, d: StreamDelta) -> bytes:
        idx = i * self.n + d.index
        self.completion_tokens += len(d.token_ids)
        ids = UNSET if self.prompt_ids is None else d.token_ids
        scored = UNSET
        if self.prompt_logprobs is not None and d.prompt_logprobs is not None:
            scored = self.fmt.prompt_logprobs(d.prompt_logprobs, self.prompt_logprobs)
        if self.chat:
            lp = self.fmt.chat_logprobs(d.logprobs) if d.logprobs is not None else None
            if self.new_parser is not None:
                return self._tool_frame(idx, d, lp, ids, scored)
            choice = P.ChatChunkChoice(idx, P.ChatDelta(content=d.text), lp, d.finish_reason, ids)
            return sse(P.ChatCompletionChunk(self.rid, self.created, self.model, [choice], usage=self.usage_field,
                                             prompt_logprobs=scored))
        lp = None
        if self.echo_logprobs is not None and d.prompt_logprobs is not None:  # the echoed prompt's, first
            lp = self.fmt.echo_logprobs(self.echo_logprobs[i], d.prompt_logprobs, self.echo_top,
                                        d.logprobs or [], self.offsets[idx])
        elif d.logprobs is not None:
            lp = self.fmt.completion_logprobs(d.logprobs, self.offsets[idx])
        self.offsets[idx] += len(d.text)
        prompt = UNSET
        if self.prompt_ids is not None and idx not in self.prompt_sent:
            self.prompt_sent.add(idx)
            prompt = self.prompt_ids[i]
        choice = P.CompletionChoice(idx, d.text, lp, d.finish_reason, d.stop_reason, prompt, ids, scored)
        return sse(P.CompletionResponse(self.rid, self.created, self.model, [choice], usage=self.usage_field))


    def _tool_frame(self, idx: int, d: StreamDelta, lp, ids, scored=UNSET) -> bytes:
        """A chat delta read through the choice's tool-call parser: content outside calls, then each call's
        id and name, then its argument fragments; b"" when the parser holds everything back for now."""
        parser = self.parsers.get(idx)
        if parser is None:
            parser = self.parsers[idx] = self.new_parser()
            parser.id_seed = f"{self.rid}:{idx}"
        piece = parser.feed(d.text)
        content, calls = piece.content, list(piece.calls)
        if d.finish_reason is not None:
            tail = parser.end()
            content, calls = content + tail.content, calls + list(tail.calls)
        if not self.parallel:
            calls = [c for c in calls if c.index == 0]
        if calls:
            self.called.add(idx)
        finish = "tool_calls" if d.finish_reason == "stop" and idx in self.called else d.finish_reason
        if not content and not calls and finish is None and lp is None and ids is UNSET and scored is UNSET:
            return b""
        deltas = [P.ToolCallDeltaOut(c.index, P.FunctionDelta(UNSET if c.name is None else c.name,
                                                              UNSET if c.arguments is None else c.arguments),
                                     UNSET if c.id is None else c.id, UNSET if c.id is None else "function")
                  for c in calls]
        delta = P.ChatDelta(content=content if content else UNSET, tool_calls=deltas or UNSET)
        choice = P.ChatChunkChoice(idx, delta, lp, finish, ids)
        return sse(P.ChatCompletionChunk(self.rid, self.created, self.model, [choice], usage=self.usage_field,
                                         prompt_logprobs=scored))


class DirectStream:
    """The sink of one prompt's engine request (AsyncEngine.open_stream): each delta is recorded, framed
    and written to the connection, as one chunk of the response's chunked encoding, right where the
    step hands it over. `done` resolves when all n choices finished, or with the error that ended the
    request (ConnectionResetError once the client left).

    Writes go to the transport's buffer without waiting for the client to drain it; once more than
    max_buffer_bytes wait there, `done` fails with SlowReader (the handler disconnects the client)."""

    def __init__(self, transport: asyncio.Transport, framer: Framer, tracker: Tracker, n: int,
                 stages: dict[str, float], max_buffer_bytes: int = 1 << 20):
        self.transport, self.framer, self.tracker = transport, framer, tracker
        self.max_buffer_bytes = max_buffer_bytes
        self.remaining = n
        self.stages = stages
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def push(self, item) -> None:
        done = self.done
        if done.done():
            return
        if isinstance(item, BaseException):
            done.set_exception(item)
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            done.set_exception(ConnectionResetError("the client closed the connection"))
            return
        try:  # runs inside the step's hand-over: a failure ends this request, not the others' delivery
            self.tracker.observe(((0, item),), time.monotonic())
            frame = self.framer.frame(0, item)
            if frame:  # (an empty chunk would end the response)
                t = time.monotonic()
                transport.write(b"%x\r\n%s\r\n" % (len(frame), frame))  # one HTTP/1.1 chunk
                self.stages["write"] += time.monotonic() - t
        except Exception as e:
            done.set_exception(e)
            return
        if item.finish_reason is not None:
            self.remaining -= 1
            if not self.remaining:
                done.set_result(None)  # all written: a reader still behind gets the rest as it reads
                return
        if transport.get_write_buffer_size() > self.max_buffer_bytes:
            done.set_exception(SlowReader(f"more than {self.max_buffer_bytes} bytes waited for the reader"))
