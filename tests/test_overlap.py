"""Overlapped steps (a step's tokens detokenized while the next step computes, the default on the CUDA
kernels) must give exactly what synchronous steps give: the same tokens, text, finish reasons, stop
reasons and logprobs for every kind of request, with staggered arrivals and preemption. A stop string
ends its sequence one step later there, and the extra token must never show."""
import pytest

from scalellm import LLM, SamplingParams

PROMPTS = [p * 5 for p in ["Once upon a time ", "The weather today ", "import numpy as np\n", "1, 2, 3, ", "Dear ",
                           "x" * 40]]  # long enough that ten 16-token blocks force preemption


def params_mix(stop: str, stop_id: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, stop=[stop, "@@never@@"]),
        SamplingParams(temperature=0, max_tokens=30, stop=stop, include_stop_str_in_output=True),
        SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id]),
        SamplingParams(temperature=0, max_tokens=20, min_tokens=8, stop_token_ids=[stop_id]),
        SamplingParams(temperature=0.9, top_p=0.9, max_tokens=16, seed=3, logprobs=2, ignore_eos=True),
        SamplingParams(temperature=1.0, n=3, max_tokens=10, seed=5, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=20, presence_penalty=0.5, repetition_penalty=1.2, max_tokens=12, seed=9),
        SamplingParams(temperature=0, max_tokens=1),
    ]


def outputs(llm: LLM, prompts, params):
    return [[(o.token_ids, o.text, o.finish_reason, o.stop_reason,
              None if o.logprobs is None else [(lp.token_id, round(lp.logprob, 5)) for lp in o.logprobs])
             for o in r.outputs] for r in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def engines(llama_folder):
    sync = LLM(llama_folder, dtype="float32", overlap_steps=False, block_size=16, num_kv_blocks=10,
               max_num_batched_tokens=48)
    overlapped = LLM(llama_folder, dtype="float32", overlap_steps=True, block_size=16, num_kv_blocks=10,
                     max_num_batched_tokens=48)
    return sync, overlapped


def test_overlapped_steps_give_what_synchronous_steps_give(engines):
    sync, overlapped = engines
    assert overlapped.engine.overlap and not sync.engine.overlap
    first = sync.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    stop, stop_id = first.text[8:12], first.token_ids[5]
    params = params_mix(stop, stop_id)
    prompts = [PROMPTS[0] if 1 <= i <= 4 else PROMPTS[i % len(PROMPTS)] for i in range(len(params))]  # stops
    expected = outputs(sync, prompts, params)
    got = outputs(overlapped, prompts, params)
    assert got == expected
    assert expected[1][0][2:4] == ("stop", stop) and stop not in expected[1][0][1]  # the stops did stop
    assert expected[3][0][2:4] == ("stop", stop_id)
    assert sync.engine.scheduler.num_preemptions > 0 or overlapped.engine.scheduler.num_preemptions > 0
    for llm in engines:
        assert not llm.engine.has_unfinished() and llm.engine.block_manager.num_used_blocks == 0
