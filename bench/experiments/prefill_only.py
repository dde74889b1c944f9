"""Prefill-only requests against a one-token generation of the same prompt, on one server.

    .venv/bin/python bench/experiments/prefill_only.py [--requests 20] [--prompt-len 256]

Sends, one at a time and interleaved (each round a fresh random prompt per kind, so the prefix cache
serves none of them): a plain one-token completion; `max_tokens: 0`; scoring as lm-evaluation-harness
asks (`echo`, `logprobs: 1`, `max_tokens: 1`) and with `max_tokens: 0`; vLLM's `prompt_logprobs: 1`;
and an embedding. Reports each kind's median end-to-end latency and its ratio to the one-token
generation, to bench/results/prefill_only.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import urllib.request

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/, above experiments/
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, ROOT)

from models import smollm2_bf16  # noqa: E402
from harness import Proc, scalellm_cmd, write_table  # noqa: E402

KINDS = {
    "generate 1 token": ("/v1/completions", {"max_tokens": 1}),
    "max_tokens 0": ("/v1/completions", {"max_tokens": 0}),
    "echo + logprobs, max_tokens 1 (lm_eval)": ("/v1/completions", {"max_tokens": 1, "echo": True, "logprobs": 1}),
    "echo + logprobs, max_tokens 0": ("/v1/completions", {"max_tokens": 0, "echo": True, "logprobs": 1}),
    "prompt_logprobs 1, max_tokens 0": ("/v1/completions", {"max_tokens": 0, "prompt_logprobs": 1}),
    "embedding": ("/v1/embeddings", {}),
}


def post(url: str, path: str, body: dict) -> float:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20, help="requests per kind")
    ap.add_argument("--prompt-len", type=int, default=256)
    args = ap.parse_args()
    folder = smollm2_bf16()
    rng = random.Random(0)
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    p = Proc("prefill-only", scalellm_cmd(folder, 2))
    try:
        for i in range(args.requests + 2):  # the first two rounds warm up
            for kind, (path, fields) in KINDS.items():
                ids = [rng.randrange(100, 40000) for _ in range(args.prompt_len)]
                body = {"input": ids} if path == "/v1/embeddings" else {"prompt": ids, "temperature": 0, **fields}
                seconds = post(p.url, path, body)
                if i >= 2:
                    times[kind].append(seconds)
    finally:
        p.stop()
    base = statistics.median(times["generate 1 token"])
    lines = ["# Prefill-only requests vs a one-token generation", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}; SmolLM2-135M-Instruct bf16, {args.prompt_len}-token random prompts, "
             f"{args.requests} requests per kind, one at a time, interleaved. Command: "
             f"`.venv/bin/python bench/experiments/prefill_only.py --requests {args.requests} --prompt-len {args.prompt_len}`.", "",
             "| request | median ms | p90 ms | vs generate 1 token |", "| --- | ---: | ---: | ---: |"]
    for kind, ts in times.items():
        ts = sorted(ts)
        med = statistics.median(ts)
        lines.append(f"| {kind} | {1000 * med:.1f} | {1000 * ts[int(0.9 * (len(ts) - 1))]:.1f} | {med / base:.2f}x |")
    write_table("prefill_only", lines, show=True)


if __name__ == "__main__":
    main()
