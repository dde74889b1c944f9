"""Sampling: seeds independent of batch mates, filters on known distributions, penalties, stops, n > 1."""
import math

import pytest
import torch

from scalellm import SamplingParams
from tests.sampling_reference import filter_logits

PROMPTS = ["Once upon a time", "The weather today", "import numpy as np\n", "1, 2, 3,"]


def test_seeded_sampling_is_independent_of_batch_mates(llama_llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=1234, ignore_eos=True)
    alone = llama_llm.generate([PROMPTS[0]], p)[0].outputs[0].token_ids
    other = SamplingParams(temperature=0.7, max_tokens=30, ignore_eos=True)
    mixed = llama_llm.generate(PROMPTS[1:3] + [PROMPTS[0]] + PROMPTS[1:], [other, other, p, other, other, other])
    assert mixed[2].outputs[0].token_ids == alone
    greedy_mate = SamplingParams(temperature=0, max_tokens=5)
    mixed2 = llama_llm.generate([PROMPTS[0], PROMPTS[3]], [p, greedy_mate])
    assert mixed2[0].outputs[0].token_ids == alone
    different_seed = llama_llm.generate([PROMPTS[0]], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24,
                                                                      seed=99, ignore_eos=True))
    assert different_seed[0].outputs[0].token_ids != alone


def test_top_k_1_equals_greedy(llama_llm):
    greedy = llama_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    topk1 = llama_llm.generate(PROMPTS, SamplingParams(temperature=1.5, top_k=1, max_tokens=16, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in greedy] == [o.outputs[0].token_ids for o in topk1]


def _logits(probs):
    return torch.tensor([probs]).log()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = [0.4, 0.3, 0.2, 0.1]
    kept = lambda p: torch.isfinite(filter_logits(_logits(probs), None, torch.tensor([p]), None))[0].tolist()
    assert kept(0.35) == [True, False, False, False]
    assert kept(0.5) == [True, True, False, False]
    assert kept(0.75) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]


def test_min_p_drops_tokens_below_fraction_of_the_top():
    probs = [0.5, 0.3, 0.15, 0.05]
    out = filter_logits(_logits(probs), None, None, torch.tensor([0.4]))  # threshold 0.2
    assert torch.isfinite(out)[0].tolist() == [True, True, False, False]


def test_top_k_and_rows_are_independent():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [4.0, 3.0, 2.0, 1.0]])
    out = filter_logits(logits, torch.tensor([2, 0]), None, None)
    assert torch.isfinite(out).tolist() == [[False, True, True, False], [True, True, True, True]]


def test_sampled_frequencies_follow_the_distribution(llama_llm):
    """Draw the first token many times; compare frequencies with the model's own probabilities."""
    prompt = [PROMPTS[1]]
    top = llama_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, logprobs=20))[0].outputs[0]
    probs = {t: math.exp(lp) for t, lp in top.logprobs[0].top}
    n = 400
    out = llama_llm.generate(prompt * n, SamplingParams(temperature=1.0, max_tokens=1, ignore_eos=True))
    counts: dict[int, int] = {}
    for o in out:
        counts[o.outputs[0].token_ids[0]] = counts.get(o.outputs[0].token_ids[0], 0) + 1
    for token, p in list(probs.items())[:3]:
        expected = n * p
        assert abs(counts.get(token, 0) - expected) < 4 * math.sqrt(expected * (1 - p)) + 2


def test_penalties_discourage_repetition(llama_llm):
    base = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = llama_llm.generate(PROMPTS[2:3], base)[0].outputs[0].token_ids
    penal = llama_llm.generate(PROMPTS[2:3], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                             frequency_penalty=2.0, presence_penalty=2.0))
    rep = llama_llm.generate(PROMPTS[2:3], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                           repetition_penalty=5.0))
    distinct = lambda ids: len(set(ids))
    assert distinct(penal[0].outputs[0].token_ids) >= distinct(plain)
    assert distinct(rep[0].outputs[0].token_ids) >= distinct(plain)
    assert penal[0].outputs[0].token_ids != plain or distinct(plain) == len(plain)


def test_stop_token_ids_min_tokens_and_eos(llama_llm):
    ids = llama_llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    tokens = ids.outputs[0].token_ids
    stop_at = tokens[5]
    first = tokens.index(stop_at)
    out = llama_llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_at]))
    assert out[0].outputs[0].token_ids == tokens[:first + 1]
    assert out[0].outputs[0].finish_reason == "stop" and out[0].outputs[0].stop_reason == stop_at
    # min_tokens masks the stop token until enough tokens are out
    out = llama_llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=20, min_tokens=first + 2,
                                                          stop_token_ids=[stop_at]))
    assert len(out[0].outputs[0].token_ids) > first + 1
    assert stop_at not in out[0].outputs[0].token_ids[:first + 2]


