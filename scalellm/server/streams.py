"""Run one engine request per prompt and merge their deltas into one ordered-by-arrival stream."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from scalellm.engine.async_engine import AsyncEngine
from scalellm.outputs import StreamDelta
from scalellm.sampling_params import SamplingParams


async def merged_deltas(engine: AsyncEngine, base_id: str, prompts: list[tuple[str | None, list[int]]],
                        params: SamplingParams) -> AsyncIterator[tuple[int, StreamDelta]]:
    """Yields (prompt index, delta). Closing the iterator early aborts every request in it."""
    if len(prompts) == 1:
        text, ids = prompts[0]
        async with contextlib.aclosing(engine.generate(base_id, ids, params, text)) as gen:
            async for delta in gen:
                yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, text: str | None, ids: list[int]) -> None:
        try:
            async with contextlib.aclosing(engine.generate(f"{base_id}-{i}", ids, params, text)) as gen:
                async for delta in gen:
                    queue.put_nowait((i, delta))
            queue.put_nowait((i, None))
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, text, ids)) for i, (text, ids) in enumerate(prompts)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
