"""The project's sampler on constructed logits: frequencies over thousands of seeded rows must match
the distribution each parameter implies, and every penalty must change an outcome it is built to change.

Each row has its own seed, so the draws are independent and the test is deterministic. Counts must
fall within five standard deviations of the expectation (a correct sampler fails that with odds of
about one in a million per token); tokens the filters exclude must never be drawn.
"""
import math

import pytest
import torch

from scalellm import SamplingParams
from tests.sampling_reference import run_sampler, seeded

N = 20000
HAS_CUDA = torch.cuda.is_available()
try:
    import cupy  # noqa: F401
    HAS_CUPY = True
except ImportError:
    HAS_CUPY = False


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (HAS_CUDA and HAS_CUPY), reason="needs a CUDA GPU and CuPy"))])
def device(request):
    return request.param


def draw(probs, device, n=N, **params) -> list[int]:
    logits = torch.tensor([probs], dtype=torch.float64).log().float().repeat(n, 1).to(device)
    return run_sampler(logits, seeded(n, **params)).token_ids


def expected_after_temperature(probs, t):
    scaled = [p ** (1.0 / t) for p in probs]
    return [s / sum(scaled) for s in scaled]


def renormalized(probs, kept):
    mass = sum(probs[i] for i in kept)
    return [p / mass if i in kept else 0.0 for i, p in enumerate(probs)]


def assert_frequencies(tokens: list[int], expected: list[float]) -> None:
    n = len(tokens)
    counts = torch.bincount(torch.tensor(tokens), minlength=len(expected)).tolist()
    assert len(counts) == len(expected), f"drew a token outside the vocabulary: {counts}"
    for token, (count, p) in enumerate(zip(counts, expected)):
        if p == 0:
            assert count == 0, f"token {token} is filtered out but was drawn {count} times"
        else:
            bound = 5 * math.sqrt(n * p * (1 - p))
            assert abs(count - n * p) <= bound, f"token {token}: {count} draws, expected {n * p:.0f} ± {bound:.0f}"


PROBS = [0.35, 0.25, 0.15, 0.1, 0.08, 0.05, 0.02]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_follow_softmax_of_logits_over_temperature(device, temperature):
    assert_frequencies(draw(PROBS, device, temperature=temperature), expected_after_temperature(PROBS, temperature))


def test_seeds_fix_the_draws(device):
    a = draw(PROBS, device, n=2000)
    assert a == draw(PROBS, device, n=2000)
    logits = torch.tensor([PROBS]).log().repeat(2000, 1).to(device)
    shifted = run_sampler(logits, [SamplingParams(seed=i + 10_000) for i in range(2000)]).token_ids
    assert sum(x != y for x, y in zip(a, shifted)) > 500


def test_top_k_keeps_the_k_most_likely(device):
    assert_frequencies(draw(PROBS, device, top_k=3), renormalized(PROBS, {0, 1, 2}))
    assert set(draw(PROBS, device, n=2000, top_k=1, temperature=1.5)) == {0}
    # top_k = vocabulary size, and larger, leaves the distribution alone
    assert_frequencies(draw(PROBS, device, top_k=len(PROBS) + 5), PROBS)


def test_top_p_keeps_the_smallest_set_reaching_p(device):
    probs = [0.4, 0.3, 0.2, 0.1]
    assert set(draw(probs, device, n=2000, top_p=0.35)) == {0}
    assert_frequencies(draw(probs, device, top_p=0.65), renormalized(probs, {0, 1}))
    assert_frequencies(draw(probs, device, top_p=0.75), renormalized(probs, {0, 1, 2}))
    assert_frequencies(draw(probs, device, top_p=0.95), probs)  # 0.9 sits above the last token


def test_top_p_applies_to_the_tempered_distribution(device):
    probs = [0.4, 0.3, 0.2, 0.1]
    hot = expected_after_temperature(probs, 2.0)  # 0.325, 0.282, 0.230, 0.163
    # before tempering, tokens 0 and 1 (0.7) would reach 0.65; after it, three tokens are needed
    assert_frequencies(draw(probs, device, top_p=0.65, temperature=2.0), renormalized(hot, {0, 1, 2}))


def test_min_p_drops_tokens_below_fraction_of_the_top(device):
    probs = [0.5, 0.3, 0.15, 0.05]
    assert_frequencies(draw(probs, device, min_p=0.4), renormalized(probs, {0, 1}))  # threshold 0.2
    hot = expected_after_temperature(probs, 2.0)  # 0.379, 0.294, 0.207, 0.120
    assert_frequencies(draw(probs, device, min_p=0.5, temperature=2.0), renormalized(hot, {0, 1, 2}))


