"""Speculative decoding: greedy output token-identical to transformers in float32 and seeded sampling
identical with speculation on and off (n-gram drafts), under staggered arrivals, preemption and prefix
reuse, with every KV block returned; the n-gram proposer, the config and the scheduler's handling of
drafts."""
import random

import pytest

from scalellm import SamplingParams
from scalellm.config import EngineConfig
from scalellm.engine.engine import LLMEngine
from scalellm.engine.spec_decode import SpeculativeConfig
from scalellm.engine.spec_decode import ngram
from scalellm.engine.spec_decode.ngram import propose
from tests.checkpoints import build_checkpoint, hf_greedy

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
MAX_NEW = 24


def repetitive_prompts(seed: int, lengths=(9, 17, 30, 5, 44, 12)) -> list[list[int]]:
    """Prompts that repeat a random segment (and so give the lookup something to find), each different."""
    rng = random.Random(seed)
    prompts = []
    for n in lengths:
        segment = [rng.randrange(3, 49152) for _ in range(max(2, n // 3))]
        prompts.append((segment * 4)[:n] + [rng.randrange(3, 49152)])
    return prompts


@pytest.fixture(scope="module")
def sharp_folder(tmp_path_factory):
    """The test llama with its output layer scaled up: peaked distributions, so sampled text repeats
    itself the way a trained model's does and n-gram drafts get accepted (and still sometimes not)."""
    from safetensors.torch import load_file, save_file

    folder = build_checkpoint("llama", str(tmp_path_factory.mktemp("ckpt-llama-sharp")))
    path = f"{folder}/model.safetensors"
    weights = load_file(path)
    weights["lm_head.weight"] *= 30.0
    save_file(weights, path, metadata={"format": "pt"})
    return folder


def engine_for(folder: str, spec=NGRAM, **kwargs) -> LLMEngine:
    kwargs.setdefault("block_size", 16)
    return LLMEngine(EngineConfig(model=folder, dtype="float32", speculative_config=spec, **kwargs))


def run_staggered(engine: LLMEngine, prompts, params, every: int = 3) -> list[list[int]]:
    """Request i arrives after i * every steps, so requests join while others speculate."""
    pending = list(enumerate(prompts))
    steps = 0
    while pending or engine.has_unfinished():
        while pending and steps >= pending[0][0] * every:
            i, p = pending.pop(0)
            engine.add_request(str(i), None, params, prompt_token_ids=p)
        engine.step()
        steps += 1
    return steps


def outputs(engine: LLMEngine, prompts, params, every: int = 3):
    seqs = {}
    add = engine.add_request

    def add_and_keep(request_id, *args, **kwargs):
        request = add(request_id, *args, **kwargs)
        seqs[request_id] = request.seqs
        return request

    engine.add_request = add_and_keep
    try:
        run_staggered(engine, prompts, params, every)
    finally:
        engine.add_request = add
    return [[(s.output_token_ids, s.text, s.finish_reason, s.logprobs) for s in seqs[str(i)]]
            for i in range(len(prompts))]


def assert_same(got, expected) -> None:
    """Tokens, text and finish reasons exactly; logprobs to float32 rounding (the verifying pass sums
    in another order than a decode step)."""
    assert [[c[:3] for c in r] for r in got] == [[c[:3] for c in r] for r in expected]
    for r, e in zip(got, expected):
        for c, ce in zip(r, e):
            if ce[3] is None:
                assert c[3] is None
                continue
            assert len(c[3]) == len(ce[3])
            for lp, lpe in zip(c[3], ce[3]):
                assert lp.token_id == lpe.token_id and lp.logprob == pytest.approx(lpe.logprob, abs=1e-3)
                assert [t for t, _ in lp.top] == [t for t, _ in lpe.top]


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, **kw)


def assert_speculated(engine: LLMEngine) -> None:
    """Drafts were verified, some accepted and some rejected: both paths ran."""
    s = engine.stats()
    assert s["spec_num_drafts"] > 0
    assert 0 < s["spec_num_accepted_tokens"] < s["spec_num_draft_tokens"], s
    assert engine.block_manager.num_used_blocks == 0


def test_greedy_matches_transformers_staggered(checkpoint):
    arch, folder = checkpoint
    prompts = repetitive_prompts(1)
    expected, expected_lp = hf_greedy(folder, prompts, MAX_NEW)
    engine = engine_for(folder, max_num_batched_tokens=64)
    got = outputs(engine, prompts, greedy(logprobs=1))
    assert [g[0][0] for g in got] == expected
    for g, ref_lp in zip(got, expected_lp):
        lps = g[0][3]
        assert [lp.token_id for lp in lps] == g[0][0]
        assert all(abs(lp.logprob - r) < 1e-4 for lp, r in zip(lps, ref_lp))
    assert_speculated(engine)


def preemption_scenario(folder: str) -> tuple[LLMEngine, list[list[int]], list[list[int]]]:
    """An engine too small for its requests (14 blocks of 16 tokens cannot hold these 6 at once), with
    the block check after each step, and prompts sharing a prefix with their greedy continuations."""
    shared = repetitive_prompts(3, [40])[0]
    prompts = [shared + p for p in repetitive_prompts(4, [5, 20, 1, 33, 12, 8])]
    expected, _ = hf_greedy(folder, prompts, MAX_NEW)
    engine = engine_for(folder, num_kv_blocks=14, max_num_batched_tokens=96)
    check_blocks_after_each_step(engine)
    return engine, prompts, expected


def test_greedy_under_preemption_and_prefix_reuse(llama_folder):
    engine, prompts, expected = preemption_scenario(llama_folder)
    got = outputs(engine, prompts, greedy(), every=1)
    assert [g[0][0] for g in got] == expected
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.prefix_hits > 0
    assert_speculated(engine)


def check_blocks_after_each_step(engine: LLMEngine) -> None:
    """Rejected drafts' blocks go at once: after each step no sequence holds more than its tokens need."""
    step, bm = engine.step, engine.block_manager

    def step_and_check():
        deltas = step()
        for seq in engine.scheduler.running:
            assert len(seq.block_table) <= bm.blocks_needed(seq.num_tokens)
        return deltas

    engine.step = step_and_check


def test_rejected_drafts_release_their_blocks(llama_folder, monkeypatch):
    prompt = repetitive_prompts(9, [10])[0]
    expected, _ = hf_greedy(llama_folder, [prompt], MAX_NEW)
    right = expected[0] + [0]

    def one_right_then_wrong(token_ids, k, lo, hi):  # the target's next token, then two it will reject
        t = right[len(token_ids) - len(prompt)]
        return [t, (t + 1) % 1000, (t + 2) % 1000][:k]

    monkeypatch.setattr(ngram, "propose", one_right_then_wrong)
    engine = engine_for(llama_folder, block_size=4)  # drafts often cross into a block of their own
    check_blocks_after_each_step(engine)
    assert outputs(engine, [prompt], greedy())[0][0][0] == expected[0]
    s = engine.stats()
    assert s["spec_num_accepted_tokens"] == s["spec_num_drafts"] > 0  # one of each step's drafts
    assert s["spec_accepted_per_pos"] == [s["spec_num_drafts"], 0, 0]
    assert engine.block_manager.num_used_blocks == 0


def oracle_drafts(prompts: list[list[int]], expected: list[list[int]], right: int = 2):
    """A proposer that knows each prompt's greedy continuation: `right` correct drafts, then wrong ones,
    so every step verifies, accepts and rejects whatever the model (random weights rarely repeat)."""
    def propose_(token_ids, k, lo, hi):
        for prompt, out in zip(prompts, expected):
            if token_ids[:len(prompt)] == prompt:
                n = len(token_ids) - len(prompt)
                nxt = (out + [0] * k)[n:n + k]
                return [t if i < right else (t + 1) % 1000 for i, t in enumerate(nxt)]
        raise AssertionError("a sequence of no known prompt")
    return propose_


def test_every_step_verifying_matches_transformers(llama_folder):
    """Drafts on every step of every sequence (staggered, preempted, prefixes reused): still exact."""
    engine, prompts, expected = preemption_scenario(llama_folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ngram, "propose", oracle_drafts(prompts, expected))
        assert [g[0][0] for g in outputs(engine, prompts, greedy(), every=1)] == expected
    assert engine.scheduler.num_preemptions > 0 and engine.block_manager.prefix_hits > 0
    assert_speculated(engine)


SAMPLED = [
    SamplingParams(temperature=0.9, seed=11, max_tokens=MAX_NEW, ignore_eos=True),
    SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=3, max_tokens=MAX_NEW, ignore_eos=True, logprobs=2,
                   presence_penalty=0.1, frequency_penalty=0.1, repetition_penalty=1.05, min_tokens=5),
    SamplingParams(temperature=0.5, seed=5, n=2, max_tokens=MAX_NEW, logprobs=1, min_p=0.05),
]


@pytest.mark.parametrize("params", SAMPLED, ids=["plain", "penalties", "n2"])
def test_seeded_sampling_identical_on_and_off(sharp_folder, params):
    prompts = repetitive_prompts(7)
    off = outputs(engine_for(sharp_folder, spec=None), prompts, params)
    engine = engine_for(sharp_folder)
    assert_same(outputs(engine, prompts, params), off)
    assert_speculated(engine)
    # throttled: no drafts while 3 or more run, so some steps speculate and others do not
    throttled = engine_for(sharp_folder, spec={**NGRAM, "disable_by_batch_size": 3})
    assert_same(outputs(throttled, prompts, params, every=10), off)
    assert engine.stats()["spec_num_drafts"] > throttled.stats()["spec_num_drafts"] > 0
    assert throttled.block_manager.num_used_blocks == 0


def test_stop_strings_and_tokens_inside_accepted_drafts(sharp_folder):
    """A stop met inside a step's accepted tokens ends the output there, as without speculation."""
    prompts = repetitive_prompts(8)
    base = outputs(engine_for(sharp_folder, spec=None), prompts, greedy())
    texts = [b[0][1] for b in base]
    stops = sorted({t[len(t) // 2:len(t) // 2 + 2] for t in texts if len(t) > 4})
    stop_ids = [b[0][0][MAX_NEW // 2] for b in base[:2]]
    for params in (greedy(stop=stops), greedy(stop=stops, include_stop_str_in_output=True),
                   SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=stop_ids),
                   SamplingParams(temperature=0.8, seed=1, max_tokens=MAX_NEW, stop=stops, logprobs=1)):
        off = outputs(engine_for(sharp_folder, spec=None), prompts, params)
        engine = engine_for(sharp_folder)
        assert_same(outputs(engine, prompts, params), off)
        assert any(o[0][2] == "stop" for o in off)
        assert engine.stats()["spec_num_accepted_tokens"] > 0
        assert engine.block_manager.num_used_blocks == 0


def test_ngram_proposes_what_followed_the_latest_match():
    assert propose([1, 2, 3, 4, 5, 1, 2], 3, 1, 3) == [3, 4, 5]
    assert propose([1, 2, 9, 7, 1, 2, 8, 6, 1, 2], 2, 1, 3) == [8, 6]  # the latest occurrence wins
    assert propose([5, 1, 2, 3, 9, 1, 2, 3], 4, 2, 3) == [9, 1, 2, 3]  # the longest suffix first
    assert propose([1, 2, 3, 4], 3, 1, 3) == []  # nothing repeats
    assert propose([7, 7, 7], 2, 1, 2) == [7]  # a match next to the suffix: fewer tokens than asked
    assert propose([4, 5, 6, 4], 3, 2, 3) == []  # the shortest suffix allowed is 2


def test_config_in_vllm_form(tmp_path):
    c = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 5}')
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max) == ("ngram", 4, 5, 5)
    assert SpeculativeConfig.parse({}) is None and SpeculativeConfig.parse(None) is None
    draft = SpeculativeConfig.parse({"model": str(tmp_path), "num_speculative_tokens": 2})
    assert draft.method == "draft_model" and draft.model == str(tmp_path)
    for bad, why in [("{", "not valid JSON"), ('{"method": "eagle", "num_speculative_tokens": 2}', "not supported"),
                     ('{"method": "ngram"}', "num_speculative_tokens"),
                     ('{"method": "ngram", "num_speculative_tokens": 2, "bogus": 1}', "unknown keys"),
                     ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, '
                      '"prompt_lookup_max": 2}', "must not exceed"),
                     ('{"model": "/no/such/model", "num_speculative_tokens": 2}', "not found"),
                     ('{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0}', "positive")]:
        with pytest.raises(ValueError, match=why):
            SpeculativeConfig.parse(bad)
