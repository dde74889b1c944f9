"""The engine alone under a serving workload: a closed loop of requests driven straight into LLMEngine.

Keeps `concurrency` requests in flight (each a fresh random prompt of input_len tokens, output_len greedy
tokens, ignore_eos), adding one as each finishes, until `requests` have run: the steps a server runs,
prefill chunks mixed into the decodes, without the HTTP path or a load generator sharing the cores.
Run as a script it prints one JSON line, so commits can be compared in fresh processes:

    PYTHONPATH=<tree> .venv/bin/python bench/engine_loop.py <model folder> [--concurrency 64] [--requests 640]
"""
from __future__ import annotations

import argparse
import json
import random
import time


def closed_loop(engine, concurrency: int, requests: int, input_len: int, output_len: int, seed: int = 0) -> dict:
    from scalellm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    sent = 0

    def add() -> None:
        nonlocal sent
        prompt = [rng.randrange(100, vocab) for _ in range(input_len)]
        engine.add_request(f"loop-{seed}-{sent}", None, params, prompt_token_ids=prompt)
        sent += 1

    start = time.perf_counter()
    for _ in range(min(concurrency, requests)):
        add()
    steps = tokens = 0
    while engine.has_unfinished():
        for delta in engine.step():
            tokens += len(delta.token_ids)
            if delta.finish_reason is not None and sent < requests:
                add()
        steps += 1
    elapsed = time.perf_counter() - start
    return {"output_throughput": tokens / elapsed, "steps": steps, "step_ms": 1000 * elapsed / max(1, steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=640)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()
    from scalellm import LLM

    llm = LLM(args.model, dtype="bfloat16", max_model_len=1024)
    closed_loop(llm.engine, 4, 4, args.input_len, 8, seed=1)  # warm-up: compiles the kernels
    print(json.dumps(closed_loop(llm.engine, args.concurrency, args.requests, args.input_len, args.output_len)))


if __name__ == "__main__":
    main()
