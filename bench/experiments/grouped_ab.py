"""Q8_0 and Q4_0 weights held in groups of 16 rows (QuantizedTensor.grouped; a tied head too) vs in the
file's row order: bare decode steps of the same GGUF file, both models loaded in one process and
alternated.

    .venv/bin/python bench/experiments/grouped_ab.py [--rounds 6] [--models smollm2-135m-q8_0,smollm2-135m-q4_0]

Each round times 16 decode steps after a 128-token prompt at batch 1, 16 and 64 under each layout (the
order flips every round); the paired ratio per round is the number to read. Writes
bench/results/grouped_ab.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/, above experiments/
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]

from compute_floor import floor  # noqa: E402
from harness import write_table  # noqa: E402
from op_ab import model_path, paired_row  # noqa: E402

BATCHES = (1, 16, 64)


def load(path: str, grouped: bool):
    from scalellm import LLM
    from scalellm.ops.quant import linear as quant_linear

    quant_linear.GROUPED = grouped  # read when each projection is built
    try:
        llm = LLM(path, dtype="bfloat16", kv_cache_memory="1GiB")
    finally:
        quant_linear.GROUPED = True
    model = llm.engine.loaded.model
    groups = {getattr(p, "weight").group for p in model._projections() + [model.lm_head]
              if hasattr(getattr(p, "weight", None), "group")}
    return llm, groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m-q8_0,smollm2-135m-q4_0")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    lines = ["# Q8_0/Q4_0 grouped by 16 rows (B) against the file's row order (A)", "",
             f"{os.cpu_count()} cores, bfloat16 activations, {time.strftime('%Y-%m-%d')}. Command: `.venv/bin/python "
             f"bench/experiments/grouped_ab.py --models {args.models} --rounds {args.rounds}`. Bare decode steps (16 per cell "
             "after a 128-token prompt, median), both layouts loaded in one process, alternated, order flipped "
             "every round.", "",
             "| model | batch | A ms (median) | B ms (median) | B/A paired, median (min-max) | rounds B faster |",
             "|---|---:|---:|---:|---|---:|"]
    for name in args.models.split(","):
        path = model_path(name)
        (a, ga), (b, gb) = load(path, False), load(path, True)
        print(f"{name}: groups A {ga}, B {gb}", flush=True)
        llms = {"A": a, "B": b}
        for llm in llms.values():
            floor(llm, 2, 128, 4)
        times = {k: {n: [] for n in BATCHES} for k in llms}
        for r in range(args.rounds):
            for key in ("A", "B") if r % 2 == 0 else ("B", "A"):
                for n in BATCHES:
                    times[key][n].append(floor(llms[key], n, 128, 16)["tpot_ms"]["median"])
        for n in BATCHES:
            row = paired_row(name, n, times["A"][n], times["B"][n])
            print(row, flush=True)
            lines.append(row)
    write_table("grouped_ab", lines)


if __name__ == "__main__":
    main()
