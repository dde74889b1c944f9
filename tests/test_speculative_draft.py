"""Speculative decoding with a draft model: greedy output token-identical to transformers in float32
(staggered arrivals, preemption, prefix reuse), rejection sampling's output distributed as the
target's (unit and end to end), and the draft's K/V rolled back with the target's blocks."""
import collections

import pytest
import torch

from scalellm import SamplingParams
from scalellm.config import EngineConfig
from scalellm.engine.engine import LLMEngine
from scalellm.engine.spec_decode import rejection
from tests.checkpoints import build_checkpoint, deepened_checkpoint, hf_greedy, perturbed_checkpoint
from tests.test_speculative import check_blocks_after_each_step, greedy, outputs, repetitive_prompts

MAX_NEW = 24


@pytest.fixture(scope="module")
def draft_folder(llama_folder, tmp_path_factory):
    """The test llama with noise on its weights: agrees with it on some tokens, not all."""
    return perturbed_checkpoint(llama_folder, str(tmp_path_factory.mktemp("ckpt-llama-draft")), 0.1)


@pytest.fixture(scope="module")
def deep_folder(llama_folder, tmp_path_factory):
    return deepened_checkpoint(llama_folder, str(tmp_path_factory.mktemp("ckpt-llama-deep")), 3)


def engine_with_draft(target: str, draft: str, k: int = 3, **kwargs) -> LLMEngine:
    kwargs.setdefault("block_size", 16)
    return LLMEngine(EngineConfig(model=target, dtype="float32", speculative_config={
        "model": draft, "num_speculative_tokens": k}, **kwargs))


def test_deepened_target_is_the_same_model(llama_folder, deep_folder):
    prompts = repetitive_prompts(2, [7, 19])
    assert hf_greedy(deep_folder, prompts, 8)[0] == hf_greedy(llama_folder, prompts, 8)[0]
    engine = engine_with_draft(deep_folder, llama_folder)
    got = outputs(engine, prompts, greedy())
    s = engine.stats()
    assert s["spec_num_accepted_tokens"] == s["spec_num_draft_tokens"] > 0  # the draft predicts it exactly
    assert [g[0][0] for g in got] == hf_greedy(deep_folder, prompts, MAX_NEW)[0]


def test_greedy_matches_transformers(llama_folder, draft_folder):
    prompts = repetitive_prompts(1)
    expected, _ = hf_greedy(llama_folder, prompts, MAX_NEW)
    engine = engine_with_draft(llama_folder, draft_folder, max_num_batched_tokens=64)
    assert [g[0][0] for g in outputs(engine, prompts, greedy())] == expected
    s = engine.stats()
    assert 0 < s["spec_num_accepted_tokens"] < s["spec_num_draft_tokens"]
    assert engine.block_manager.num_used_blocks == 0


def test_greedy_under_preemption_and_prefix_reuse(llama_folder, draft_folder):
    shared = repetitive_prompts(3, [40])[0]
    prompts = [shared + p for p in repetitive_prompts(4, [5, 20, 1, 33, 12, 8])]
    expected, _ = hf_greedy(llama_folder, prompts, MAX_NEW)
    engine = engine_with_draft(llama_folder, draft_folder, num_kv_blocks=14, max_num_batched_tokens=96)
    check_blocks_after_each_step(engine)
    assert [g[0][0] for g in outputs(engine, prompts, greedy(), every=1)] == expected
    assert engine.scheduler.num_preemptions > 0 and engine.block_manager.prefix_hits > 0
    assert engine.stats()["spec_num_accepted_tokens"] > 0
    assert engine.block_manager.num_used_blocks == 0