def test_top_k_and_rows_are_independent(device):
    """Rows with different filters and different logits, interleaved in one batch."""
    a, b = [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]
    groups = [(a, dict(top_k=2)), (b, dict(top_p=0.65)), (a, dict(min_p=0.6)), (b, dict()), (a, dict(temperature=0))]
    n = 5000
    logits, params = [], []
    for i in range(n * len(groups)):
        probs, kw = groups[i % len(groups)]
        logits.append(probs)
        params.append(SamplingParams(seed=i, **kw))
    tokens = run_sampler(torch.tensor(logits).log().to(device), params).token_ids
    expect = [renormalized(a, {0, 1}), renormalized(b, {2, 3}), renormalized(a, {0, 1}), b, [1, 0, 0, 0]]
    for g, probs in enumerate(expect):
        assert_frequencies(tokens[g::len(groups)], probs)


def test_filters_on_a_large_vocabulary(device):
    """A realistic vocabulary: the sorted and partitioned paths, against the reference filters."""
    from tests.sampling_reference import filter_logits

    vocab = 3000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(11)) * 2.5
    cases = [dict(top_k=40), dict(top_p=0.5), dict(min_p=0.1)]
    for kw in cases:
        ref = filter_logits(logits[None], torch.tensor([kw.get("top_k", 0)]), torch.tensor([kw.get("top_p", 1.0)]),
                            torch.tensor([kw.get("min_p", 0.0)]))[0]
        expected = ref.double().softmax(-1)
        kept = torch.isfinite(ref)
        assert 5 < int(kept.sum()) < vocab // 2
        tokens = run_sampler(logits[None].repeat(N, 1).to(device), seeded(N, **kw)).token_ids
        assert all(kept[t] for t in tokens), kw
        # bins: the ten most likely tokens, and everything else kept
        top = expected.topk(10).indices.tolist()
        binned = [sum(1 for t in tokens if t == k) for k in top] + [sum(1 for t in tokens if t not in top)]
        bin_probs = [expected[k].item() for k in top] + [1 - sum(expected[k].item() for k in top)]
        for count, p in zip(binned, bin_probs):
            assert abs(count - N * p) <= 5 * math.sqrt(N * p * (1 - p)) + 1e-9, (kw, count, N * p)


# -- penalties: each on logits where it must change the outcome ----------------------------------
def logits_row(vocab=12, **values) -> list[float]:
    row = [-3.0] * vocab
    for key, v in values.items():
        row[int(key[1:])] = v
    return row


def greedy_rows(rows):
    """rows: (logits, params, (token ids, prompt length)) -> the sampled tokens."""
    logits = torch.tensor([r[0] for r in rows])
    return run_sampler(logits, [r[1] for r in rows], [r[2] for r in rows], eos_token_ids=(2,)).token_ids


def test_repetition_penalty_changes_the_greedy_choice():
    rep = SamplingParams(temperature=0, repetition_penalty=1.5)
    rows = [
        (logits_row(t5=2.0, t6=1.5), rep, ([5, 9], 2)),  # seen in the prompt: 2.0 / 1.5 < 1.5
        (logits_row(t5=2.0, t6=1.5), rep, ([9, 5, 5], 1)),  # seen in the output
        (logits_row(t5=-1.0, t6=-1.4), rep, ([5, 9], 2)),  # negative: -1.0 * 1.5 < -1.4 (not -1.0 / 1.5)
        (logits_row(t5=2.0, t6=1.5), rep, ([9, 10], 2)),  # unseen: untouched
        (logits_row(t5=2.0, t6=1.9), rep, ([5, 6], 2)),  # both seen: 1.333 vs 1.267
        (logits_row(t5=2.0, t6=1.5), SamplingParams(temperature=0), ([5, 9], 2)),  # no penalty
    ]
    assert greedy_rows(rows) == [6, 6, 6, 5, 5, 5]


def test_presence_penalty_changes_the_greedy_choice():
    pres = SamplingParams(temperature=0, presence_penalty=0.7)
    rows = [
        (logits_row(t5=2.0, t6=1.5), pres, ([9, 5], 1)),  # in the output once: 2.0 - 0.7 < 1.5
        (logits_row(t5=2.0, t6=1.5), pres, ([9, 5, 5, 5], 1)),  # presence does not grow with the count
        (logits_row(t5=2.0, t6=1.2), pres, ([9, 5, 5, 5], 1)),
        (logits_row(t5=2.0, t6=1.5), pres, ([5, 9], 2)),  # only in the prompt: untouched
        (logits_row(t5=2.0, t6=1.5), SamplingParams(temperature=0, presence_penalty=-0.7), ([9, 6], 1)),
    ]
    assert greedy_rows(rows) == [6, 6, 5, 5, 6]


