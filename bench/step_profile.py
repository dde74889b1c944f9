"""Where a forward step's time goes: GEMMs, attention, and everything else, per step, bare (no server).

Times the model's decode step at batch 1, 16 and 64 (every row at the same context) and a prefill step of
four 128-token prompts, with each projection (qkv, o, gate_up, down, LM head: oneDNN or the small-batch
kernel, the prologue it takes included: RMSNorm before qkv/gate_up, SiLU-mul before down) and each
attention call timed on its own. The rest of the step (embedding, attention inputs: rotary and the KV
write, sampling, Python) is the remainder. Variants are one boolean flag in scalellm.ops (A: False, B:
True), interleaved over the repeats so drift hits both alike.

    .venv/bin/python bench/step_profile.py [--model smollm2-135m] [--flag cpu_attention.USE_DOT] [--repeats 3]
"""
from __future__ import annotations

import argparse
import collections
import importlib
import os
import platform
import statistics
import sys
import time

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

from models import MODELS  # noqa: E402
from serving_report import cpu_flags  # noqa: E402
from scalellm import LLM, ops  # noqa: E402
from scalellm.ops import linear  # noqa: E402

ROLES = ("qkv", "o_proj", "gate_up", "down")


class Timers:
    """Wraps the model's projections and attention so each call's time is added to its name."""

    def __init__(self, model):
        self.seconds = collections.defaultdict(float)
        for w in model.layers:
            for role in ROLES:
                self._wrap(getattr(w, role), role)
        self._wrap(model.lm_head, "lm_head")
        inner = ops.paged_attention

        def attention(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds["attention"] += time.perf_counter() - start
        ops.paged_attention = attention

    def _wrap(self, linear, name):
        call = type(linear).__call__
        seconds = self.seconds

        def timed(self_, *args, **kwargs):
            start = time.perf_counter()
            try:
                return call(self_, *args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start
        linear.__class__ = type(f"Timed{type(linear).__name__}", (type(linear),), {"__call__": timed})


def decode_steps(model, cache, bs, batch: int, context: int, steps: int):
    per_seq = -(-(context + steps + 1) // bs)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    tokens = torch.zeros(batch, dtype=torch.long)
    for p in range(context, context + steps):
        slots = [t[p // bs] * bs + p % bs for t in tables]
        meta = ops.build_attention_metadata(bs, slots, tables, [p + 1] * batch, [])
        hidden = model.forward(tokens, torch.full((batch,), p), cache, meta)
        tokens = ops.greedy_tokens(model.logits(hidden, float32=False))


def prefill_steps(model, cache, bs, prompts: int, length: int, steps: int):
    per_seq = -(-length // bs)
    for step in range(steps):
        ids, pos, slots, specs = [], [], [], []
        for j in range(prompts):
            table = list(range((step * prompts + j) * per_seq, (step * prompts + j + 1) * per_seq))
            specs.append((len(ids), length, length, table))
            ids += [100 + (j * 7 + i) % 3000 for i in range(length)]
            pos += range(length)
            slots += [table[p // bs] * bs + p % bs for p in range(length)]
        meta = ops.build_attention_metadata(bs, slots, [], [], specs)
        hidden = model.forward(torch.tensor(ids), torch.tensor(pos), cache, meta)
        ops.greedy_tokens(model.logits(hidden[[s[0] + length - 1 for s in specs]], float32=False))


def measure(llm, timers, shape: str, steps: int) -> dict:
    runner = llm.engine.runner
    model, cache, bs = runner.model, runner.kv_cache, llm.engine.block_manager.block_size
    run = (lambda n: prefill_steps(model, cache, bs, 4, 128, n)) if shape == "prefill 4x128" else \
        (lambda n: decode_steps(model, cache, bs, int(shape.split()[-1]), 192, n))
    run(2)
    timers.seconds.clear()
    start = time.perf_counter()
    run(steps)
    total = (time.perf_counter() - start) / steps
    parts = {k: v / steps for k, v in timers.seconds.items()}
    gemm = sum(parts.get(r, 0.0) for r in ROLES + ("lm_head",))
    return {"step": total, "gemm": gemm, "attention": parts.get("attention", 0.0),
            "rest": total - gemm - parts.get("attention", 0.0), **{r: parts.get(r, 0.0) for r in ROLES + ("lm_head",)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flag", default="cpu_attention.USE_DOT", help="MODULE.NAME in scalellm.ops (A False, B True)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(MODELS))
    ap.add_argument("--out", help="default: bench/results/step_profile.md for SmolLM2-135M, "
                    "step_profile_<model>.md for the others")
    args = ap.parse_args()
    name = "step_profile.md" if args.model == "smollm2-135m" else f"step_profile_{args.model}.md"
    args.out = args.out or os.path.join(BENCH, "results", name)
    module_name, attr = args.flag.rsplit(".", 1)
    module = importlib.import_module(f"scalellm.ops.{module_name}")
    linear.KEEP_PLAIN = True  # both small-batch kernels built, so linear.PANELS can be flipped between steps
    llm = LLM(MODELS[args.model](), dtype="bfloat16", kv_cache_memory="4GiB")
    timers = Timers(llm.engine.runner.model)
    shapes = ["decode batch 1", "decode batch 16", "decode batch 64", "prefill 4x128"]
    results = collections.defaultdict(list)
    for repeat in range(args.repeats):
        for flag in (False, True) if repeat % 2 == 0 else (True, False):
            setattr(module, attr, flag)
            for shape in shapes:
                r = measure(llm, timers, shape, 6 if shape.startswith("prefill") else 20)
                results[(shape, flag)].append(r)
                print(f"  {args.flag}={flag} {shape}: step {r['step'] * 1e3:.2f} ms, GEMMs {r['gemm'] * 1e3:.2f}, "
                      f"attention {r['attention'] * 1e3:.2f}, rest {r['rest'] * 1e3:.2f}", flush=True)
    write(args, shapes, results)


def write(args, shapes, results) -> None:
    lines = [f"# Forward step profile: GEMMs, attention and the rest ({args.model}, bfloat16)", "",
             f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
             f"CPU flags: {cpu_flags()}. Command: `.venv/bin/python bench/step_profile.py "
             f"--model {args.model} --flag {args.flag} --repeats {args.repeats}`. Decode steps at context 192 "
             f"(every row), prefill: four 128-token prompts in one step. Median of {args.repeats} interleaved "
             f"repeats (range in brackets), ms per step. GEMMs include their prologue (RMSNorm / SiLU-mul) and "
             f"residual epilogue; the rest is embedding, rotary and KV write, sampling and Python. "
             f"Variant A: `{args.flag} = False`, B: `True`.", "",
             "| step | variant | step ms | GEMMs ms | attention ms | rest ms | non-GEMM share |",
             "|---|---|---:|---:|---:|---:|---:|"]

    def cell(values):
        return f"{statistics.median(values) * 1e3:.2f} ({min(values) * 1e3:.2f}-{max(values) * 1e3:.2f})"
    for shape in shapes:
        for flag in (False, True):
            rs = results[(shape, flag)]
            share = statistics.median([1 - r["gemm"] / r["step"] for r in rs])
            lines.append(f"| {shape} | {'B' if flag else 'A'} | {cell([r['step'] for r in rs])} | "
                         f"{cell([r['gemm'] for r in rs])} | {cell([r['attention'] for r in rs])} | "
                         f"{cell([r['rest'] for r in rs])} | {share:.0%} |")
    lines += ["", "GEMM time by projection (variant B, median ms per step):", "",
              "| step | qkv | o_proj | gate_up | down | lm_head |", "|---|---:|---:|---:|---:|---:|"]
    for shape in shapes:
        rs = results[(shape, True)]
        lines.append(f"| {shape} | " + " | ".join(f"{statistics.median([r[k] for r in rs]) * 1e3:.2f}"
                                                   for k in ROLES + ("lm_head",)) + " |")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
