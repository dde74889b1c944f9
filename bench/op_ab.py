"""A paired A/B of one forward op: two implementations alternated in one process, bare decode steps.

    .venv/bin/python bench/op_ab.py --op silu_mul --a torch_ops --b cpu_kernels [--models smollm2-135m] [--rounds 8]

Each round times the decode step at batch 1, 16 and 64 under A and under B (the order flips every
round), so the machine's drift hits both alike; the paired ratio B/A per round is the number to read.
Writes bench/results/op_ab_<op>.md.
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]

from compute_floor import floor  # noqa: E402
from models import MODELS  # noqa: E402

BATCHES = (1, 16, 64)


def run(name: str, op: str, impls: dict, rounds: int) -> dict:
    from scalellm import LLM, ops

    llm = LLM(MODELS[name](), dtype="bfloat16", kv_cache_memory="1GiB")
    floor(llm, 2, 128, 4)
    times = {k: {b: [] for b in BATCHES} for k in impls}
    current = getattr(ops, op)
    try:
        for r in range(rounds):
            for label in (list(impls) if r % 2 == 0 else list(reversed(impls))):
                setattr(ops, op, impls[label])
                for b in BATCHES:
                    times[label][b].append(floor(llm, b, 128, 16)["tpot_ms"]["median"])
    finally:
        setattr(ops, op, current)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", required=True, help="a name in scalellm.ops the model calls")
    ap.add_argument("--a", required=True, help="module in scalellm.ops holding implementation A")
    ap.add_argument("--b", required=True, help="module in scalellm.ops holding implementation B")
    ap.add_argument("--models", default="smollm2-135m,tiny-llama")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    impls = {m: getattr(importlib.import_module(f"scalellm.ops.{m}"), args.op) for m in (args.a, args.b)}
    a, b = args.a, args.b
    L = [f"# Paired A/B: `{args.op}` from `{a}` (A) against `{b}` (B)", "",
         f"{os.cpu_count()} cores, bfloat16, {time.strftime('%Y-%m-%d')}. Command: `.venv/bin/python bench/op_ab.py "
         f"--op {args.op} --a {a} --b {b} --models {args.models} --rounds {args.rounds}`. Bare decode steps "
         f"(16 per cell, median), A and B alternated in one process, order flipped every round.", "",
         "| model | batch | A ms (median) | B ms (median) | B/A paired, median (min-max) | rounds B faster |",
         "|---|---:|---:|---:|---|---:|"]
    for name in args.models.split(","):
        times = run(name, args.op, impls, args.rounds)
        for batch in BATCHES:
            ta, tb = times[a][batch], times[b][batch]
            ratios = [y / x for x, y in zip(ta, tb)]
            row = (f"| {name} | {batch} | {statistics.median(ta):.2f} | {statistics.median(tb):.2f} | "
                   f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) | "
                   f"{sum(r < 1 for r in ratios)}/{len(ratios)} |")
            print(row, flush=True)
            L.append(row)
    path = os.path.join(BENCH, "results", f"op_ab_{args.op}.md")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
