"""AsyncEngine's hand-over between the engine thread and the event loop, with a stand-in engine."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from scalellm.engine import async_engine as async_engine_module
from scalellm.engine.async_engine import AsyncEngine
from scalellm.outputs import StreamDelta
from scalellm.sampling_params import SamplingParams

STEPS = 30


class CountingEngine:
    """Emits one token per step for one request; records, at each step, how many of the request's
    earlier deltas its consumer had already received."""

    def __init__(self, device: str):
        self.config = SimpleNamespace(device=device)
        self.num_threads = 1
        self.requests: dict[str, int] = {}
        self.received: list[int] = []  # appended by the consumer on the loop
        self.seen_at_step: list[int] = []
        self.num_steps = 0  # the step counter the real engine keeps

    def validate_prompt(self, prompt_token_ids, params) -> None:
        pass

    def add_request(self, request_id, prompt, params, prompt_token_ids=None) -> None:
        self.requests[request_id] = 0

    def abort_request(self, request_id) -> bool:
        return self.requests.pop(request_id, None) is not None

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def take_failures(self) -> list:
        return []

    def step(self) -> list[StreamDelta]:
        (request_id, done), = self.requests.items()
        self.seen_at_step.append(len(self.received))
        self.num_steps += 1
        done += 1
        self.requests[request_id] = done
        finish = "length" if done == STEPS else None
        if finish:
            del self.requests[request_id]
        return [StreamDelta(request_id, 0, "x", [done], finish_reason=finish)]


async def consume(device: str) -> CountingEngine:
    engine = CountingEngine(device)
    async_engine = AsyncEngine(engine)
    async for delta in async_engine.generate("r", [1, 2, 3], SamplingParams(max_tokens=STEPS)):
        engine.received.append(delta.token_ids[0])
    await async_engine.stop()
    engine.served_step_seconds = async_engine.served_step_seconds
    return engine


def test_each_long_cpu_step_starts_after_the_loop_handed_out_the_previous_one(monkeypatch):
    monkeypatch.setattr(async_engine_module, "LONG_STEP_S", 0.0)  # every step counts as long
    engine = asyncio.run(consume("cpu"))
    assert engine.received == list(range(1, STEPS + 1))
    assert engine.seen_at_step == list(range(STEPS))
    assert engine.num_steps == STEPS and engine.served_step_seconds > 0

