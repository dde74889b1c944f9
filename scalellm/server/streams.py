"""Run one engine request per prompt and merge their deltas into one ordered-by-arrival stream."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from scalellm.engine.async_engine import AsyncEngine, DeltaBuffer
from scalellm.outputs import StreamDelta
from scalellm.sampling_params import SamplingParams


async def merged_deltas(engine: AsyncEngine, base_id: str, prompts: list[tuple[str | None, list[int]]],
                        params: SamplingParams, max_buffered: int | None = None, on_overflow=None
                        ) -> AsyncIterator[list[tuple[int, StreamDelta]]]:
    """Yields lists of (prompt index, delta): everything that arrived since the consumer last resumed.
    Closing the iterator early aborts every request in it. More than max_buffered deltas waiting for
    the consumer raises SlowReader, after calling on_overflow(error) at once."""
    if len(prompts) == 1:
        text, ids = prompts[0]
        async with contextlib.aclosing(engine.generate_batches(base_id, ids, params, text, max_buffered,
                                                                       on_overflow)) as gen:
            async for batch in gen:
                yield [(0, delta) for delta in batch]
        return
    merged = DeltaBuffer(max_buffered, on_overflow)

    async def pump(i: int, text: str | None, ids: list[int]) -> None:
        try:
            async with contextlib.aclosing(engine.generate_batches(f"{base_id}-{i}", ids, params, text)) as gen:
                async for batch in gen:
                    for delta in batch:
                        merged.push((i, delta))
            merged.push((i, None))
        except Exception as e:
            merged.push((i, e))

    tasks = [asyncio.create_task(pump(i, text, ids)) for i, (text, ids) in enumerate(prompts)]
    try:
        remaining = len(tasks)
        while remaining:
            out = []
            for entry in await merged.take():
                if isinstance(entry, BaseException):  # the buffer's own SlowReader
                    raise entry
                i, item = entry
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    out.append((i, item))
            if out:
                yield out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
