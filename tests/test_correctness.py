"""Greedy output must be token-identical to transformers in float32, for every architecture,
with staggered arrivals, under preemption, and with prefix reuse."""
import asyncio
import random

import pytest

from scalellm import SamplingParams
from scalellm.config import EngineConfig
from scalellm.engine.async_engine import AsyncEngine
from scalellm.engine.engine import LLMEngine
from tests.checkpoints import hf_greedy

MAX_NEW = 20
LENGTHS = [1, 6, 17, 32, 33, 70, 129, 9]


def make_prompts(seed: int, lengths=LENGTHS, prefix: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(3, 49152) for _ in range(n)] for n in lengths]


def greedy(logprobs=None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=logprobs)


def run_all(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list:
    for i, p in enumerate(prompts):
        engine.add_request(str(i), None, params, prompt_token_ids=p)
    seqs = {str(i): engine.requests[str(i)].seqs[0] for i in range(len(prompts))}
    while engine.has_unfinished():
        engine.step()
    return [seqs[str(i)] for i in range(len(prompts))]


def test_staggered_arrivals_match_transformers(checkpoint):
    arch, folder = checkpoint
    prompts = make_prompts(1)
    expected, expected_lp = hf_greedy(folder, prompts, MAX_NEW)
    engine = LLMEngine(EngineConfig(model=folder, dtype="float32", max_num_batched_tokens=64))

    async def main():
        aengine = AsyncEngine(engine)
        aengine.start()

        async def one(i, prompt):
            await asyncio.sleep(0.05 * i)  # arrive while earlier requests are mid-generation
            tokens, logprobs = [], []
            async for delta in aengine.generate(f"r{i}", prompt, greedy(logprobs=2)):
                tokens += delta.token_ids
                logprobs += delta.logprobs
            return tokens, logprobs

        try:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            await aengine.stop()

    results = asyncio.run(main())
    for (tokens, logprobs), ref, ref_lp in zip(results, expected, expected_lp):
        assert tokens == ref
        assert all(abs(lp.logprob - r) < 1e-4 for lp, r in zip(logprobs, ref_lp))
        assert all(len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1] for lp in logprobs)
    assert engine.block_manager.num_used_blocks == 0


def test_preemption_keeps_output_identical(checkpoint):
    arch, folder = checkpoint
    prompts = make_prompts(2)
    expected, _ = hf_greedy(folder, prompts, MAX_NEW)
    # 20 blocks of 16 tokens cannot hold these 8 requests at once (they need ~30).
    engine = LLMEngine(EngineConfig(model=folder, dtype="float32", num_kv_blocks=20, block_size=16,
                                    max_num_batched_tokens=96))
    seqs = run_all(engine, prompts, greedy())
    assert engine.scheduler.num_preemptions > 0
    assert [s.output_token_ids for s in seqs] == expected
    assert engine.block_manager.num_used_blocks == 0


def test_prefix_reuse_keeps_output_identical(checkpoint):
    arch, folder = checkpoint
    shared = make_prompts(3, [48])[0]
    prompts = make_prompts(4, [5, 20, 1, 40], prefix=shared)
    expected, _ = hf_greedy(folder, prompts, MAX_NEW)
    engine = LLMEngine(EngineConfig(model=folder, dtype="float32", block_size=16))
    first = run_all(engine, prompts[:1], greedy())  # fills the cache with the shared prefix
    rest = run_all(engine, prompts[1:], greedy())
    assert engine.block_manager.prefix_hits > 0
    assert all(s.num_cached_tokens >= 48 for s in rest)
    assert [s.output_token_ids for s in first + rest] == expected
