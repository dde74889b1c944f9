"""Greedy output must be token-identical to transformers in float32, for every architecture,
with staggered arrivals, under preemption, and with prefix reuse."""
import asyncio
import random

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
    step_requests = record_steps(engine)

    async def main():
        aengine = AsyncEngine(engine)
        aengine.start()
        # each request arrives once the one before it has 3 tokens out, so it joins mid-generation
        under_way = [asyncio.Event() for _ in prompts]

        async def one(i, prompt):
            if i:
                await under_way[i - 1].wait()
            tokens, logprobs = [], []
            async for delta in aengine.generate(f"r{i}", prompt, greedy(logprobs=2)):
                tokens += delta.token_ids
                logprobs += delta.logprobs
                if len(tokens) >= 3:
                    under_way[i].set()
            under_way[i].set()
            return tokens, logprobs

        try:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            await aengine.stop()

    results = asyncio.run(main())
    for (tokens, logprobs), ref, ref_lp in zip(results, expected, expected_lp, strict=True):
        assert len(tokens) == len(logprobs) == len(ref) == len(ref_lp) == MAX_NEW
        assert tokens == ref
        assert [lp.token_id for lp in logprobs] == tokens
        assert all(abs(lp.logprob - r) < 1e-4 for lp, r in zip(logprobs, ref_lp))
        assert all(len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1] for lp in logprobs)
    # the arrivals really overlapped: each request shared a step with the one before it
    for i in range(1, len(prompts)):
        assert any({f"r{i - 1}", f"r{i}"} <= ids for ids in step_requests), f"r{i} never ran beside r{i - 1}"
    assert engine.block_manager.num_used_blocks == 0


def record_steps(engine: LLMEngine) -> list[set[str]]:
    """Wrap engine.step to record which requests each step produced tokens for."""
    steps: list[set[str]] = []
    step = engine.step

    def recorded():
        deltas = step()
        steps.append({d.request_id for d in deltas if d.token_ids})
        return deltas

    engine.step = recorded
    return steps


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


def test_prefix_caching_off_recomputes_and_keeps_output(llama_folder):
    shared = make_prompts(3, [48])[0]
    prompts = make_prompts(5, [5, 20, 1], prefix=shared)
    expected, _ = hf_greedy(llama_folder, prompts, MAX_NEW)
    engine = LLMEngine(EngineConfig(model=llama_folder, dtype="float32", block_size=16, enable_prefix_caching=False))
    first = run_all(engine, prompts[:1], greedy())
    rest = run_all(engine, prompts[1:], greedy())
    assert [s.output_token_ids for s in first + rest] == expected
    bm = engine.block_manager
    assert bm.prefix_hits == 0 and not bm.block_of_hash
    assert all(s.num_cached_tokens == 0 for s in first + rest)
    assert engine.stats()["prefix_cache_hits"] == 0


def test_mixed_prefill_cap_keeps_output_and_holds(llama_folder):
    """--mixed-prefill-tokens: prompts arriving while others decode come in small chunks, same tokens."""
    prompts = make_prompts(6)
    expected, _ = hf_greedy(llama_folder, prompts, MAX_NEW)
    engine = LLMEngine(EngineConfig(model=llama_folder, dtype="float32", block_size=16, max_num_batched_tokens=64,
                                    mixed_prefill_tokens=8))
    schedule = engine.scheduler.schedule
    mixed = []

    def recorded():
        batch = schedule()
        decodes = sum(1 for s, n in batch.items if n == 1 and s.num_computed >= s.prompt_len)
        if decodes:
            mixed.append(batch.num_tokens - decodes)
        return batch

    engine.scheduler.schedule = recorded
    engine.add_request("0", None, greedy(), prompt_token_ids=prompts[0])
    seqs = [engine.requests["0"].seqs[0]]
    engine.step()  # the first prompt alone; the rest arrive while it decodes
    for i, p in enumerate(prompts[1:], 1):
        engine.add_request(str(i), None, greedy(), prompt_token_ids=p)
        seqs.append(engine.requests[str(i)].seqs[0])
    while engine.has_unfinished():
        engine.step()
    assert [s.output_token_ids for s in seqs] == expected
    assert mixed and max(mixed) <= 8 and sum(mixed) > 8  # prompts went in beside decodes, 8 tokens a step at most
