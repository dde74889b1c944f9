"""Greedy agreement in bfloat16 with transformers in bfloat16: where each prompt's tokens first differ.

The float32 tests pin token identity; bfloat16 runs round at different points in each implementation
(fused kernels, dot products, summation order), so greedy paths part at near-ties. This reports, over a
prompt set, the first output position where our tokens differ from transformers' (none: identical over
all max_tokens), for each variant of one boolean flag in scalellm.ops (A False, B True).

    .venv/bin/python bench/bf16_agreement.py [--flag cpu_attention.USE_DOT] [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

from models import smollm2_bf16  # noqa: E402
from scalellm import LLM, SamplingParams  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three laws of thermodynamics are", "import numpy as np\n", "A haiku about autumn:\n",
           "Water boils at", "The quick brown fox", "In 1969, the first humans", "To make a cup of tea, first",
           "SELECT name FROM users WHERE", "The mitochondria is", "My favourite programming language is",
           "1, 1, 2, 3, 5, 8,", "Dear Sir or Madam,", "The best way to learn a language is"]


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flag", default="cpu_attention.USE_DOT")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(BENCH, "results", "bf16_agreement.md"))
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_bf16()
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    theirs = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = hf.generate(ids, max_new_tokens=args.max_tokens, do_sample=False, min_new_tokens=args.max_tokens)
        theirs.append(out[0, ids.shape[1]:].tolist())
    module_name, attr = args.flag.rsplit(".", 1)
    module = importlib.import_module(f"scalellm.ops.{module_name}")
    llm = LLM(folder, dtype="bfloat16", kv_cache_memory="1GiB")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    rows = {}
    for flag in (False, True):
        setattr(module, attr, flag)
        ours = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
        rows[flag] = [first_difference(list(a), b) for a, b in zip(ours, theirs)]
        print(f"  {args.flag}={flag}: first differences {rows[flag]}", flush=True)
    write(args, rows)


def write(args, rows) -> None:
    lines = ["# Greedy agreement with transformers, both in bfloat16 (SmolLM2-135M)", "",
             f"{time.strftime('%Y-%m-%d')}; command: `.venv/bin/python bench/bf16_agreement.py --flag {args.flag} "
             f"--max-tokens {args.max_tokens}`. Each cell: the first output position (0-based) where our greedy "
             f"tokens differ from transformers' bfloat16 generate(); '=' where all {args.max_tokens} agree. "
             f"Variant A: `{args.flag} = False`, B: `True`. In float32 the tests require identity.", "",
             "| prompt | A | B |", "|---|---:|---:|"]
    for i, prompt in enumerate(PROMPTS):
        cells = ["=" if rows[f][i] is None else str(rows[f][i]) for f in (False, True)]
        lines.append(f"| {prompt!r} | {cells[0]} | {cells[1]} |".replace("\n", "\\n"))
    for f in (False, True):
        same = sum(r is None for r in rows[f])
        firsts = [args.max_tokens if r is None else r for r in rows[f]]
        lines.append(f"\n{'B' if f else 'A'}: {same} of {len(PROMPTS)} prompts identical over {args.max_tokens} "
                     f"tokens; median first difference {statistics.median(firsts)}.")
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
