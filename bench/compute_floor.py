"""The compute floor: the serving workload's forward passes timed bare (no server, no scheduler).

For each concurrency c: the c prompts are prefilled in steps of up to 512 tokens, then output_len - 1
batched decode steps run at batch c with the server's greedy op. Reports output tokens/s, the prefill time
(the best TTFT a server could give) and the decode step time (the best TPOT).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scalellm import LLM, ops  # noqa: E402


def floor(llm: LLM, c: int, input_len: int, output_len: int, budget: int = 512) -> dict:
    engine = llm.engine
    model, cache, bs = engine.runner.model, engine.runner.kv_cache, engine.block_manager.block_size
    rng = random.Random(c)
    prompts = [[rng.randrange(100, 4000) for _ in range(input_len)] for _ in range(c)]
    per_seq = -(-(input_len + output_len) // bs)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(c)]
    start = time.perf_counter()
    i = 0
    while i < c:  # prefill: whole prompts packed into steps of up to `budget` tokens
        group = list(range(i, min(c, i + max(1, budget // input_len))))
        ids, pos, slots, specs = [], [], [], []
        for j in group:
            specs.append((len(ids), input_len, input_len, tables[j]))
            ids += prompts[j]
            pos += range(input_len)
            slots += [tables[j][p // bs] * bs + p % bs for p in range(input_len)]
        meta = ops.build_attention_metadata(bs, slots, [], [], specs)
        hidden = model.forward(torch.tensor(ids), torch.tensor(pos), cache, meta)
        ops.greedy_tokens(model.logits(hidden[[s[0] + input_len - 1 for s in specs]], float32=False))
        i = group[-1] + 1
    prefill = time.perf_counter() - start
    tokens = torch.zeros(c, dtype=torch.long)
    step_start = time.perf_counter()
    for step in range(output_len - 1):
        p = input_len + step
        slots = [t[p // bs] * bs + p % bs for t in tables]
        meta = ops.build_attention_metadata(bs, slots, tables, [p + 1] * c, [])
        hidden = model.forward(tokens, torch.full((c,), p), cache, meta)
        tokens = ops.greedy_tokens(model.logits(hidden, float32=False))
    decode = time.perf_counter() - step_start
    total = prefill + decode
    step_ms = 1000 * decode / max(1, output_len - 1)
    return {"output_throughput": c * output_len / total, "request_throughput": c / total,
            "ttft_ms": {"median": 1000 * prefill, "p99": 1000 * prefill},
            "tpot_ms": {"median": step_ms, "p99": step_ms},
            "itl_ms": {"median": step_ms, "p99": step_ms},
            "e2e_ms": {"median": 1000 * total, "p99": 1000 * total}, "errors": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--json", required=True)
    ap.add_argument("--kv-cache-memory", default="1GiB")
    args = ap.parse_args()
    llm = LLM(args.model, dtype="bfloat16", kv_cache_memory=args.kv_cache_memory)
    floor(llm, 2, args.input_len, 8)  # warm-up (compiles the attention kernel)
    out = {}
    for c in (int(x) for x in args.concurrency.split(",")):
        out[c] = floor(llm, c, args.input_len, args.output_len)
        print(f"    c={c:<3} {out[c]['output_throughput']:8.1f} tok/s  prefill {out[c]['ttft_ms']['median']:8.1f} ms  "
              f"decode step {out[c]['tpot_ms']['median']:7.2f} ms", flush=True)
    with open(args.json, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
