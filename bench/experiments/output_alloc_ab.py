"""Kernel outputs made from numpy arrays they remember (numba_util.new_tensor) vs plain torch.empty.

    .venv/bin/python bench/experiments/output_alloc_ab.py [--rounds 5]

One process per model and batch: greedy decoding of 64 tokens after a 128-token prompt, the two ways of
allocating the CPU kernels' outputs alternated every round (the kernels and everything else the same);
each round's number is its median decode step. With torch.empty, every kernel that reads a fresh
tensor converts it to a numpy view first, a cost paid per call; with new_tensor the view comes with the
tensor. Writes bench/results/output_alloc_ab.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/, above experiments/
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [BENCH, ROOT]

GGUF = os.path.join(BENCH, ".cache", "gguf")
CASES = [("smollm2-135m bf16", lambda m: m["smollm2-135m"](), 1),
         ("smollm2-135m Q8_0 GGUF", lambda m: os.path.join(GGUF, "smollm2-135m-instruct-q8_0.gguf"), 1),
         ("smollm2-135m Q4_0 GGUF", lambda m: os.path.join(GGUF, "smollm2-135m-instruct-q4_0.gguf"), 1),
         ("tiny-llama bf16", lambda m: m["tiny-llama"](), 1),
         ("smollm2-135m bf16", lambda m: m["smollm2-135m"](), 64),
         ("tiny-llama bf16", lambda m: m["tiny-llama"](), 64)]


def run_case(model: str, batch: int, rounds: int) -> dict[str, list[float]]:
    import torch

    import scalellm.ops as ops
    from scalellm import LLM, SamplingParams
    from scalellm.ops import linear
    from scalellm.ops.cpu import kernels as cpu_kernels
    from scalellm.ops.cpu import numba_util
    from scalellm.ops.quant import linear as quant_linear

    modules = (ops, cpu_kernels, linear, quant_linear)
    ways = {"torch.empty": lambda shape, dtype: torch.empty(shape, dtype=dtype), "new_tensor": numba_util.new_tensor}
    llm = LLM(model=model, dtype="bfloat16")
    engine, step, times = llm.engine, llm.engine.step, []

    def timed_step():
        start = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - start)
        return out
    engine.step = timed_step
    params = SamplingParams(max_tokens=65, temperature=0, ignore_eos=True)
    prompts = [list(range(100 + i, 228 + i)) for i in range(batch)]
    out: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for r in range(2 * rounds + 2):
            name = list(ways)[r % 2]
            for m in modules:
                m.new_tensor = ways[name]
            times.clear()
            llm.generate(prompts, params)
            if r >= 2:  # the first two warm up
                out[name].append(statistics.median(times[-64:]) * 1e3)
    finally:
        for m in modules:
            m.new_tensor = numba_util.new_tensor
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--case", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from harness import write_table
    from models import MODELS

    if args.case is not None:
        label, model, batch = CASES[args.case]
        print(repr(run_case(model(MODELS), batch, args.rounds)))
        return
    import ast
    import subprocess

    lines = ["# CPU kernels' outputs: torch.empty vs numpy arrays they remember", "",
             f"Median decode step (ms) per round, {args.rounds} rounds per way alternated in one process per "
             "row; bfloat16 activations; `python bench/experiments/output_alloc_ab.py`.", "",
             "| model | batch | torch.empty | new_tensor | ratio of medians |", "|---|---:|---|---|---:|"]
    for i, (label, _, batch) in enumerate(CASES):
        res = subprocess.run([sys.executable, __file__, "--case", str(i), "--rounds", str(args.rounds)],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        got = ast.literal_eval(res)
        a, b = got["torch.empty"], got["new_tensor"]
        lines.append(f"| {label} | {batch} | {' '.join(f'{x:.2f}' for x in a)} | {' '.join(f'{x:.2f}' for x in b)} | "
                     f"{statistics.median(b) / statistics.median(a):.3f} |")
        print(lines[-1], flush=True)
    write_table("output_alloc_ab", lines)


if __name__ == "__main__":
    main()
