"""Scoring: each prompt token's logprob (vLLM's prompt_logprobs, OpenAI's echo with logprobs and
max_tokens 0) against transformers in float32, through chunked prefill and the prefix cache."""
import json
import urllib.request

import pytest
import torch

from scalellm import LLM, SamplingParams
from tests.server_utils import post_json

PROMPTS = [list(range(5, 75)), [7, 8, 9, 100, 2000, 3], [44, 45], list(range(300, 341))]


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)


def check_against_hf(hf, ids: list[int], scored, k: int) -> None:
    assert len(scored) == len(ids) and scored[0] is None
    ref = hf_logprobs(hf, ids)
    for pos in range(1, len(ids)):
        lp, row = scored[pos], ref[pos - 1]
        assert lp.token_id == ids[pos]
        assert abs(lp.logprob - row[ids[pos]].item()) < 1e-4
        assert ranks_near(row, row[ids[pos]].item(), lp.rank)
        top_lp = row.topk(k).values
        assert len(lp.top) == k
        for (t, value), want in zip(lp.top, top_lp.tolist()):  # ids may differ only between near-ties
            assert abs(value - want) < 1e-4 and abs(row[t].item() - value) < 1e-4


def ranks_near(row: torch.Tensor, value: float, rank: int, tol: float = 1e-4) -> bool:
    """The rank of a logprob in its row, allowing for near-ties that float rounding may order either way."""
    return int((row > value + tol).sum()) + 1 <= rank <= int((row > value - tol).sum()) + 1


@pytest.fixture(scope="module")
def small_chunks(llama_folder):
    """Prompts split into 16-token chunks, prefix caching on."""
    return LLM(llama_folder, dtype="float32", block_size=16, max_num_batched_tokens=16)


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_prompt_logprobs_match_transformers(small_chunks, llama_hf, max_tokens):
    outs = small_chunks.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens, prompt_logprobs=3))
    for ids, out in zip(PROMPTS, outs):
        check_against_hf(llama_hf, ids, out.prompt_logprobs, 3)
        assert len(out.outputs[0].token_ids) == max_tokens and out.outputs[0].finish_reason == "length"


def test_scoring_recomputes_cached_prefixes(small_chunks, llama_hf):
    """A prompt whose blocks are all in the prefix cache is still scored at every position."""
    ids = list(range(1000, 1050))
    small_chunks.generate([ids], SamplingParams(temperature=0, max_tokens=2))  # its blocks are cached now
    out = small_chunks.generate([ids], SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=1))[0]
    check_against_hf(llama_hf, ids, out.prompt_logprobs, 1)
    assert out.num_cached_tokens == 0
    again = small_chunks.generate([ids], SamplingParams(temperature=0, max_tokens=2))[0]
    assert again.num_cached_tokens == 48  # and they stay reusable by others


def test_prompt_logprobs_with_n_and_generation(small_chunks, llama_hf):
    ids = PROMPTS[3]
    out = small_chunks.generate([ids], SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=4,
                                                      prompt_logprobs=0))[0]
    check_against_hf(llama_hf, ids, out.prompt_logprobs, 0)
    assert [len(o.token_ids) for o in out.outputs] == [4, 4]


def test_prompt_only_requests_refuse_n(small_chunks):
    with pytest.raises(ValueError, match="n must be 1"):
        SamplingParams(max_tokens=0, n=2)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)


def test_one_token_chunk_of_a_long_prompt_is_not_a_decode(llama_folder):
    """With one token of budget left, a waiting prompt's first chunk is one token: it must be computed at
    position 0 as a prompt chunk (it once went down the decode path: the prompt's last token at position 0,
    and a token sampled after it)."""
    llm = LLM(llama_folder, dtype="float32", block_size=16, max_num_batched_tokens=8, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=4)
    alone = llm.generate([list(range(100, 120))], params)[0].outputs[0].token_ids
    outs = llm.generate([[5]] * 7 + [list(range(100, 120))], params)
    assert outs[-1].outputs[0].token_ids == alone


# -- the server ------------------------------------------------------------------------------------