def test_frequency_penalty_scales_with_the_count():
    freq = SamplingParams(temperature=0, frequency_penalty=0.2)
    rows = [
        (logits_row(t5=2.0, t6=1.5), freq, ([9, 5, 5, 5], 1)),  # 2.0 - 3 * 0.2 < 1.5
        (logits_row(t5=2.0, t6=1.5), freq, ([9, 5], 1)),  # 2.0 - 0.2 > 1.5
        (logits_row(t5=2.0, t6=1.5), freq, ([5, 5, 5, 9], 3)),  # only in the prompt
        (logits_row(t5=2.0, t6=1.5), SamplingParams(temperature=0, frequency_penalty=-0.2), ([9, 6, 6, 6], 1)),
    ]
    assert greedy_rows(rows) == [6, 5, 5, 6]


def test_penalized_sampling_follows_the_penalized_distribution():
    probs = [0.4, 0.3, 0.2, 0.1]
    base = torch.tensor(probs).log()
    history = ([3, 0, 0, 1], 2)  # prompt [3, 0]; output [0, 1]
    cases = [
        (dict(repetition_penalty=1.8), lambda x: torch.where(x > 0, x / 1.8, x * 1.8), [0, 1, 3]),
        (dict(frequency_penalty=0.5, presence_penalty=0.25), lambda x: x - torch.tensor([0.75, 0.75, 0, 0]), None),
    ]
    for kw, fn, seen in cases:
        if seen is not None:
            x = base.clone()
            x[seen] = fn(base[seen])
        else:
            x = fn(base)
        expected = x.double().softmax(-1).tolist()
        tokens = run_sampler(base[None].repeat(N, 1), seeded(N, **kw), [history] * N).token_ids
        assert_frequencies(tokens, expected)


def test_min_tokens_bans_eos_and_stop_tokens_until_reached():
    eos_first = logits_row(t2=5.0, t7=4.0, t4=3.0)  # eos (2) would win, then stop token 7, then 4
    stop_first = logits_row(t7=5.0, t4=3.0)
    rows = [
        (eos_first, SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[7]), ([1, 8, 8], 1)),  # 2 out
        (eos_first, SamplingParams(temperature=0, min_tokens=3), ([1, 8, 8], 1)),
        (eos_first, SamplingParams(temperature=0, min_tokens=3), ([1, 8, 8, 8], 1)),  # reached
        (stop_first, SamplingParams(temperature=0, min_tokens=1, stop_token_ids=[7]), ([1], 1)),
        (stop_first, SamplingParams(temperature=0, min_tokens=1, stop_token_ids=[7]), ([1, 8], 1)),
        (eos_first, SamplingParams(temperature=0, min_tokens=3, ignore_eos=True), ([1], 1)),  # eos is no stop
    ]
    assert greedy_rows(rows) == [4, 7, 2, 4, 7, 2]
    # sampled: the banned tokens are never drawn, the rest keep their relative odds
    probs = [0.1, 0.1, 0.5, 0.1, 0.2]
    logits = torch.tensor([probs]).log().repeat(N, 1)
    tokens = run_sampler(logits, seeded(N, min_tokens=2, stop_token_ids=[3]), [([1, 1], 1)] * N,
                         eos_token_ids=(2,)).token_ids
    assert_frequencies(tokens, renormalized(probs, {0, 1, 4}))


def test_logprobs_are_those_of_the_raw_logits():
    vocab = 500
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(4)) * 3
    logits[4, 7] = 12.0
    params = [SamplingParams(temperature=0, logprobs=5), SamplingParams(temperature=0.5, seed=1, logprobs=20),
              SamplingParams(temperature=0, logprobs=0), SamplingParams(temperature=0),
              SamplingParams(temperature=0, repetition_penalty=3.0, logprobs=3),
              SamplingParams(temperature=1.0, top_k=3, seed=2, logprobs=1)]
    histories = [([1], 1)] * 4 + [([7, 7], 1), ([1], 1)]
    out = run_sampler(logits, params, histories)
    raw = torch.log_softmax(logits.double(), -1)
    assert out.logprobs[3] is None
    assert out.token_ids[4] != 7  # the penalty moved the choice, but logprobs stay those of the raw logits
    for i, p in enumerate(params):
        if p.logprobs is None:
            continue
        lp = out.logprobs[i]
        token = out.token_ids[i]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(raw[i, token].item(), abs=1e-5)
        top = raw[i].topk(p.logprobs)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-5)