def test_stop_strings_are_matched_across_tokens_and_excluded(llama_llm):
    full = llama_llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    text = full.outputs[0].text
    assert len(text) > 12
    stop = text[8:12]  # very likely spans a token boundary
    out = llama_llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=30, stop=[stop, "@@never@@"]))
    o = out[0].outputs[0]
    assert o.text == text[:text.index(stop)]
    assert o.finish_reason == "stop" and o.stop_reason == stop
    incl = llama_llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=30, stop=stop,
                                                           include_stop_str_in_output=True))
    assert incl[0].outputs[0].text == text[:text.index(stop) + len(stop)]


def test_n_samples_share_the_prompt(llama_llm):
    engine = llama_llm.engine
    prompt = list(range(100, 150))  # 3 full blocks and a partial one
    p = SamplingParams(temperature=1.0, n=4, max_tokens=12, seed=7, ignore_eos=True)
    out = llama_llm.generate([prompt], p)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    again = llama_llm.generate([prompt], p)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]
    greedy = llama_llm.generate([prompt], SamplingParams(temperature=0, n=3, max_tokens=12, ignore_eos=True))[0]
    assert len({tuple(o.token_ids) for o in greedy.outputs}) == 1
    assert engine.block_manager.num_used_blocks == 0


def test_logprobs_are_normalised_and_sorted(llama_llm):
    out = llama_llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=4, logprobs=5))[0].outputs[0]
    for lp, token in zip(out.logprobs, out.token_ids):
        assert lp.token_id == token
        assert lp.top[0][0] == token  # greedy picks the top token
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)


# -- the fused sampling kernel itself, on known distributions -------------------------------------
from scalellm import ops  # noqa: E402
from scalellm.engine.sequence import Sequence  # noqa: E402
from scalellm.sampling.batch import build_sampling_batch  # noqa: E402
from tests.sampling_reference import apply_penalties  # noqa: E402


def _draw(probs, n, **params):
    """n draws from one distribution, each row with its own stream (seed = row index)."""
    logits = torch.tensor([probs]).log().float().repeat(n, 1)
    seqs = [Sequence(i, "r", 0, [1], 1, SamplingParams(seed=i, **params), 0.0) for i in range(n)]
    tokens, chosen, top_ids, top_lp = ops.fused_sample(logits, build_sampling_batch(seqs, [], logits.shape[1]))
    return tokens.tolist()


def test_kernel_filters_on_a_known_distribution():
    probs = [0.4, 0.3, 0.2, 0.1]
    assert set(_draw(probs, 300, top_p=0.5)) == {0, 1}
    assert set(_draw(probs, 300, top_p=0.75)) == {0, 1, 2}
    assert set(_draw(probs, 300, min_p=0.6)) == {0, 1}  # p >= 0.24
    assert set(_draw(probs, 300, top_k=3)) == {0, 1, 2}
    assert set(_draw(probs, 300, top_k=1)) == {0}
    assert set(_draw(probs, 300)) == {0, 1, 2, 3}


def test_kernel_frequencies_and_determinism():
    probs = [0.5, 0.25, 0.125, 0.0625, 0.0625]
    n = 4000
    draws = _draw(probs, n)
    assert draws == _draw(probs, n)  # same streams, same tokens
    for token, p in enumerate(probs):
        count = draws.count(token)
        assert abs(count - n * p) < 4 * math.sqrt(n * p * (1 - p)), (token, count)
    hot = _draw(probs, n, temperature=0.5)  # sharper: p^2 renormalized
    assert hot.count(0) / n == pytest.approx(0.25 / sum(q * q for q in probs), abs=0.03)


def test_kernel_penalties_and_logprobs_match_reference():
    torch.manual_seed(3)
    vocab = 50
    logits = torch.randn(4, vocab)
    params = [SamplingParams(temperature=0, repetition_penalty=1.7),
              SamplingParams(temperature=0, presence_penalty=1.5, frequency_penalty=0.5, logprobs=5),
              SamplingParams(temperature=0, min_tokens=5, stop_token_ids=[7], logprobs=0),
              SamplingParams(temperature=0)]
    seqs = [Sequence(i, "r", 0, [3, 4, 5, 3, 9, 9, 12], 4, p, 0.0) for i, p in enumerate(params)]
    logits[2, 7] = 10.0  # would win, but min_tokens bans the stop token
    tokens, chosen, top_ids, top_lp = ops.fused_sample(logits, build_sampling_batch(seqs, [], vocab))
    expected = apply_penalties(logits, seqs)
    expected[2, 7] = float("-inf")
    assert tokens.tolist() == expected.argmax(-1).tolist()
    raw = torch.log_softmax(logits.double(), -1)
    for i in (1, 2):  # the rows that asked for logprobs
        assert chosen[i].item() == pytest.approx(raw[i, tokens[i]].item(), abs=1e-5)
    assert top_ids[1].tolist() == raw[1].topk(5).indices.tolist()
    torch.testing.assert_close(top_lp[1].double(), raw[1].topk(5).values, atol=1e-5, rtol=0)
