"""The asyncio face of the engine: the model steps on its own thread, the event loop never blocks.

Requests and aborts reach the engine thread through an inbox; each step's deltas come back to the
loop in one callback, which hands each to its request's sink: a buffer that wakes the request's consumer
only if it is waiting (generate_batches), or any object with push() (open_stream; the server's SSE
streams write their frames right there). A consumer takes everything buffered at once, so a slow
consumer catches up in one wake-up instead of one per token.

After a long CPU step the engine thread waits (briefly, bounded) until the loop has run the consumers
the step woke before it starts the next one: the compute threads use every core, and the loop's burst
of writes, landing mid-step, would preempt one of them and stall the whole parallel region at its next
barrier. For short steps the wait costs more than it saves (the loop's writes are few), hence the wait
only after steps longer than LONG_STEP_S.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator

from scalellm.engine.engine import LLMEngine, set_compute_threads
from scalellm.outputs import StreamDelta
from scalellm.sampling_params import SamplingParams

log = logging.getLogger(__name__)
LOOP_WAIT_S = 0.05  # the most a step waits for the loop to hand out the previous step's deltas
LONG_STEP_S = 0.02  # steps from which that wait pays


class RequestFailed(RuntimeError):
    """Handling this request raised inside the engine step; the request was ended, the others go on."""

    def __init__(self, request_id: str, stage: str, error: BaseException):
        super().__init__(f"request {request_id} failed in {stage}: {type(error).__name__}: {error}")
        self.request_id, self.stage = request_id, stage


class EngineDead(RuntimeError):
    """The engine's loop stopped: every request in flight ends with this, and no new one is taken."""


class SlowReader(ConnectionError):
    """The request's consumer fell too far behind its output: the request was ended."""


