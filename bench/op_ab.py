"""A paired A/B of one forward op: two implementations alternated in one process, bare forward passes.

    .venv/bin/python bench/op_ab.py --op silu_mul --a torch_ops --b cpu_kernels [--models smollm2-135m] [--rounds 8]
    .venv/bin/python bench/op_ab.py --flag cpu_attention.USE_IR   (A: the flag False, B: True)
    .venv/bin/python bench/op_ab.py --flag cpu_attention.IR_PREFILL --phase prefill

Each round times the decode step at batch 1, 16 and 64 (or, with --phase prefill, the prefill of 1, 4
and 16 prompts in steps of up to 512 tokens) under A and under B (the order flips every round), so the
machine's drift hits both alike; the paired ratio B/A per round is the number to read.
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
from harness import write_table  # noqa: E402
from models import MODELS  # noqa: E402

BATCHES = {"decode": (1, 16, 64), "prefill": (1, 4, 16)}
GGUF = os.path.join(BENCH, ".cache", "gguf")  # bench/quantized.py's files: smollm2-135m-q8_0, -q4_0 name them


def model_path(name: str) -> str:
    if name in MODELS:
        return MODELS[name]()
    path = os.path.join(GGUF, f"smollm2-135m-instruct-{name.rsplit('-', 1)[-1]}.gguf")
    if not os.path.exists(path):
        raise SystemExit(f"{name}: not a model of bench/models.py, and {path} is missing (bench/quantized.py makes it)")
    return path


def run(name: str, target, attr: str, impls: dict, rounds: int, context: int, phase: str = "decode") -> dict:
    """Sets target.attr to each of impls' values in turn."""
    from scalellm import LLM

    llm = LLM(model_path(name), dtype="bfloat16", kv_cache_memory="1GiB")
    current = getattr(target, attr)
    for value in impls.values():  # compile and warm both
        setattr(target, attr, value)
        floor(llm, 2, 128, 4)
    times = {k: {b: [] for b in BATCHES[phase]} for k in impls}
    try:
        for r in range(rounds):
            for label in (list(impls) if r % 2 == 0 else list(reversed(impls))):
                setattr(target, attr, impls[label])
                for b in BATCHES[phase]:
                    if phase == "decode":
                        times[label][b].append(floor(llm, b, context, 16)["tpot_ms"]["median"])
                    else:
                        times[label][b].append(floor(llm, b, context, 1)["ttft_ms"]["median"])
    finally:
        setattr(target, attr, current)
    return times


def paired_row(name: str, batch: int, ta: list[float], tb: list[float]) -> str:
    """A table row of A's and B's times per round: medians, the paired ratio B/A, rounds B was faster."""
    ratios = [y / x for x, y in zip(ta, tb)]
    return (f"| {name} | {batch} | {statistics.median(ta):.2f} | {statistics.median(tb):.2f} | "
            f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) | "
            f"{sum(r < 1 for r in ratios)}/{len(ratios)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", help="a name in scalellm.ops the model calls")
    ap.add_argument("--a", help="module in scalellm.ops holding implementation A")
    ap.add_argument("--b", help="module in scalellm.ops holding implementation B")
    ap.add_argument("--flag", help="MODULE.NAME in scalellm.ops: a boolean, False for A and True for B")
    ap.add_argument("--models", default="smollm2-135m,tiny-llama",
                    help="names in bench/models.py, or smollm2-135m-q8_0 / -q4_0 (bench/quantized.py's GGUF files)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--context", type=int, default=128, help="prompt tokens (before the timed decode steps)")
    ap.add_argument("--phase", choices=("decode", "prefill"), default="decode")
    args = ap.parse_args()
    if not args.flag and not (args.op and args.a and args.b):
        ap.error("give --flag, or --op with --a and --b")
    if args.flag:
        module, attr = args.flag.rsplit(".", 1)
        target = importlib.import_module(f"scalellm.ops.{module}")
        a, b = f"{attr}=False", f"{attr}=True"
        impls, title, options, out = {a: False, b: True}, f"`{args.flag}` False (A) against True (B)", \
            f"--flag {args.flag}", attr.lower()
    else:
        import scalellm.ops as target
        attr, a, b = args.op, args.a, args.b
        impls = {m: getattr(importlib.import_module(f"scalellm.ops.{m}"), args.op) for m in (a, b)}
        title, options, out = f"`{args.op}` from `{a}` (A) against `{b}` (B)", f"--op {args.op} --a {a} --b {b}", \
            args.op
    timed = (f"Bare decode steps (16 per cell after a {args.context}-token prompt, median)" if args.phase == "decode"
             else f"Bare prefill of `batch` {args.context}-token prompts in steps of up to 512 tokens (one per cell)")
    if args.phase == "prefill":
        out += "_prefill"
    L = [f"# Paired A/B: {title}", "",
         f"{os.cpu_count()} cores, bfloat16, {time.strftime('%Y-%m-%d')}. Command: `.venv/bin/python bench/op_ab.py "
         f"{options} --models {args.models} --rounds {args.rounds} --context {args.context}"
         f"{' --phase prefill' if args.phase == 'prefill' else ''}`. {timed}, A and B alternated in one process, "
         f"order flipped every round.", "",
         "| model | batch | A ms (median) | B ms (median) | B/A paired, median (min-max) | rounds B faster |",
         "|---|---:|---:|---:|---|---:|"]
    for name in args.models.split(","):
        times = run(name, target, attr, impls, args.rounds, args.context, args.phase)
        for batch in BATCHES[args.phase]:
            row = paired_row(name, batch, times[a][batch], times[b][batch])
            print(row, flush=True)
            L.append(row)
    write_table(f"op_ab_{out}", L)


if __name__ == "__main__":
    main()
