"""The quantized GEMM at one activation row (decoding at concurrency 1), per format and SmolLM2's shapes.

    .venv/bin/python bench/experiments/quant_gemm.py [--before PATH] [--rounds 3]

Times QuantizedLinear calls (the whole call: activation quantization included) two ways: hot (one
weight called again and again: it stays in the CPU caches) and cold (40 copies of the weight called in
turn, as a decode step meets each layer's weight once: read from memory). With --before (another
checkout of the project, e.g. a `git worktree` of an earlier commit), that tree and this one are timed
in alternating subprocesses, --rounds times each, and the table gives both; else this tree alone.
Writes bench/results/quant_gemm.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/, above experiments/
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)  # not ROOT: --measure puts the tree it times first

from harness import write_table  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]  # qkv, o, gate_up, down, LM head
FORMATS = ["q8_0", "q4_0", "q4_1"]
COPIES = 40


def measure(tree: str) -> dict:
    """Median microseconds per call, hot and cold, for each format and shape, with `tree`'s scalellm."""
    sys.path.insert(0, tree)
    import torch

    from scalellm.engine.engine import set_compute_threads
    from scalellm.ops.quant import linear as quant_linear
    from scalellm.ops.quant.tensor import QuantizedTensor

    set_compute_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    out = {}
    for fmt in FORMATS:
        for n, k in SHAPES:
            copies = COPIES if n * k < 10_000_000 else 4  # the LM head is cold on its own (30-60 MB)
            lins = [quant_linear.QuantizedLinear(QuantizedTensor.quantize(torch.randn(n, k) * 0.02, fmt))
                    for _ in range(copies)]
            x = torch.randn(1, k).bfloat16()
            for lin in lins:
                lin(x)
            cold, hot = [], []
            for _ in range(20):
                t = time.perf_counter()
                for lin in lins:
                    lin(x)
                cold.append((time.perf_counter() - t) / copies)
                t = time.perf_counter()
                for _ in range(copies):
                    lins[0](x)
                hot.append((time.perf_counter() - t) / copies)
            out[f"{fmt} {n}x{k}"] = {"hot": statistics.median(hot) * 1e6, "cold": statistics.median(cold) * 1e6,
                                     "bytes": lins[0].weight.nbytes}
    return out


def run_tree(tree: str) -> dict:
    cmd = [sys.executable, __file__, "--measure", tree]
    return json.loads(subprocess.check_output(cmd, cwd=tree, stderr=subprocess.DEVNULL).decode().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", help="another checkout to time against this one")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    trees = {"before": args.before, "after": ROOT} if args.before else {"this tree": ROOT}
    runs = {label: [] for label in trees}
    for r in range(args.rounds):
        for label in (list(trees) if r % 2 == 0 else list(reversed(trees))):
            runs[label].append(run_tree(trees[label]))
            print(label, "round", r + 1, "done", flush=True)
    keys = list(runs[next(iter(runs))][0])
    cols = [f"{label} {kind}" for kind in ("hot", "cold") for label in trees]
    lines = ["# Quantized GEMM at one activation row", "",
             f"QuantizedLinear at SmolLM2-135M's shapes, {len(os.sched_getaffinity(0))} threads, bfloat16 "
             f"activations; median microseconds per call over 20 x {COPIES} calls, then the median of "
             f"{args.rounds} alternating runs per tree. Hot: one weight called again and again; cold: "
             f"{COPIES} copies in turn (the LM head: 4), read from memory. `python bench/experiments/quant_gemm.py"
             + (" --before <earlier checkout>`" if args.before else "`"), "",
             "| format, shape (out x in) | KiB | " + " | ".join(cols) + " | cold GB/s |",
             "|---|---:|" + "---:|" * (len(cols) + 1)]
    for key in keys:
        cells, cold_us = [], None
        for kind in ("hot", "cold"):
            for label in trees:
                us = statistics.median(run[key][kind] for run in runs[label])
                cells.append(f"{us:.1f}")
                cold_us = us if kind == "cold" else cold_us
        size = runs[next(iter(trees))][0][key]["bytes"]
        lines.append(f"| {key} | {size / 1024:.0f} | " + " | ".join(cells) + f" | {size / cold_us / 1e3:.1f} |")
    write_table("quant_gemm", lines, show=True)


if __name__ == "__main__":
    main()
