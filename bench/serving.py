"""Side-by-side serving benchmark: ScaleLLM vs vLLM (CPU build) vs the floors, on loopback.

    .venv/bin/python bench/serving.py [--models smollm2-135m,tiny-llama] [--repeats 2]

For each model (see bench/models.py) and each repeat it runs, one after another: ScaleLLM's server,
vLLM's server under each thread-binding setting (at each concurrency the better one is the peer),
the HTTP floor (a bare aiohttp SSE server), our forward passes timed bare (bench/compute_floor.py)
and the machine floor (bench/machine_floor.py: the best measured GEMM rates and bandwidth turned
into the token rate a perfect server would reach). Each server is driven by tools/loadgen with the
same workload at concurrency 1, 16 and 64 (128 tokens in, 128 out), and charged the CPU time of its
whole process tree per generated token. vLLM's own client (`vllm bench serve`) cross-checks both
servers at concurrency 64. Results go to bench/results/serving_<model>.md, .png and .json.

A server setting is compared in the same run with `--variant LABEL="FLAGS"` (repeatable): each repeat also
serves ScaleLLM with those flags, reported as "ScaleLLM LABEL"; with `--tag T` the results go to
serving_<model>_T.* instead, and `--skip-floors` leaves the floors out, e.g.
    .venv/bin/python bench/serving.py --models smollm2-135m --skip-vllm --skip-floors --tag cap \
        --variant cap128="--mixed-prefill-tokens 128"
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, ROOT)

from harness import (LOGS, MAX_MODEL_LEN, NAME, PY, RESULTS, VLLM_PY, Proc, drive, ensure_vllm,  # noqa: E402
                     run_scalellm, scalellm_cmd, vllm_cmd, vllm_env)
from models import DEFAULT_KV_GIB, KV_CACHE_GIB, MODELS  # noqa: E402
from serving_report import write_report  # noqa: E402


def run_vllm(folder: str, bind: str, args, kv_gib: int = DEFAULT_KV_GIB) -> dict[int, dict]:
    p = Proc(f"vllm-{bind}", vllm_cmd(folder), env=vllm_env(bind, kv_gib), timeout=600)
    try:
        return drive(p, folder, args)
    finally:
        p.stop()


def run_http_floor(folder: str, args) -> dict[int, dict]:
    p = Proc("http-floor", [PY, os.path.join(BENCH, "bare_sse_server.py"), "--port", "{port}"])
    try:
        return drive(p, folder, args)
    finally:
        p.stop()


def run_machine_floor(folder: str, args) -> dict[int, dict]:
    out = os.path.join(LOGS, "machine_floor.json")
    subprocess.check_call([PY, os.path.join(BENCH, "machine_floor.py"), folder, "--concurrency",
                           ",".join(map(str, args.concurrency)), "--input-len", str(args.input_len),
                           "--output-len", str(args.output_len), "--json", out], cwd=ROOT)
    with open(out) as f:
        return {int(k): v for k, v in json.load(f)["workload"].items()}


def run_compute_floor(folder: str, args, kv_gib: int = DEFAULT_KV_GIB) -> dict[int, dict]:
    out = os.path.join(LOGS, "compute_floor.json")
    subprocess.check_call([PY, os.path.join(BENCH, "compute_floor.py"), folder, "--concurrency",
                           ",".join(map(str, args.concurrency)), "--input-len", str(args.input_len),
                           "--output-len", str(args.output_len), "--json", out,
                           "--kv-cache-memory", f"{kv_gib}GiB"], cwd=ROOT)
    with open(out) as f:
        return {int(k): v for k, v in json.load(f).items()}


_VLLM_BENCH = {"output_throughput": r"Output token throughput \(tok/s\):\s+([\d.]+)",
               "ttft_median_ms": r"Median TTFT \(ms\):\s+([\d.]+)", "tpot_median_ms": r"Median TPOT \(ms\):\s+([\d.]+)",
               "itl_median_ms": r"Median ITL \(ms\):\s+([\d.]+)", "e2e_median_ms": r"Median E2EL \(ms\):\s+([\d.]+)"}


def vllm_bench_serve(url: str, folder: str, concurrency: int, args) -> dict:
    cmd = [VLLM_PY, os.path.join(BENCH, "vllm_launcher.py"), "bench", "serve", "--backend", "openai",
           "--base-url", url, "--model", NAME, "--tokenizer", folder, "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--num-prompts", str(concurrency * args.waves), "--max-concurrency", str(concurrency), "--ignore-eos",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--disable-tqdm"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800).stdout
    found = {k: re.search(p, out) for k, p in _VLLM_BENCH.items()}
    return {k: float(m.group(1)) for k, m in found.items() if m}


def cross_check(folder: str, vllm_bind: str, args, kv_gib: int = DEFAULT_KV_GIB) -> dict[str, dict]:
    c = max(args.concurrency)
    results = {}
    p = Proc("scalellm-xcheck", scalellm_cmd(folder, kv_gib))
    try:
        results["ScaleLLM"] = vllm_bench_serve(p.url, folder, c, args)
    finally:
        p.stop()
    p = Proc("vllm-xcheck", vllm_cmd(folder), env=vllm_env(vllm_bind, kv_gib), timeout=600)
    try:
        results["vLLM"] = vllm_bench_serve(p.url, folder, c, args)
    finally:
        p.stop()
    return results


def bench_model(name: str, args, vllm_version: str) -> dict:
    folder = MODELS[name]()
    kv_gib = KV_CACHE_GIB.get(name, DEFAULT_KV_GIB)  # the same KV space for both servers
    data: dict = {"model": name, "folder": folder, "vllm_version": vllm_version, "repeats": [], "tag": args.tag,
                  "variants": {f"ScaleLLM {label}": shlex.join(flags) for label, flags in args.variant},
                  "config": {"input_len": args.input_len, "output_len": args.output_len,
                             "concurrency": args.concurrency, "max_model_len": MAX_MODEL_LEN}}
    for r in range(args.repeats):
        print(f"== {name}: repeat {r + 1}/{args.repeats}", flush=True)
        rep: dict = {}
        print("  ScaleLLM", flush=True)
        rep["ScaleLLM"] = run_scalellm(folder, args, kv_gib=kv_gib)
        for label, flags in args.variant:
            print(f"  ScaleLLM {label} ({shlex.join(flags)})", flush=True)
            rep[f"ScaleLLM {label}"] = run_scalellm(folder, args, tuple(flags), kv_gib=kv_gib)
        if not args.skip_vllm:
            vllm_runs = {}
            for bind in args.vllm_binds:
                print(f"  vLLM (thread binding: {bind})", flush=True)
                vllm_runs[bind] = run_vllm(folder, bind, args, kv_gib)
            # the peer at each concurrency is vLLM under the binding that did best there
            best = {c: max(vllm_runs, key=lambda b: vllm_runs[b][c]["output_throughput"]) for c in args.concurrency}
            rep["vLLM"] = {c: vllm_runs[best[c]][c] for c in args.concurrency}
            rep["vllm_all_binds"] = vllm_runs
            rep["vllm_bind"] = best
        if not args.skip_floors:
            print("  HTTP floor", flush=True)
            rep["HTTP floor"] = run_http_floor(folder, args)
            print("  bare forward", flush=True)
            rep["bare forward"] = run_compute_floor(folder, args, kv_gib)
            print("  machine floor", flush=True)
            rep["machine floor"] = run_machine_floor(folder, args)
        data["repeats"].append(rep)
    if not args.skip_vllm and not args.skip_cross_check:
        c = max(args.concurrency)
        print("  cross-check with vllm bench serve", flush=True)
        data["cross_check"] = cross_check(folder, data["repeats"][-1]["vllm_bind"][c], args, kv_gib)
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,tiny-llama")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--waves", type=int, default=2, help="requests per run = max(min-requests, waves x concurrency)")
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--vllm-binds", default="default,0-1", help="VLLM_CPU_OMP_THREADS_BIND settings to try")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-cross-check", action="store_true")
    ap.add_argument("--skip-floors", action="store_true", help="leave out the HTTP, bare-forward and machine floors")
    ap.add_argument("--variant", action="append", default=[], metavar='LABEL="FLAGS"',
                    help="also serve ScaleLLM with these server flags in every repeat (repeatable)")
    ap.add_argument("--tag", default=None, help="write serving_<model>_TAG.* (keeps the main tables)")
    args = ap.parse_args()
    args.variant = [(v.split("=", 1)[0], shlex.split(v.split("=", 1)[1] if "=" in v else "")) for v in args.variant]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.vllm_binds = args.vllm_binds.split(",")
    vllm_version = "not run" if args.skip_vllm else ensure_vllm()
    for name in args.models.split(","):
        data = bench_model(name, args, vllm_version)
        path = write_report(data, RESULTS)
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