def test_echo_logprobs_max_tokens_0(llama_server, llama_hf):
    """What lm-evaluation-harness sends for loglikelihoods: a batch of token-id prompts, echo, logprobs,
    max_tokens 0; the prompt's tokens and logprobs come back, the first logprob null."""
    body = {"model": "tiny-llama", "prompt": PROMPTS, "echo": True, "logprobs": 1, "max_tokens": 0,
            "temperature": 0}
    r = post_json(llama_server.url, "/v1/completions", body)
    assert [c["index"] for c in r["choices"]] == list(range(len(PROMPTS)))
    for ids, choice in zip(PROMPTS, r["choices"]):
        lp = choice["logprobs"]
        assert choice["finish_reason"] == "length" and len(lp["tokens"]) == len(ids)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        ref = hf_logprobs(llama_hf, ids)
        want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert torch.allclose(torch.tensor(lp["token_logprobs"][1:]), want, atol=1e-4)
        for pos in range(1, len(ids)):  # the top-1 alternative and the token itself
            assert lp["tokens"][pos] in lp["top_logprobs"][pos]
            assert abs(max(lp["top_logprobs"][pos].values()) - ref[pos - 1].max().item()) < 1e-4
        assert lp["text_offset"][0] == 0 and choice["text"] == "".join(lp["tokens"])
    assert r["usage"] == {"prompt_tokens": sum(map(len, PROMPTS)), "completion_tokens": 0,
                          "total_tokens": sum(map(len, PROMPTS))}


def test_echo_logprobs_with_a_generated_token(llama_server, llama_hf):
    ids = PROMPTS[1]
    body = {"prompt": ids, "echo": True, "logprobs": 2, "max_tokens": 1, "temperature": 0}
    lp = post_json(llama_server.url, "/v1/completions", body)["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1
    ref = hf_logprobs(llama_hf, ids)
    assert abs(lp["token_logprobs"][-1] - ref[-1].max().item()) < 1e-4  # greedy: the top token
    streamed = _stream(llama_server.url, {**body, "stream": True})
    lps = [c["choices"][0]["logprobs"] for c in streamed if c["choices"][0]["logprobs"]]
    joined = sum((x["token_logprobs"] for x in lps), [])
    assert joined[0] is None and joined[1:] == pytest.approx(lp["token_logprobs"][1:], abs=1e-6)
    assert sum((x["tokens"] for x in lps), []) == lp["tokens"]


def test_vllm_prompt_logprobs_field(llama_server, llama_hf):
    ids = PROMPTS[2] + [46, 47]
    body = {"prompt": ids, "prompt_logprobs": 2, "max_tokens": 2, "temperature": 0}
    choice = post_json(llama_server.url, "/v1/completions", body)["choices"][0]
    scored = choice["prompt_logprobs"]
    ref = hf_logprobs(llama_hf, ids)
    assert scored[0] is None and len(scored) == len(ids)
    for pos in range(1, len(ids)):
        entry = scored[pos]
        mine = entry[str(ids[pos])]
        assert abs(mine["logprob"] - ref[pos - 1, ids[pos]].item()) < 1e-4
        assert ranks_near(ref[pos - 1], ref[pos - 1, ids[pos]].item(), mine["rank"])
        best = [e for e in entry.values() if e["rank"] == 1]
        assert len(best) == 1 and abs(best[0]["logprob"] - ref[pos - 1].max().item()) < 1e-4
        assert len(entry) in (2, 3)
    chat = post_json(llama_server.url, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 0, "max_tokens": 1})
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    streamed = _stream(llama_server.url, {**body, "stream": True})
    assert [c["choices"][0].get("prompt_logprobs") for c in streamed][0] == scored


def test_truncate_prompt_tokens(llama_server):
    ids = list(range(10, 40))
    body = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0, "truncate_prompt_tokens": 8}
    r = post_json(llama_server.url, "/v1/completions", body)
    assert r["usage"]["prompt_tokens"] == 8 and len(r["choices"][0]["logprobs"]["tokens"]) == 8


@pytest.mark.parametrize("body, param", [
    ({"prompt_logprobs": 21}, "prompt_logprobs"), ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"max_tokens": 0, "n": 2}, "n"), ({"max_tokens": -1}, "max_tokens"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens")])
def test_bad_scoring_requests(llama_server, body, param):
    req = urllib.request.Request(llama_server.url + "/v1/completions", data=json.dumps({"prompt": "hi", **body}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400
    assert json.loads(e.value.read())["error"]["param"] == param


def _stream(url: str, body: dict) -> list[dict]:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        lines = r.read().decode().split("\n\n")
    return [json.loads(x[6:]) for x in lines if x.startswith("data: {")]


def test_token_logprobs_kernel_against_float64():
    """The one-pass logprob and rank kernel on a full vocabulary: within 2e-5 of a float64 log_softmax (a
    single float32 running sum over 49k exponentials was off by 1e-4), ranks exact."""
    from scalellm import ops

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 49152, generator=g) * 3
    targets = torch.randint(0, 49152, (64,), generator=g)
    chosen, ranks = ops.token_logprobs(rows, targets)
    ref = torch.log_softmax(rows.double(), -1)
    want = ref.gather(1, targets[:, None])[:, 0]
    assert (chosen.double() - want).abs().max() < 2e-5
    assert torch.equal(ranks.long(), (rows > rows.gather(1, targets[:, None])).sum(1) + 1)
