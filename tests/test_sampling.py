"""Sampling: seeds independent of batch mates, filters on known distributions, penalties, stops, n > 1."""
import math

import pytest
import torch

from scalellm import SamplingParams
from scalellm.engine.sequence import Sequence
from tests.checkpoints import hf_prompt_logits
from tests.sampling_reference import apply_penalties, run_sampler

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


def test_sampled_frequencies_follow_the_distribution(llama_llm, llama_hf):
    """Many seeded samples of the first token against transformers' own distribution at the same
    temperature, in bins of about equal mass: each bin count within five standard deviations."""
    prompt = llama_llm.tokenizer.encode(PROMPTS[1])
    temperature, n = 0.3, 4000
    probs = (hf_prompt_logits(llama_hf, prompt)[-1].double() / temperature).softmax(-1)
    out = llama_llm.generate([prompt], SamplingParams(n=n, seed=11, temperature=temperature, max_tokens=1))[0]
    drawn = torch.bincount(torch.tensor([o.token_ids[0] for o in out.outputs]), minlength=len(probs)).double()
    order = probs.argsort(descending=True)
    bins = torch.clamp((probs[order].cumsum(0) * 10).long(), max=9)  # ten bins by cumulative mass
    assert probs[order[0]] > 0.05  # peaked enough that the top bins hold a few tokens each
    for b in range(10):
        members = order[bins == b]
        p, count = probs[members].sum().item(), drawn[members].sum().item()
        if p == 0:
            continue
        assert abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (b, len(members), count, n * p)


def hf_generate(model, prompt: list[int], max_new: int, **kwargs) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, min_new_tokens=max_new,
                             do_sample=False, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


class OpenAIPenalties:
    """Presence and frequency penalties as the OpenAI API defines them: over generated tokens only."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_len:]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def test_penalties_match_transformers_and_change_the_output(llama_llm, llama_hf):
    from transformers import LogitsProcessorList

    prompt = llama_llm.tokenizer.encode(PROMPTS[2])
    new = 40
    plain = hf_generate(llama_hf, prompt, new)
    ours = llama_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    assert ours[0].outputs[0].token_ids == plain
    openai = lambda presence, frequency: dict(  # noqa: E731
        logits_processor=LogitsProcessorList([OpenAIPenalties(len(prompt), presence, frequency)]))
    cases = [(dict(repetition_penalty=1.3), dict(repetition_penalty=1.3)),
             (dict(presence_penalty=1.5), openai(1.5, 0.0)),
             (dict(frequency_penalty=0.8), openai(0.0, 0.8))]
    for ours_kw, hf_kw in cases:
        expected = hf_generate(llama_hf, prompt, new, **hf_kw)
        assert expected != plain, f"{ours_kw} should change this output"
        out = llama_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=new, ignore_eos=True, **ours_kw))
        assert out[0].outputs[0].token_ids == expected, ours_kw


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

    # step by hand to watch the cache while the samples run
    bm = engine.block_manager
    request = engine.add_request("n-share", prompt, p)
    while len(request.seqs) < 4:
        engine.step()
    shared = request.seqs[0].block_table[:3]
    assert all(s.block_table[:3] == shared for s in request.seqs)
    assert [bm.ref_counts[b] for b in shared] == [4, 4, 4]
    engine.step()  # each sample now holds its own copy of the partial last block
    tails = [s.block_table[3] for s in request.seqs]
    assert len(set(tails)) == 4 and not set(tails) & set(shared)
    assert bm.num_used_blocks == 3 + 4  # without sharing the four samples would hold 16 blocks
    while engine.has_unfinished():
        engine.step()
    assert sorted(s.output_token_ids for s in request.seqs) == sorted(o.token_ids for o in out.outputs)
    assert bm.num_used_blocks == 0


def test_logprobs_are_normalised_and_sorted(llama_llm):
    out = llama_llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=4, logprobs=5))[0].outputs[0]
    for lp, token in zip(out.logprobs, out.token_ids):
        assert lp.token_id == token
        assert lp.top[0][0] == token  # greedy picks the top token
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)


# -- penalties and min_tokens through the project's sampler, against the torch reference ------------
def test_kernel_penalties_and_logprobs_match_reference():
    torch.manual_seed(3)
    vocab = 50
    logits = torch.randn(4, vocab)
    params = [SamplingParams(temperature=0, repetition_penalty=1.7),
              SamplingParams(temperature=0, presence_penalty=1.5, frequency_penalty=0.5, logprobs=5),
              SamplingParams(temperature=0, min_tokens=5, stop_token_ids=[7], logprobs=0),
              SamplingParams(temperature=0)]
    history = ([3, 4, 5, 3, 9, 9, 12], 4)  # prompt [3, 4, 5, 3], output [9, 9, 12]
    top = logits.max().item()
    logits[0, 4] = top + 0.5  # a prompt token: wins unless the repetition penalty applies
    logits[1, 9] = top + 1.0  # an output token seen twice: wins unless presence and frequency apply
    logits[2, 7] = top + 5.0  # the stop token: wins unless min_tokens bans it
    out = run_sampler(logits, params, [history] * 4)
    seqs = [Sequence(i, "r", 0, list(history[0]), history[1], p, 0.0) for i, p in enumerate(params)]
    expected = apply_penalties(logits, seqs)
    expected[2, 7] = float("-inf")
    assert out.token_ids == expected.argmax(-1).tolist()
    assert [out.token_ids[i] != raw for i, raw in enumerate([4, 9, 7])] == [True, True, True]
    raw = torch.log_softmax(logits.double(), -1)
    for i in (1, 2):  # the rows that asked for logprobs
        assert out.logprobs[i].logprob == pytest.approx(raw[i, out.token_ids[i]].item(), abs=1e-5)
    assert [t for t, _ in out.logprobs[1].top] == raw[1].topk(5).indices.tolist()
    assert [v for _, v in out.logprobs[1].top] == pytest.approx(raw[1].topk(5).values.tolist(), abs=1e-5)
    assert out.logprobs[2].top == [] and out.logprobs[0] is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_greedy_tokens_match_torch_argmax(dtype, rows):
    """The greedy kernel reads the logits' bits: the first of equal maxima wins, -0.0 equals +0.0, rows of
    -inf give 0, a NaN wins as it does for torch; serial (few rows) and parallel builds alike."""
    from scalellm.ops import greedy_tokens

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1000, generator=g).to(dtype)
    x[0, 700] = x[0, 300] = x[0].max() + 1  # a tie: the first index
    if rows > 1:
        x[1] = 0.0
        x[1, :5] = -0.0  # -0.0 first: still the first index among equals
        x[-1] = float("-inf")
    if rows > 2:
        x[rows // 2, 800] = float("nan")
        x[rows // 2, 900] = float("inf")
    if rows == 64:
        x[10, 999] = float("inf")
        x[11, 5] = -float("nan")
    expected = x.float().argmax(-1)
    assert torch.equal(greedy_tokens(x), expected)
    assert torch.equal(greedy_tokens(x[:, :17].contiguous()), x[:, :17].float().argmax(-1))