def _chi2_sf(stat: float, df: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


def _chi_square_p(observed: dict, expected_probs: dict, n: int) -> float:
    """p-value of Pearson's test of counts against probabilities (small cells pooled)."""
    cells, pooled_o, pooled_e = [], 0.0, 0.0
    for token, p in expected_probs.items():
        e = p * n
        if e < 5:
            pooled_o += observed.get(token, 0)
            pooled_e += e
        else:
            cells.append((observed.get(token, 0), e))
    unexpected = sum(c for t, c in observed.items() if t not in expected_probs)
    cells.append((pooled_o + unexpected, pooled_e))
    stat = sum((o - e) ** 2 / e for o, e in cells if e > 0)
    return _chi2_sf(stat, len(cells) - 1)


def test_rejection_sampling_keeps_the_target_distribution():
    """Drafts from a q unlike p: the first token out (accepted draft or replacement) is distributed as p,
    and so is the second given the first was the accepted draft."""
    vocab, n = 6, 12000
    gen = torch.Generator().manual_seed(0)
    p_logits = torch.randn(3, vocab, generator=gen) * 1.5
    q_logits = torch.randn(3, vocab, generator=gen) * 1.5
    params = SamplingParams(temperature=1.0, seed=0)
    p = rejection.probabilities(p_logits, _Seq(params, 0))
    q = rejection.probabilities(q_logits, _Seq(params, 0))
    first = collections.Counter()
    second_after = collections.Counter()
    draws = torch.Generator().manual_seed(1)
    top = int(torch.minimum(p[0], q[0]).argmax())  # the draft most often accepted
    for i in range(n):
        seq = _Seq(SamplingParams(temperature=1.0, seed=i), i)
        draft = [int(torch.multinomial(q[j], 1, generator=draws)) for j in range(2)]
        accepted, replacement = rejection.verify(p_logits, seq, draft, q[:2])
        out = draft[:accepted] + ([replacement] if replacement is not None else [])
        first[out[0]] += 1
        if accepted >= 1 and draft[0] == top:
            second = draft[1] if accepted == 2 else replacement
            second_after[second] += 1
    assert _chi_square_p(first, dict(enumerate(p[0].tolist())), n) > 1e-3
    total = sum(second_after.values())
    assert total > 500
    assert _chi_square_p(second_after, dict(enumerate(p[1].tolist())), total) > 1e-3
    # and the test has power: the draft's own distribution is rejected
    assert _chi_square_p(first, dict(enumerate(q[0].tolist())), n) < 1e-6


class _Seq:
    def __init__(self, params, seed):
        self.params, self.seed, self.index, self.num_output_tokens = params, seed, 0, 0


def test_sampled_output_distributed_as_without_speculation(llama_folder, draft_folder):
    """End to end: the second and third tokens of many seeded samples, with a draft model and without,
    come from the same distribution (top_k 4 keeps the support small)."""
    prompt = repetitive_prompts(5, [12])[0]
    params = [SamplingParams(temperature=1.0, top_k=4, seed=s, max_tokens=3, ignore_eos=True) for s in range(700)]
    counts = []
    for spec in (False, True):
        # 8 at a time: the step has room for drafts (speculator.py throttles them in large batches)
        engine = (engine_with_draft(llama_folder, draft_folder, k=2, max_num_seqs=8) if spec else
                  LLMEngine(EngineConfig(model=llama_folder, dtype="float32", block_size=16, max_num_seqs=8)))
        for i, p in enumerate(params):
            engine.add_request(str(i), None, p, prompt_token_ids=prompt)
        seqs = [engine.requests[str(i)].seqs[0] for i in range(len(params))]
        while engine.has_unfinished():
            engine.step()
        counts.append(collections.Counter(tuple(s.output_token_ids[1:]) for s in seqs))
        if spec:
            s = engine.stats()
            assert 0 < s["spec_num_accepted_tokens"] < s["spec_num_draft_tokens"]
    keys = sorted(set(counts[0]) | set(counts[1]), key=lambda k: -(counts[0][k] + counts[1][k]))
    big = [k for k in keys if counts[0][k] + counts[1][k] >= 20]
    table = [[c[k] for k in big] + [sum(c[k] for k in keys if k not in big)] for c in counts]
    assert _contingency_p(table) > 1e-3


def _contingency_p(table: list[list[int]]) -> float:
    """p-value of the chi-square test that the rows of a contingency table share one distribution."""
    t = torch.tensor(table, dtype=torch.float64)
    expected = t.sum(1, keepdim=True) * t.sum(0, keepdim=True) / t.sum()
    stat = float(((t - expected) ** 2 / expected).sum())
    return _chi2_sf(stat, (t.shape[0] - 1) * (t.shape[1] - 1))


def test_refuses_a_draft_with_another_vocabulary(llama_folder, tmp_path):
    other = build_checkpoint("llama", str(tmp_path / "other"), vocab_size=1000)
    with pytest.raises(ValueError, match="tokenizer"):
        engine_with_draft(llama_folder, other)




def test_draft_model_from_a_quantized_gguf(llama_folder, draft_folder, tmp_path):
    """The draft read from a GGUF file (Q8_0 projections, served as stored), the target from safetensors."""
    from tests.test_gguf_checkpoints import write_gguf

    path = write_gguf(draft_folder, str(tmp_path / "draft.gguf"), lambda name: "q8_0" if "blk." in name else None)
    prompts = repetitive_prompts(6, [9, 30])
    expected, _ = hf_greedy(llama_folder, prompts, MAX_NEW)
    engine = engine_with_draft(llama_folder, path)
    assert engine.draft_model.loaded.model.weight_bytes < engine.loaded.model.weight_bytes
    assert [g[0][0] for g in outputs(engine, prompts, greedy())] == expected
    assert engine.stats()["spec_num_accepted_tokens"] > 0
