"""Multi-LoRA serving throughput: SmolLM2-135M (bf16) alone against the same model serving four LoRA
adapters at once, requests spread over them in turn, with each of the two kernels (ops/lora.py).

    .venv/bin/python bench/lora.py [--repeats 3] [--concurrency 16] [--rank 8]

Each repeat runs, one after another: the base server without LoRA, then the server with
--enable-lora --max-loras 4 and `--lora-kernel batched`, then `grouped` (interleaved, so the
machine's drift hits every configuration alike). tools/loadgen drives each at the given concurrency
(128 tokens in, 128 out). The adapters are PEFT adapters on all seven projections with random
non-zero weights (bench/.cache/loras). Results: bench/results/lora.md, .png, .json.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, ROOT)

from models import CACHE, smollm2_bf16  # noqa: E402
from harness import Proc, loadgen, scalellm_cmd, write_table  # noqa: E402

ADAPTERS = 4
CONFIGS = ("base", "lora-batched", "lora-grouped")


def build_adapters(folder: str, rank: int) -> list[str]:
    from tests.checkpoints import build_lora_adapter

    paths = []
    for i in range(ADAPTERS):
        path = os.path.join(CACHE, "loras", f"smollm2-r{rank}-{i}")
        if not os.path.exists(os.path.join(path, "adapter_model.safetensors")):
            build_lora_adapter(folder, path, seed=i, rank=rank, alpha=2 * rank)
        paths.append(path)
    return paths


def run(config: str, folder: str, adapters: list[str], args) -> dict:
    flags = ["--num-threads", str(args.threads)] if args.threads else []
    models = "bench-model"
    if config != "base":
        flags += ["--enable-lora", "--max-loras", str(ADAPTERS), "--max-lora-rank", str(args.rank),
                  "--lora-kernel", config.split("-")[1], "--lora-modules",
                  *[f"lora{i}={p}" for i, p in enumerate(adapters)]]
        models = ",".join(f"lora{i}" for i in range(ADAPTERS))
    p = Proc(f"lora-{config}", scalellm_cmd(folder, 2, *flags))
    try:
        c = args.concurrency
        result = loadgen(p.url, folder, c, max(args.min_requests, c * args.waves), args, ("--model", models))
    finally:
        p.stop()
    print(f"  {config:<14} {result['output_throughput']:8.1f} tok/s  TPOT p50 {result['tpot_ms']['median']:7.2f} ms"
          f"  errors {result['errors']}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--waves", type=int, default=4, help="requests per run: concurrency x waves")
    ap.add_argument("--min-requests", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    folder = smollm2_bf16()
    adapters = build_adapters(folder, args.rank)
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    for rep in range(args.repeats):
        print(f"repeat {rep + 1}/{args.repeats}", flush=True)
        for config in CONFIGS:
            runs[config].append(run(config, folder, adapters, args))
    write(runs, args)


def write(runs: dict[str, list[dict]], args) -> None:
    tput = {c: [r["output_throughput"] for r in rs] for c, rs in runs.items()}
    base = statistics.median(tput["base"])
    flags = subprocess.run(["bash", "-c", "lscpu | grep -o 'avx512[a-z_0-9]*\\|amx[a-z_0-9]*' | sort -u | tr '\\n' ' '"],
                           capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    if subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--", "scalellm"]).returncode:
        commit += " with uncommitted changes"
    lines = [
        "# Multi-LoRA throughput: four adapters mixed against the base model alone", "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, commit {commit.strip().replace(chr(10), '')}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; CPU flags: {flags}.", "",
        f"SmolLM2-135M-Instruct in bfloat16 (the bundled GGUF dequantized), c={args.concurrency}, "
        f"{args.input_len} tokens in, {args.output_len} out, {args.repeats} interleaved repeats; four PEFT "
        f"adapters of rank {args.rank} on q/k/v/o/gate/up/down, requests sent to them in turn "
        f"(`--enable-lora --max-loras 4`). Command: `.venv/bin/python bench/lora.py --repeats {args.repeats} "
        f"--concurrency {args.concurrency} --rank {args.rank}`.", "",
        "| configuration | output tok/s (each repeat) | median | vs base | TPOT p50 ms (median) | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: |"]
    for c in CONFIGS:
        med = statistics.median(tput[c])
        tpot = statistics.median(r["tpot_ms"]["median"] for r in runs[c])
        errors = sum(sum(r["errors"].values()) if isinstance(r["errors"], dict) else r["errors"] for r in runs[c])
        lines.append(f"| {c} | {', '.join(f'{x:.1f}' for x in tput[c])} | {med:.1f} | {med / base:.2f}x | "
                     f"{tpot:.2f} | {errors} |")
    lines += ["", "![throughput](lora.png)", ""]
    write_table("lora", "\n".join(lines), {"args": vars(args), "runs": runs}, lambda path: plot(tput, args, path),
                indent=1, show=True)


def plot(tput: dict[str, list[float]], args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = statistics.median(tput["base"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, c in enumerate(CONFIGS):
        ax.scatter([i] * len(tput[c]), tput[c], color="C0")
        ax.bar(i, statistics.median(tput[c]), alpha=0.4, color="C0")
    ax.axhline(0.8 * base, color="C3", linestyle="--", label="0.8x base (median)")
    ax.set_xticks(range(len(CONFIGS)), CONFIGS)
    ax.set_ylabel("output tok/s")
    ax.set_title(f"c={args.concurrency}: base alone vs 4 LoRA adapters mixed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
