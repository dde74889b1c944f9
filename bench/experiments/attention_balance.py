"""CPU attention for one step's rows: split over the threads by row count vs by work.

    .venv/bin/python bench/experiments/attention_balance.py [--repeat 300]

A step's attention rows are its decodes (each over its whole context) and then its prefill tokens (each
over its causal context: a triangle of short to long rows). Before: the decodes and the prefill tokens
in two kernel calls, each call's rows cut into equal counts per thread. After (ops.paged_attention
today): one call over all the rows, cut into runs of equal work (cpu_attention.balanced_parts). Same
kernel, same rows, calls alternated; bfloat16 caches of 128-position blocks spread over a large cache.
Writes bench/results/attention_balance.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/, above experiments/
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]

from harness import write_table  # noqa: E402
from scalellm.engine.engine import set_compute_threads  # noqa: E402
from scalellm.ops.cpu import attention as cpu_attention  # noqa: E402
from scalellm.ops.cpu.numba_util import as_numba  # noqa: E402

SHAPES = {"tiny Llama (8/4 x 32)": (8, 4, 32), "SmolLM2-135M (9/3 x 64)": (9, 3, 64)}
# (decode contexts, prefill chunks as (query tokens, context after the chunk))
MIXES = {
    "64 decodes, ctx 129-256": (list(range(129, 257, 2)), []),
    "62 decodes + one 128-token prompt": (list(range(129, 253, 2)), [(128, 128)]),
    "16 decodes + four 128-token prompts": (list(range(129, 257, 8)), [(128, 128)] * 4),
    "one 128-token prompt": ([], [(128, 128)]),
    "a 128-token chunk after 384 cached": ([], [(128, 512)]),
}
BLOCK, CACHE_BLOCKS = 128, 2048


def rows_of(decodes, chunks):
    """Per row: (context length, sequence index); decode rows first."""
    rows = [(n, i) for i, n in enumerate(decodes)]
    for j, (q, ctx) in enumerate(chunks):
        rows += [(p + 1, len(decodes) + j) for p in range(ctx - q, ctx)]
    return rows


def count_parts(n: int, threads: int) -> np.ndarray:
    return np.array([n * t // threads for t in range(threads + 1)], np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=300)
    args = ap.parse_args()
    threads = len(os.sched_getaffinity(0))
    set_compute_threads(threads)
    rng = np.random.default_rng(0)
    lines = ["# CPU attention rows: split by count (two calls) vs by work (one call)", "",
             f"{threads} threads, bfloat16, {BLOCK}-position blocks; minimum (median) microseconds over "
             f"{args.repeat} alternated calls; `python bench/experiments/attention_balance.py`.", "",
             "| model shape | step's rows | by count, two calls | by work, one call | after / before |",
             "|---|---|---:|---:|---:|"]
    for shape_name, (heads, kv_heads, dim) in SHAPES.items():
        k = torch.randn(CACHE_BLOCKS, BLOCK, kv_heads, dim).bfloat16()
        v = torch.randn(CACHE_BLOCKS, BLOCK, kv_heads, dim).bfloat16()
        kn, vn = as_numba(k), as_numba(v)
        for mix_name, (decodes, chunks) in MIXES.items():
            rows = rows_of(decodes, chunks)
            n, nd = len(rows), len(decodes)
            seq_tables = rng.choice(CACHE_BLOCKS, (nd + len(chunks), 4), replace=False).astype(np.int32)
            tables = seq_tables[[s for _, s in rows]]
            lens = np.array([c for c, _ in rows], np.int32)
            starts = np.zeros(n, np.int32)
            q = torch.randn(n, heads, dim).bfloat16()
            qn, out = as_numba(q), as_numba(torch.empty_like(q))

            def before():
                for lo, hi in ((0, nd), (nd, n)):
                    if hi > lo:
                        cpu_attention.decode_attention(qn[lo:hi], kn, vn, tables[lo:hi], starts[lo:hi], lens[lo:hi],
                                                       0.1, out[lo:hi], count_parts(hi - lo, threads)
                                                       if hi - lo >= cpu_attention.PARALLEL_SEQS else None)

            def after():
                cpu_attention.decode_attention(qn, kn, vn, tables, starts, lens, 0.1, out,
                                               cpu_attention.row_parts(starts, lens))
            times = {before: [], after: []}
            for fn in (before, after) * 5:
                fn()
            for i in range(args.repeat):
                for fn in ((before, after) if i % 2 else (after, before)):
                    t = time.perf_counter()
                    fn()
                    times[fn].append(time.perf_counter() - t)
            b, a = (sorted(times[f]) for f in (before, after))
            cell = [f"{x[0] * 1e6:.0f} ({x[len(x) // 2] * 1e6:.0f})" for x in (b, a)]
            lines.append(f"| {shape_name} | {mix_name} | {cell[0]} | {cell[1]} | "
                         f"{a[len(a) // 2] / b[len(b) // 2]:.2f} |")
            print(lines[-1], flush=True)
    write_table("attention_balance", lines)


if __name__ == "__main__":
    main()
