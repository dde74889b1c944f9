"""The gateway's own cost on loopback: our Python gateway against sglang-router (Rust), in front of
fake replicas that stream canned SSE (bench/bare_sse_server.py), so the replicas cost almost nothing.

    .venv/bin/python bench/gateway.py [--concurrency 64,256] [--repeats 2]

For each setup (direct to one replica, through `python -m scalellm.gateway`, through sglang-router;
both gateways round-robin over two fake replicas) and each concurrency, tools/loadgen runs two
workloads: paced (64 frames, 10 ms apart: a decoding model; the added TTFT is the gateway's latency)
and flat out (256 frames with no pause: the most streams and tokens per second the path sustains).
Each gateway is charged the CPU seconds of its process per 1,000 requests. First use installs
`sglang-router` into .router-venv. Results: bench/results/gateway.{md,png,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

from harness import LOGS, PY, ROOT, Proc, free_port, run_loadgen, tree_cpu_seconds, write_table  # noqa: E402

ROUTER_VENV = os.path.join(ROOT, ".router-venv")
ROUTER_PY = os.path.join(ROUTER_VENV, "bin", "python")
WORKLOADS = {"paced": {"itl_ms": 10.0, "output_len": 64}, "flat out": {"itl_ms": 0.0, "output_len": 256}}


def ensure_router() -> str:
    if not os.path.exists(ROUTER_PY):
        subprocess.check_call([sys.executable, "-m", "venv", ROUTER_VENV])
        subprocess.check_call([ROUTER_PY, "-m", "pip", "install", "-q", "sglang-router"])
    out = subprocess.check_output([ROUTER_PY, "-c", "import importlib.metadata as m; print(m.version('sglang-router'))"])
    return out.decode().strip()


def loadgen(url: str, concurrency: int, num: int, output_len: int) -> dict:
    """Short text prompts (sglang-router accepts no token-id prompts), max_tokens frames each."""
    prompts = os.path.join(LOGS, "gateway-prompts.jsonl")
    with open(prompts, "w") as f:
        for i in range(256):
            f.write(json.dumps({"prompt": f"Question {i}: what is the capital of France?", "max_tokens": output_len})
                    + "\n")
    return run_loadgen(url, ["--model", "bare", "--prompts-file", prompts, "--concurrency", str(concurrency),
                             "--num-requests", str(num), "--warmup", str(min(concurrency, 16))], "gateway-loadgen")


def run_setup(name: str, itl_ms: float, output_len: int, concurrencies: list[int], requests_per_stream: int) -> dict:
    replicas = [Proc(f"fake-replica-{i}", [PY, os.path.join(BENCH, "bare_sse_server.py"), "--port", "{port}",
                                           "--itl-ms", str(itl_ms)]) for i in range(2)]
    front = None
    try:
        if name == "scalellm gateway":
            front = Proc("gateway", [PY, "-m", "scalellm.gateway", "--port", "{port}", "--policy", "round_robin",
                                     "--disable-log-requests", *[a for r in replicas for a in ("--replica", r.url)]])
        elif name == "sglang-router":
            front = Proc("sglang-router", [ROUTER_PY, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
                                           "--port", "{port}", "--policy", "round_robin", "--log-level", "warn",
                                           "--prometheus-port", str(free_port()),
                                           "--worker-urls", *[r.url for r in replicas]], ready_path="/health",
                         timeout=120)
        url = front.url if front else replicas[0].url
        out = {}
        for c in concurrencies:
            num = c * requests_per_stream
            cpu = tree_cpu_seconds(front.proc.pid) if front else 0.0
            s = loadgen(url, c, num, output_len)
            s["cpu_s_per_1000_requests"] = (1000 * (tree_cpu_seconds(front.proc.pid) - cpu) /
                                            (num + min(c, 16))) if front else 0.0
            out[c] = s
            print(f"  {name:<17} c={c:<4} {s['output_throughput']:9.0f} tok/s  TTFT p50 {s['ttft_ms']['median']:7.2f} "
                  f"p99 {s['ttft_ms']['p99']:7.2f} ms  CPU {s['cpu_s_per_1000_requests']:.2f} s/1k req  "
                  f"errors {s['errors']}", flush=True)
        return out
    finally:
        if front:
            front.stop()
        for r in replicas:
            r.stop()


SETUPS = ("direct", "scalellm gateway", "sglang-router")


def report(results: dict, version: str, concurrencies: list[int]) -> str:
    lines = ["# Gateway cost on loopback", "",
             f"`.venv/bin/python bench/gateway.py`: ours (`python -m scalellm.gateway`) and sglang-router {version} "
             "(Rust), each round-robin over two fake replicas streaming canned SSE; `direct` is loadgen straight to "
             "one replica. Paced: 64 frames 10 ms apart (added TTFT = the gateway's latency); flat out: 256 frames "
             "with no pause (the most tokens per second through the path; the load generator is then the bottleneck, and a "
             "stream that reaches it whole has a TTFT equal to its E2E, as direct has). Mean of the repeats; spread "
             "min-max.", ""]
    for workload in WORKLOADS:
        lines += [f"## {workload}", "", "| setup | concurrency | tok/s (spread) | TTFT p50 ms | TTFT p99 ms | "
                  "added TTFT p50 / p99 ms | E2E p50 ms | gateway CPU s per 1k requests | errors |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for c in concurrencies:
            base = results[workload]["direct"][c]
            b50 = statistics.mean(r["ttft_ms"]["median"] for r in base)
            b99 = statistics.mean(r["ttft_ms"]["p99"] for r in base)
            for setup in SETUPS:
                rows = results[workload][setup][c]
                tok = [r["output_throughput"] for r in rows]
                p50 = statistics.mean(r["ttft_ms"]["median"] for r in rows)
                p99 = statistics.mean(r["ttft_ms"]["p99"] for r in rows)
                e2e = statistics.mean(r["e2e_ms"]["median"] for r in rows)
                cpu = statistics.mean(r["cpu_s_per_1000_requests"] for r in rows)
                errors = sum(sum(r["errors"].values()) for r in rows)
                added = "" if setup == "direct" else f"{p50 - b50:+.2f} / {p99 - b99:+.2f}"
                lines.append(f"| {setup} | {c} | {statistics.mean(tok):.0f} ({min(tok):.0f}-{max(tok):.0f}) | "
                             f"{p50:.2f} | {p99:.2f} | {added} | {e2e:.1f} | {'' if setup == 'direct' else f'{cpu:.2f}'} | "
                             f"{errors} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, concurrencies: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(SETUPS)
    for ax, (workload, metric, label) in zip(axes, (("paced", "ttft", "TTFT p50 ms (paced)"),
                                                    ("flat out", "tok", "output tok/s (flat out)"))):
        for i, setup in enumerate(SETUPS):
            values = []
            for c in concurrencies:
                rows = results[workload][setup][c]
                values.append(statistics.mean(r["ttft_ms"]["median"] if metric == "ttft" else r["output_throughput"]
                                              for r in rows))
            ax.bar([j + i * width for j in range(len(concurrencies))], values, width, label=setup)
        ax.set_xticks([j + width for j in range(len(concurrencies))], [f"c={c}" for c in concurrencies])
        ax.set_title(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="64,256")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--requests-per-stream", type=int, default=4)
    args = ap.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    version = ensure_router()
    results = {w: {s: {c: [] for c in concurrencies} for s in SETUPS} for w in WORKLOADS}
    for repeat in range(args.repeats):
        for workload, spec in WORKLOADS.items():
            for setup in SETUPS:
                print(f"repeat {repeat + 1}/{args.repeats}, {workload}, {setup}", flush=True)
                for c, s in run_setup(setup, spec["itl_ms"], spec["output_len"], concurrencies,
                                      args.requests_per_stream).items():
                    results[workload][setup][c].append(s)
    write_table("gateway", report(results, version, concurrencies),
                {"sglang_router_version": version, "results": results},
                lambda path: plot(results, concurrencies, path), show=True)


if __name__ == "__main__":
    main()