class DeltaBuffer:
    """Deltas (or an exception) for one request, filled on the loop by the step callback. With a limit,
    more than `limit` items waiting for the consumer ends the request with SlowReader instead, and
    on_overflow(error) is called at once (a consumer blocked elsewhere, on its client, would not see it)."""
    __slots__ = ("items", "waiter", "limit", "overflowed", "on_overflow")

    def __init__(self, limit: int | None = None, on_overflow=None):
        self.items: list = []
        self.waiter: asyncio.Future | None = None
        self.limit = limit
        self.overflowed = False
        self.on_overflow = on_overflow

    def push(self, item) -> None:
        items = self.items
        if self.limit is not None and len(items) >= self.limit:
            if self.overflowed:
                return
            self.overflowed = True  # what waits is dropped: the consumer's next take raises
            items.clear()
            item = SlowReader(f"more than {self.limit} outputs waited for the reader")
            if self.on_overflow is not None:
                self.on_overflow(item)
        items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items, self.items = self.items, []
        return items


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: deque[tuple] = deque()
        self._wake = threading.Event()
        self._streams: dict[str, DeltaBuffer] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None  # the last step fault, or what ended the loop
        self.dead: EngineDead | None = None  # set once the loop has stopped on an error
        self.died: asyncio.Event | None = None  # set on the loop when it has
        self._handed_over = threading.Event()
        self._wait_for_loop = engine.config.device == "cpu"
        self.served_step_seconds = 0.0  # the engine's steps as served: from each start to its hand-over

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.died = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="scalellm-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None) -> AsyncIterator[StreamDelta]:
        """Stream the request's deltas; leaving the iteration early aborts the request."""
        async with contextlib.aclosing(self.generate_batches(request_id, prompt_token_ids, params, prompt)) as batches:
            async for batch in batches:
                for delta in batch:
                    yield delta

    async def generate_batches(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                               prompt: str | None = None, max_buffered: int | None = None, on_overflow=None
                               ) -> AsyncIterator[list[StreamDelta]]:
        """Like generate, but yields every delta that arrived since the last resumption as one list. With
        max_buffered, a consumer that leaves more deltas than that waiting gets SlowReader (see DeltaBuffer)."""
        buffer = DeltaBuffer(max_buffered, on_overflow)
        self.open_stream(request_id, prompt_token_ids, params, prompt, buffer)
        remaining = params.num_to_run
        try:
            while remaining:
                batch = await buffer.take()
                for item in batch:
                    if isinstance(item, BaseException):
                        raise item
                    if item.finish_reason is not None:
                        remaining -= 1
                yield batch
        finally:
            self.close_stream(request_id, finished=not remaining)

    def open_stream(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None, sink) -> None:
        """Start a request whose deltas (or an exception) go to `sink.push`, called on the loop within the
        step's hand-over itself: no task wakes per token. Pair with close_stream."""
        if self._loop is None:
            self.start()
        if self.dead is not None:
            raise self.dead
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.engine.validate_prompt(prompt_token_ids, params)
        self._streams[request_id] = sink
        self._post(("add", request_id, prompt, prompt_token_ids, params))

    def close_stream(self, request_id: str, finished: bool) -> None:
        """Stop delivering to the request's sink; abort it in the engine unless it finished."""
        self._streams.pop(request_id, None)
        if not finished:
            self._post(("abort", request_id))

    def stats(self) -> dict[str, float]:
        """The engine's stats, and the time its steps took as served."""
        return {**self.engine.stats(), "step_served_seconds": self.served_step_seconds}

    async def call(self, fn, *args):
        """fn(*args) on the engine thread, between steps (for changes to the engine's own state, such as
        loading a LoRA adapter); its result, or the exception it raised."""
        if self._loop is None:
            self.start()
        if self.dead is not None:
            raise self.dead
        future = self._loop.create_future()
        self._post(("call", None, fn, args, future))
        return await future

    def fail_all(self, error: BaseException) -> None:
        """(On the loop.) End every request in flight with `error`: each consumer raises it, and leaving
        the iteration aborts its request in the engine."""
        for buffer in list(self._streams.values()):
            buffer.push(error)

    def _post(self, message: tuple) -> None:
        self._inbox.append(message)
        self._wake.set()

    # -- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:
            log.critical("the engine loop stopped: %s: %s", type(e).__name__, e, exc_info=e)
            self.error = e
            with contextlib.suppress(RuntimeError):  # the loop may be closed by now
                self._loop.call_soon_threadsafe(self._on_death, e)

    def _on_death(self, error: BaseException) -> None:
        """(On the loop.) Refuse new requests and end every one in flight."""
        self.dead = EngineDead(f"the engine stopped: {type(error).__name__}: {error}")
        self.fail_all(self.dead)
        self.died.set()

    def _serve(self) -> None:
        engine = self.engine
        set_compute_threads(engine.num_threads)  # numba's thread count is per calling thread
        while not self._stopping:
            self._drain_inbox()
            if not engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            started = time.perf_counter()
            try:
                steps = engine.num_steps
                deltas = engine.step()
            except Exception as e:  # a fault no request can be blamed for alone fails them all, not the process
                log.error("engine step failed; ending every request in it", exc_info=e)
                self.error = e
                self._fail_all(e)
                continue
            if deltas:
                wait = self._wait_for_loop and time.perf_counter() - started >= LONG_STEP_S
                if wait:
                    self._handed_over.clear()
                self._loop.call_soon_threadsafe(self._dispatch, deltas, wait)
                if wait:
                    self._handed_over.wait(LOOP_WAIT_S)
            failures = engine.take_failures()
            if failures:  # after the step's deltas: a consumer gets what came before its error
                self._loop.call_soon_threadsafe(self._fail_some, failures)
            if engine.num_steps != steps:  # the step as served: bookkeeping and the hand-over included
                self.served_step_seconds += time.perf_counter() - started

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, request_id, *rest = self._inbox.popleft()
            if kind == "abort":
                self.engine.abort_request(request_id)
                continue
            if kind == "call":
                self._call(*rest)
                continue
            prompt, token_ids, params = rest
            try:
                self.engine.add_request(request_id, prompt, params, prompt_token_ids=token_ids)
            except ValueError as e:
                self._loop.call_soon_threadsafe(self._deliver, request_id, e)
            except Exception as e:  # admitting it raised: that request fails, the loop goes on
                log.error("request %s failed in admission; ending it", request_id, exc_info=e)
                self.engine.abort_request(request_id)
                self._loop.call_soon_threadsafe(self._deliver, request_id, RequestFailed(request_id, "admission", e))

    def _call(self, fn, args, future) -> None:
        def settle(ok: bool, value) -> None:
            if not future.done():
                future.set_result(value) if ok else future.set_exception(value)
        try:
            result = (True, fn(*args))
        except Exception as e:
            result = (False, e)
        self._loop.call_soon_threadsafe(settle, *result)

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
            self._loop.call_soon_threadsafe(self._deliver, request_id, RequestFailed(request_id, "a batch step", error))

    def _fail_some(self, failures: list[tuple[str, str, BaseException]]) -> None:
        for request_id, stage, error in failures:
            self._deliver(request_id, RequestFailed(request_id, stage, error))

    def _deliver(self, request_id: str, item) -> None:
        buffer = self._streams.get(request_id)
        if buffer is not None:
            buffer.push(item)

    def _dispatch(self, deltas: list[StreamDelta], signal_handed_over: bool = False) -> None:
        streams = self._streams
        for delta in deltas:
            buffer = streams.get(delta.request_id)
            if buffer is not None:
                buffer.push(delta)
        if signal_handed_over:  # the consumers woken above run before this callback (call_soon keeps order)
            self._loop.call_soon(self._handed_over.set)
