"""The host's part of an engine step: what a synchronous step leaves a GPU idle for.

    .venv/bin/python bench/experiments/host_step.py [--concurrency 1,16,64] [--repeats 3]

One step ahead, the device computes step N+1 while the host reads step N's ids, appends and detokenizes
them and schedules and prepares the next step; a step that must wait for its ids on the host (a grammar
to advance, penalty counts, bad words) runs synchronously, and the device idles for that host work. This
measures it on the CPU path with a tiny model (hidden 256, 4 layers: bench/models.py's overhead model):
each decode step's wall time minus the time inside the model's forward pass, LM head and the sampling
and masking kernels, for plain greedy rows and for rows with a regex (whose masks the host fills every
step). Writes
bench/results/host_step.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/, above experiments/
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

from harness import write_table  # noqa: E402
from models import MODELS  # noqa: E402

import torch  # noqa: E402

from scalellm import ops  # noqa: E402
from scalellm.config import EngineConfig  # noqa: E402
from scalellm.engine.engine import LLMEngine  # noqa: E402
from scalellm.sampling_params import SamplingParams  # noqa: E402
from scalellm.structured import StructuredOutputsParams  # noqa: E402


def timed(engine: LLMEngine, params: SamplingParams, c: int, steps: int) -> list[float]:
    """Host milliseconds of each decode step (wall minus forward and sampling) for c running requests."""
    device_time = [0.0]
    model = engine.runner.model

    def clocked(f):
        def run(*a, **k):
            start = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                device_time[0] += time.perf_counter() - start
        return run
    device_ops = {name: getattr(ops, name) for name in ("greedy_tokens", "fused_sample", "apply_token_bitmask")}
    forward, logits = model.forward, model.logits
    model.forward, model.logits = clocked(forward), clocked(logits)
    for name, f in device_ops.items():
        setattr(ops, name, clocked(f))
    try:
        for i in range(c):
            engine.add_request(f"r{i}", [5 + i % 50, 6, 7, 8], params)
        engine.step()  # the prefills
        out = []
        for _ in range(steps):
            device_time[0] = 0.0
            start = time.perf_counter()
            engine.step()
            out.append(1000 * (time.perf_counter() - start - device_time[0]))
        for i in range(c):
            engine.abort_request(f"r{i}")
        while engine.has_unfinished():
            engine.step()
        return out
    finally:
        model.forward, model.logits = forward, logits
        for name, f in device_ops.items():
            setattr(ops, name, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    folder = MODELS["tiny-llama"]()
    engine = LLMEngine(EngineConfig(model=folder, dtype="float32", max_num_seqs=256))
    kinds = {"greedy": SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True),
             "regex": SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True,
                                     structured_outputs=StructuredOutputsParams(regex="[a-z ]{1,3000}"))}
    rows = []
    for c in [int(x) for x in args.concurrency.split(",")]:
        for kind, params in kinds.items():
            medians = [statistics.median(timed(engine, params, c, args.steps)) for _ in range(args.repeats)]
            rows.append((c, kind, min(medians), max(medians)))
            print(f"c={c:<3} {kind:<6} host ms/step {min(medians):.3f}-{max(medians):.3f}", flush=True)
    lines = ["# The host's part of a decode step", "",
             "What a synchronous step leaves a GPU idle for (one step ahead hides it): each decode step's wall "
             "time minus the model's forward pass, LM head and sampling and masking kernels, CPU path, the tiny overhead model "
             f"(`bench/experiments/host_step.py`, {args.steps} steps, median per repeat, {args.repeats} repeats: lowest-highest).",
             "", f"CPU: {os.cpu_count()} cores, {torch.get_num_threads()} compute threads.",
             "", "| running requests | rows | host ms per step |", "|---:|---|---:|"]
    lines += [f"| {c} | {kind} | {lo:.3f}-{hi:.3f} |" for c, kind, lo, hi in rows]
    write_table("host_step", lines)


if __name__ == "__main__":
    main()
