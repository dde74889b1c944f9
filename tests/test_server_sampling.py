"""Every sampling field sent over HTTP must reach the engine: each test compares a request with the
field against the same request without it, on outputs the field must change.

The test model is random, so its next-token distributions are nearly flat (the top token's
probability is below 1e-3). Logprobs are always those of the raw logits, which lets a test check which
tokens a filter may keep at each step: a sample outside them can only come from a filter ignored.
"""
import math

import pytest

from tests.server_utils import ServerProcess, copy_checkpoint, post_json, single_token_id

MODEL = "tiny-llama"
REPEATING_CANDIDATES = ["Hello", "Once upon a time", "Numbers:", "The meaning of life is", "A B C"]


def complete(server, prompt, **fields) -> dict:
    return post_json(server.url, "/v1/completions", {"model": MODEL, "prompt": prompt, **fields})


def steps(choice) -> list[tuple[float, list[float]]]:
    """Per generated token: (its raw logprob, the returned top raw logprobs in descending order)."""
    lp = choice["logprobs"]
    return [(chosen, sorted(top.values(), reverse=True))
            for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"])]


def is_top1(chosen: float, top: list[float]) -> bool:
    return chosen >= top[0] - 1e-5


def draws(out) -> list[tuple[float, list[float]]]:
    return [s for c in out["choices"] for s in steps(c)]


def texts(out) -> list[str]:
    return [c["text"] for c in out["choices"]]


def repeats(tokens: list[str]) -> int:
    clear = [t for t in tokens if "\ufffd" not in t]  # byte pieces share one text: not comparable
    return len(clear) - len(set(clear))


@pytest.fixture(scope="module")
def repeating_prompt(llama_server):
    """A prompt whose greedy continuation repeats tokens, found through the server itself."""
    for prompt in REPEATING_CANDIDATES:
        out = complete(llama_server, prompt, max_tokens=32, temperature=0, logprobs=20)
        if repeats(out["choices"][0]["logprobs"]["tokens"]) >= 2:
            return prompt, out["choices"][0]
    pytest.fail("no candidate prompt has a repeating greedy continuation; add candidates")


def test_temperature_changes_tokens_and_their_distribution(llama_server):
    greedy = complete(llama_server, "Once", max_tokens=16, temperature=0, logprobs=1)
    assert all(is_top1(c, t) for c, t in steps(greedy["choices"][0]))
    hot = complete(llama_server, "Once", max_tokens=16, temperature=1.0, seed=7, n=4, logprobs=1)
    cold = complete(llama_server, "Once", max_tokens=16, temperature=0.05, seed=7, n=4, logprobs=1)
    assert all(t != greedy["choices"][0]["text"] for t in texts(hot))
    assert len(set(texts(hot))) == 4
    # at temperature 1 a near-flat distribution almost never yields its top token; at 0.05 the
    # logit gaps grow twentyfold and samples crowd at the top
    hot_lp = [c for c, _ in draws(hot)]
    cold_lp = [c for c, _ in draws(cold)]
    assert sum(is_top1(c, t) for c, t in draws(hot)) <= 4
    assert sum(is_top1(c, t) for c, t in draws(cold)) >= 16
    assert sum(cold_lp) / len(cold_lp) > sum(hot_lp) / len(hot_lp) + 1.0


def test_seed_selects_the_random_stream(llama_server):
    outs = [complete(llama_server, "Once", max_tokens=12, temperature=1.0, seed=s)["choices"][0]["text"]
            for s in (1, 2, 3, 1)]
    assert outs[0] == outs[3]
    assert len(set(outs[:3])) == 3
    unseeded = {complete(llama_server, "Once", max_tokens=12, temperature=1.0)["choices"][0]["text"]
                for _ in range(2)}
    assert len(unseeded) == 2


def test_n_gives_independent_samples(llama_server):
    sampled = complete(llama_server, "Once", max_tokens=10, temperature=1.0, n=3, seed=11)
    assert sorted(c["index"] for c in sampled["choices"]) == [0, 1, 2]
    assert len(set(texts(sampled))) == 3
    assert sampled["usage"]["completion_tokens"] == 30
    greedy = complete(llama_server, "Once", max_tokens=10, temperature=0, n=3)
    assert len(set(texts(greedy))) == 1


def test_top_k(llama_server):
    greedy = complete(llama_server, "Once", max_tokens=16, temperature=0)["choices"][0]["text"]
    one = complete(llama_server, "Once", max_tokens=16, temperature=5.0, top_k=1, seed=3)
    assert one["choices"][0]["text"] == greedy
    kw = dict(max_tokens=12, temperature=1.0, n=4, seed=5, logprobs=4)
    kept = draws(complete(llama_server, "Once", top_k=4, **kw))
    assert all(c >= t[3] - 1e-5 for c, t in kept)  # only the 4 most likely tokens are drawn
    assert sum(not is_top1(c, t) for c, t in kept) >= len(kept) // 4  # and not only the first
    free = draws(complete(llama_server, "Once", **kw))
    assert sum(c < t[3] - 1e-5 for c, t in free) >= len(free) // 2


def test_top_p(llama_server):
    probe = steps(complete(llama_server, "Once", max_tokens=1, temperature=0, logprobs=20)["choices"][0])
    top_p = sum(math.exp(v) for v in probe[0][1][:4])  # about four tokens' worth of probability
    kw = dict(max_tokens=12, temperature=1.0, n=4, seed=5, logprobs=20)
    kept = draws(complete(llama_server, "Once", top_p=top_p, **kw))
    for chosen, top in kept:
        assert chosen >= top[-1] - 1e-5
        before = sum(math.exp(v) for v in top if v > chosen + 1e-6)
        assert before < top_p * (1 + 1e-3)  # the kept set is the smallest prefix reaching top_p
    assert sum(not is_top1(c, t) for c, t in kept) >= len(kept) // 4
    free = draws(complete(llama_server, "Once", **kw))
    assert sum(c < t[-1] - 1e-5 for c, t in free) >= len(free) // 2


def test_min_p(llama_server):
    kw = dict(max_tokens=12, temperature=1.0, n=4, seed=5, logprobs=1)
    kept = draws(complete(llama_server, "Once", min_p=0.75, **kw))
    assert all(c >= t[0] + math.log(0.75) - 1e-5 for c, t in kept)
    assert sum(not is_top1(c, t) for c, t in kept) >= len(kept) // 8
    free = draws(complete(llama_server, "Once", **kw))
    assert sum(c < t[0] + math.log(0.75) - 1e-5 for c, t in free) >= len(free) // 2


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
def test_additive_penalties_follow_their_rule(llama_server, repeating_prompt, field):
    prompt, plain = repeating_prompt
    out = complete(llama_server, prompt, max_tokens=32, temperature=0, logprobs=20, **{field: 2.0})["choices"][0]
    assert out["text"] != plain["text"]
    tokens = out["logprobs"]["tokens"]
    assert repeats(tokens) < repeats(plain["logprobs"]["tokens"])
    # greedy over penalized logits: the chosen token beats every returned candidate once each is
    # penalized by what it has been generated so far (presence: once; frequency: per occurrence)
    counts: dict[str, int] = {}
    checked = 0
    for token, chosen, top in zip(tokens, out["logprobs"]["token_logprobs"], out["logprobs"]["top_logprobs"]):
        def penalized(text, value):
            c = counts.get(text, 0)
            return value - (2.0 * (c > 0) if field == "presence_penalty" else 2.0 * c)
        if "\ufffd" not in token:
            best = max(penalized(t, v) for t, v in top.items() if "\ufffd" not in t)
            assert penalized(token, chosen) >= best - 1e-4, (token, counts.get(token))
            checked += 1
        counts[token] = counts.get(token, 0) + 1
    assert checked >= 24


def test_repetition_penalty(llama_server, repeating_prompt):
    prompt, plain = repeating_prompt
    out = complete(llama_server, prompt, max_tokens=32, temperature=0, logprobs=0, repetition_penalty=10.0)
    tokens = out["choices"][0]["logprobs"]["tokens"]
    assert out["choices"][0]["text"] != plain["text"]
    # a seen token's positive logit is divided by 10 and a negative one multiplied: on flat logits
    # no seen token can beat the best unseen one, so nothing repeats, prompt tokens included
    ids = post_json(llama_server.url, "/tokenize", {"prompt": prompt})["tokens"]
    prompt_tokens = {post_json(llama_server.url, "/detokenize", {"tokens": [i]})["prompt"] for i in ids}
    assert repeats(tokens) == 0
    assert not prompt_tokens & set(tokens)
    encouraged = complete(llama_server, prompt, max_tokens=32, temperature=0, logprobs=0, repetition_penalty=0.1)
    assert repeats(encouraged["choices"][0]["logprobs"]["tokens"]) > repeats(plain["logprobs"]["tokens"])


def test_stop_token_ids_and_min_tokens(llama_server):
    greedy = complete(llama_server, "Once", max_tokens=8, temperature=0, logprobs=1)["choices"][0]
    tokens = greedy["logprobs"]["tokens"]
    assert greedy["finish_reason"] == "length" and len(tokens) == 8
    j = next(j for j in range(2, 8) if tokens[j] not in tokens[:j])  # a token first generated at j
    stop_id = single_token_id(llama_server.url, tokens[j])
    out = complete(llama_server, "Once", max_tokens=8, temperature=0, stop_token_ids=[stop_id])
    assert out["choices"][0]["finish_reason"] == "stop" and out["choices"][0]["stop_reason"] == stop_id
    assert out["choices"][0]["text"] == "".join(tokens[:j + 1])  # like vLLM: the stop token is kept
    assert out["usage"]["completion_tokens"] == j + 1

    first = single_token_id(llama_server.url, tokens[0])
    stopped = complete(llama_server, "Once", max_tokens=8, temperature=0, stop_token_ids=[first])
    assert stopped["usage"]["completion_tokens"] == 1 and stopped["choices"][0]["stop_reason"] == first
    held = complete(llama_server, "Once", max_tokens=8, temperature=0, stop_token_ids=[first], min_tokens=4,
                    logprobs=1)
    assert held["usage"]["completion_tokens"] >= 4
    held_tokens = held["choices"][0]["logprobs"]["tokens"]
    assert tokens[0] not in held_tokens[:4]  # banned while fewer than min_tokens were produced
    chosen, top = steps(held["choices"][0])[0]
    assert chosen < top[0] - 1e-6  # the first token is no longer the most likely one


@pytest.fixture(scope="module")
def eos_server(llama_server, llama_folder, tmp_path_factory):
    """The test model with an extra EOS id, in generation_config.json only: the greedy first token
    after "Once", so that whether EOS ends a request is visible at once."""
    first = complete(llama_server, "Once", max_tokens=1, temperature=0, logprobs=0)
    eos = single_token_id(llama_server.url, first["choices"][0]["logprobs"]["tokens"][0])
    assert eos != 2
    folder = copy_checkpoint(llama_folder, str(tmp_path_factory.mktemp("eos") / "ckpt"),
                             generation_config={"eos_token_id": [2, eos]})
    server = ServerProcess("--model", folder, "--dtype", "float32", "--served-model-name", MODEL,
                           "--max-model-len", "256", "--kv-cache-memory", "16MB")
    yield server
    server.stop()


def test_ignore_eos_and_generation_config_eos(eos_server):
    ends = complete(eos_server, "Once", max_tokens=8, temperature=0)
    assert ends["choices"][0]["finish_reason"] == "stop" and ends["usage"]["completion_tokens"] == 1
    assert ends["choices"][0]["stop_reason"] is None  # EOS, not a stop_token_ids entry
    ignored = complete(eos_server, "Once", max_tokens=8, temperature=0, ignore_eos=True)
    assert ignored["choices"][0]["finish_reason"] == "length" and ignored["usage"]["completion_tokens"] == 8
    held = complete(eos_server, "Once", max_tokens=8, temperature=0, min_tokens=3)
    assert held["usage"]["completion_tokens"] >= 3
