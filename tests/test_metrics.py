"""/metrics values: after known requests, counters and histogram counts move by exactly what they served."""
import json
import random
import time
import urllib.request

from tests.server_utils import post_json, scrape, single_token_id, wait_idle

MODEL = "tiny-llama"
HISTOGRAMS = ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds")
STAGES = ("parse", "tokenize", "queue", "prefill", "decode", "detokenize", "write")


def change(before: dict, after: dict, key: str) -> float:
    """How much a sample moved; it must exist by now (a labelled one may be new since `before`)."""
    return after[key] - before.get(key, 0.0)


def streamed_usage(url: str, body: dict) -> dict:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        frames = [line[6:] for line in r.read().split(b"\n") if line.startswith(b"data: {")]
    return json.loads(frames[-1])["usage"]


def test_metric_families_and_types(llama_server):
    from prometheus_client.parser import text_string_to_metric_families

    post_json(llama_server.url, "/v1/completions", {"model": MODEL, "prompt": "metrics", "max_tokens": 2})
    with urllib.request.urlopen(llama_server.url + "/metrics") as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        types = {f.name: f.type for f in text_string_to_metric_families(r.read().decode())}
    expected = {"num_requests_running": "gauge", "num_requests_waiting": "gauge", "kv_cache_usage_perc": "gauge",
                "prefix_cache_queries": "counter", "prefix_cache_hits": "counter", "num_preemptions": "counter",
                "prompt_tokens": "counter", "generation_tokens": "counter", "requests": "counter",
                "request_success": "counter",
                "request_stage_seconds": "counter", "stage_requests": "counter", "engine_steps": "counter",
                "engine_step_forward_seconds": "counter", "engine_step_served_seconds": "counter",
                **{name: "histogram" for name in HISTOGRAMS}}
    for name, kind in expected.items():
        assert types.get("scalellm:" + name) == kind, name
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):  # vLLM's names too
        assert types.get("vllm:" + name) == "gauge", name


def test_counters_and_histograms_move_by_known_amounts(llama_server):
    url = llama_server.url
    greedy = post_json(url, "/v1/completions", {"model": MODEL, "prompt": "Once", "max_tokens": 1, "temperature": 0,
                                                "logprobs": 0})
    first = single_token_id(url, greedy["choices"][0]["logprobs"]["tokens"][0])
    ids = post_json(url, "/tokenize", {"prompt": "The quick brown fox jumps"})["tokens"]
    base = {"model": MODEL, "ignore_eos": True, "temperature": 0}
    # (body, choices, finish reason of every choice)
    plan = [({**base, "prompt": ids, "max_tokens": 5}, 1, "length"),
            ({**base, "prompt": [ids, ids[:2]], "max_tokens": 3}, 2, "length"),
            ({**base, "prompt": "Once", "max_tokens": 3, "n": 2, "temperature": 1.0, "seed": 1}, 2, "length"),
            ({**base, "prompt": "Once", "max_tokens": 6, "stop_token_ids": [first], "ignore_eos": False}, 1, "stop")]
    before = wait_idle(url)
    start = time.monotonic()
    usages = []
    for body, choices, finish in plan:
        out = post_json(url, "/v1/completions", body)
        assert [c["finish_reason"] for c in out["choices"]] == [finish] * choices
        usages.append(out["usage"])
    usages.append(streamed_usage(url, {**base, "prompt": "Streamed", "max_tokens": 4}))
    elapsed = time.monotonic() - start
    after = wait_idle(url)

    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    generated = sum(u["completion_tokens"] for u in usages)
    assert generated == 5 + 2 * 3 + 2 * 3 + 1 + 4
    choices = sum(c for _, c, _ in plan) + 1
    requests = len(plan) + 1
    assert change(before, after, "scalellm:prompt_tokens_total") == prompt_tokens
    assert change(before, after, "scalellm:generation_tokens_total") == generated
    assert change(before, after, 'scalellm:request_success_total{finished_reason="length"}') == choices - 1
    assert change(before, after, 'scalellm:request_success_total{finished_reason="stop"}') == 1
    assert change(before, after, 'scalellm:requests_total{outcome="finished",status="200"}') == requests
    aborts = 'scalellm:request_success_total{finished_reason="abort"}'
    assert after.get(aborts, 0) == before.get(aborts, 0)
    # one first token per choice, one gap per later token, one end-to-end time per HTTP request
    assert change(before, after, "scalellm:time_to_first_token_seconds_count") == choices
    assert change(before, after, "scalellm:request_queue_time_seconds_count") == choices
    assert change(before, after, "scalellm:inter_token_latency_seconds_count") == generated - choices
    assert change(before, after, "scalellm:e2e_request_latency_seconds_count") == requests
    assert 0 < change(before, after, "scalellm:e2e_request_latency_seconds_sum") <= elapsed
    assert change(before, after, "scalellm:stage_requests_total") == requests
    for stage in STAGES:
        moved = change(before, after, f'scalellm:request_stage_seconds_total{{stage="{stage}"}}')
        assert 0 <= moved <= elapsed, stage
        if stage not in ("queue", "write"):
            assert moved > 0, stage
    assert change(before, after, 'scalellm:request_stage_seconds_total{stage="write"}') > 0  # the stream wrote
    # the requests ran one after another: a step per token of each (the first from the prompt's step),
    # and a step as served contains its forward pass
    steps = change(before, after, "scalellm:engine_steps_total")
    forward = change(before, after, "scalellm:engine_step_forward_seconds_total")
    served = change(before, after, "scalellm:engine_step_served_seconds_total")
    assert steps == 5 + 3 + 3 + 1 + 4
    assert 0 < forward <= served <= elapsed
    for name in HISTOGRAMS:
        buckets = sorted((float(k.split('le="')[1].split('"')[0]), v) for k, v in after.items()
                         if k.startswith(f"scalellm:{name}_bucket"))
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and buckets[-1][0] == float("inf")
        assert counts[-1] == after[f"scalellm:{name}_count"]


def test_prefix_cache_counters(llama_server):
    url = llama_server.url
    prompt = random.Random(1234).sample(range(1000, 40000), 40)  # 2 full blocks of 16 and 8 more tokens
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
    before = wait_idle(url)
    post_json(url, "/v1/completions", body)
    middle = wait_idle(url)
    post_json(url, "/v1/completions", body)
    after = wait_idle(url)
    assert change(before, middle, "scalellm:prefix_cache_queries_total") == 40
    assert change(before, middle, "scalellm:prefix_cache_hits_total") == 0
    assert change(middle, after, "scalellm:prefix_cache_queries_total") == 40
    assert change(middle, after, "scalellm:prefix_cache_hits_total") == 32  # the full blocks
    assert after["scalellm:num_requests_running"] == after["scalellm:kv_cache_usage_perc"] == 0
    assert scrape(url)["scalellm:num_requests_waiting"] == 0
