"""Constrained sequences inside the engine (tiny random-weight Llama, float32): a matcher per sequence
that survives preemption and recompute, one per sample under n > 1, the same tokens on the CUDA kernels'
host build as on the CPU path, and free batch mates untouched."""
import json

import jsonschema
import pytest

from scalellm import ops
from scalellm.config import EngineConfig
from scalellm.ops.cuda import host as cuda_host
from scalellm.engine.engine import LLMEngine
from scalellm.sampling_params import SamplingParams
from scalellm.structured import StructuredOutputsParams
from tests.checkpoints import build_checkpoint
from tests.cuda_kernel_checks import host
from tests.test_correctness import make_prompts

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "scores"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "scores": {"type": "array", "minItems": 6, "maxItems": 6,
                                    "items": {"type": "integer", "minimum": 0, "maximum": 999}}}}


def constrained(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=120, structured_outputs=StructuredOutputsParams(json=SCHEMA), **kw)


def mixed_params(n: int) -> list[SamplingParams]:
    """Greedy constrained, seeded sampled constrained, and free greedy rows, in turn."""
    out = []
    for i in range(n):
        kind = i % 3
        out.append(constrained(temperature=0) if kind == 0 else constrained(temperature=0.9, seed=i) if kind == 1
                   else SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    return out


def run(engine: LLMEngine, prompts, params) -> list[list]:
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), None, sp, prompt_token_ids=p)
    requests = [engine.requests[str(i)] for i in range(len(prompts))]
    while engine.has_unfinished():
        engine.step()
    return [sorted(r.seqs, key=lambda s: s.index) for r in requests]


def check_valid(seqs) -> None:
    for s in seqs:
        assert s.finish_reason == "stop", (s.finish_reason, s.text)
        jsonschema.validate(json.loads(s.text), SCHEMA)


def test_preemption_keeps_constrained_output(llama_folder):
    prompts = make_prompts(2)
    params = mixed_params(len(prompts))
    roomy = LLMEngine(EngineConfig(model=llama_folder, dtype="float32", block_size=16))
    expected = run(roomy, prompts, params)
    tight = LLMEngine(EngineConfig(model=llama_folder, dtype="float32", block_size=16, num_kv_blocks=20,
                                   max_num_batched_tokens=96))
    got = run(tight, prompts, params)
    assert any(s.num_preemptions for seqs, p in zip(got, params) if p.structured_outputs for s in seqs)
    assert [[s.output_token_ids for s in seqs] for seqs in got] == [[s.output_token_ids for s in seqs] for seqs in expected]
    for seqs, p in zip(got, params):
        if p.structured_outputs:
            check_valid(seqs)
    assert tight.block_manager.num_used_blocks == 0


def test_free_rows_identical_beside_constrained_ones(llama_llm):
    engine = llama_llm.engine
    prompts = make_prompts(4)
    free = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    alone = run(engine, prompts, [free] * len(prompts))
    together = run(engine, prompts + prompts, [free] * len(prompts) + [constrained(temperature=0)] * len(prompts))
    assert [s[0].output_token_ids for s in together[:len(prompts)]] == [s[0].output_token_ids for s in alone]
    for seqs in together[len(prompts):]:
        check_valid(seqs)


def test_each_sample_has_its_own_matcher(llama_llm):
    [seqs] = run(llama_llm.engine, make_prompts(5)[:1], [constrained(temperature=1.0, seed=7, n=4)])
    assert len(seqs) == 4
    check_valid(seqs)
    assert len({tuple(s.output_token_ids) for s in seqs}) > 1
    assert len({id(s.grammar) for s in seqs}) == 4


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    return build_checkpoint("llama", str(tmp_path_factory.mktemp("ckpt-llama-d64")), seed=5, hidden_size=256,
                            head_dim=64)


@host
def test_host_built_cuda_kernels_give_the_cpu_path_tokens(wide_llama):
    prompts = make_prompts(3)[:6]
    params = [constrained(temperature=0)] * 3 + [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)] * 3
    config = dict(model=wide_llama, dtype="float32", block_size=16)
    cpu = run(LLMEngine(EngineConfig(**config)), prompts, params)
    before = cuda_host.launch_counts.copy()
    with ops.cuda_kernels_on_cpu():
        kernels = run(LLMEngine(EngineConfig(**config)), prompts, params)
    launched = {name.split("::")[1].split("<")[0] for name in cuda_host.launch_counts - before}
    assert {"apply_token_bitmask", "paged_attention_decode"} <= launched, launched
    assert [s[0].output_token_ids for s in kernels] == [s[0].output_token_ids for s in cpu]
    for seqs in kernels[:3]:
        check_valid(seqs)
