"""The machine floor: what a perfect server would reach on this machine for the serving workload.

Measures this machine's best bfloat16 GEMM time for every projection shape of a model (qkv, o,
gate_up, down, lm_head) at M = 1, 16, 64, 128 and 512 tokens (the best of torch's plain linear and
oneDNN with the weight packed once, each on 1 and on all threads; each call takes the next of one
weight copy per layer, so the weights come from cache or memory as in a real step) and its memory
bandwidth (a large copy, bytes read plus written; and a large read alone, what KV-cache reads get).
A workload of c concurrent requests (input_len tokens in, output_len out) then costs, at those best
rates:
  - prefill: every prompt token through the projections in steps of up to 512 tokens (the LM head
    only for each prompt's last token), plus causal attention arithmetic at the same GEMM rate;
  - decode: output_len - 1 steps at batch c: the projections and LM head at M = c, plus attention
    over the context (arithmetic at the GEMM rate, or reading the KV cache at the measured read
    bandwidth, whichever is slower).
The memory floor of a decode step (memory_tpot_ms) is the time to read every weight and the batch's
KV cache once at the read bandwidth: what no decode step can beat, whatever its arithmetic.
Output tokens / total time is the floor's token rate. Nothing else (norms, rotary, sampling, HTTP)
is charged, so a real server stays below it.

    .venv/bin/python bench/machine_floor.py MODEL_FOLDER [--concurrency 1,16,64] [--json out.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

M_VALUES = (1, 16, 64, 128, 512)


def _best_time(fn, min_time: float = 0.2, repeats: int = 5) -> float:
    fn()
    n = 1
    while True:  # calls per sample so that a sample lasts long enough to time
        start = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - start > min_time / repeats:
            break
        n *= 2
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best


def gemm_time(n: int, k: int, m: int, threads: list[int], copies: int) -> tuple[float, str]:
    """Best seconds for x[m, k] @ W[n, k]^T in bfloat16, and which way got it. The call cycles over
    `copies` distinct weights (one per layer), so caches hold what they would hold in a real step."""
    g = torch.Generator().manual_seed(n * 7 + k)
    ws = [(torch.randn(n, k, generator=g) / k ** 0.5).bfloat16() for _ in range(copies)]
    x = torch.randn(m, k, generator=g).bfloat16()
    plain = itertools.cycle(ws)
    ways = {"plain": lambda: F.linear(x, next(plain))}
    if torch.backends.mkldnn.is_available():
        packed = itertools.cycle([torch.ops.mkldnn._reorder_linear_weight(w, 128) for w in ws])
        ways["packed"] = lambda: torch.ops.mkldnn._linear_pointwise(x, next(packed), None, "none", [], None)
    best = (float("inf"), "")
    for t in threads:
        torch.set_num_threads(t)
        for name, fn in ways.items():
            best = min(best, (_best_time(fn), f"{name}, {t} thread{'s' if t > 1 else ''}"))
    return best


def copy_bandwidth(threads: list[int], size: int = 256 << 20) -> float:
    """Bytes per second for a large copy (read + write counted)."""
    src = torch.ones(size // 4)
    dst = torch.empty_like(src)
    best = 0.0
    for t in threads:
        torch.set_num_threads(t)
        best = max(best, 2 * size / _best_time(lambda: dst.copy_(src), min_time=1.0))
    return best


def read_bandwidth(threads: list[int], size: int = 512 << 20) -> float:
    """Bytes per second for reading a large tensor once (an int32 maximum, which the CPU vectorizes at
    memory speed; a bfloat16 maximum is bound by its conversions, at less than half that rate): what the KV
    cache's and the weights' reads get (a copy's rate counts its writes too, which those reads do not have)."""
    src = torch.ones(size // 4, dtype=torch.int32)
    best = 0.0
    for t in threads:
        torch.set_num_threads(t)
        best = max(best, size / _best_time(lambda: src.max(), min_time=1.0))
    return best


def model_shapes(config) -> dict[str, tuple[int, int]]:
    c = config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    return {"qkv": (q + 2 * kv, c.hidden_size), "o": (c.hidden_size, q),
            "gate_up": (2 * c.intermediate_size, c.hidden_size), "down": (c.hidden_size, c.intermediate_size),
            "lm_head": (c.vocab_size, c.hidden_size)}


def measure(folder: str) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = sorted({1, cores})
    shapes = model_shapes(config)
    table = {}
    for name, (n, k) in shapes.items():
        for m in M_VALUES:
            seconds, way = gemm_time(n, k, m, threads, 1 if name == "lm_head" else config.num_hidden_layers)
            table[f"{name}@{m}"] = {"seconds": seconds, "gflops": 2 * m * n * k / seconds / 1e9, "way": way}
            print(f"  {name:8s} {n:6d}x{k:<5d} M={m:<4d} {seconds * 1e6:10.1f} us  "
                  f"{table[f'{name}@{m}']['gflops']:7.1f} GFLOP/s  ({way})", flush=True)
    bandwidth = copy_bandwidth(threads)
    reads = read_bandwidth(threads)
    print(f"  copy bandwidth {bandwidth / 1e9:.1f} GB/s, read bandwidth {reads / 1e9:.1f} GB/s", flush=True)
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"gemm": table, "bandwidth": bandwidth, "read_bandwidth": reads, "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads, "head_dim": hd,
            "shapes": shapes}


def _proj_time(floor: dict, m: int, with_head: int) -> float:
    """Projections for m tokens (LM head for with_head of them), at the best rate of the nearest
    measured M at or above m (per-token cost only falls with M, so this never flatters)."""
    at = next((x for x in M_VALUES if x >= m), M_VALUES[-1])
    per_layer = sum(floor["gemm"][f"{name}@{at}"]["seconds"] for name in ("qkv", "o", "gate_up", "down"))
    total = floor["layers"] * per_layer * m / at
    if with_head:
        head_at = next((x for x in M_VALUES if x >= with_head), M_VALUES[-1])
        total += floor["gemm"][f"lm_head@{head_at}"]["seconds"] * with_head / head_at
    return total


def _peak_flops(floor: dict) -> float:
    return max(v["gflops"] for v in floor["gemm"].values()) * 1e9


def workload_floor(floor: dict, c: int, input_len: int, output_len: int, budget: int = 512) -> dict:
    L, H, KVH, D = floor["layers"], floor["heads"], floor["kv_heads"], floor["head_dim"]
    peak = _peak_flops(floor)
    kv_bytes_per_token = 2 * L * KVH * D * 2
    prefill = 0.0
    per_step = max(1, budget // input_len)
    done = 0
    while done < c:  # whole prompts packed into steps of up to `budget` tokens
        group = min(per_step, c - done)
        tokens = group * input_len
        prefill += _proj_time(floor, tokens, group)
        prefill += group * 4 * L * H * D * input_len * (input_len + 1) / 2 / peak  # causal QK^T and PV
        done += group
    decode = memory = 0.0
    reads = floor.get("read_bandwidth", floor["bandwidth"])
    weight_bytes = 2 * (L * sum(n * k for name, (n, k) in floor["shapes"].items() if name != "lm_head")
                        + floor["shapes"]["lm_head"][0] * floor["shapes"]["lm_head"][1])
    for step in range(output_len - 1):
        context = input_len + step + 1
        attention = max(c * 4 * L * H * D * context / peak, c * context * kv_bytes_per_token / reads)
        decode += _proj_time(floor, c, c) + attention
        memory += (weight_bytes + c * context * kv_bytes_per_token) / reads
    total = prefill + decode
    step_ms = 1000 * decode / max(1, output_len - 1)
    return {"output_throughput": c * output_len / total, "request_throughput": c / total,
            "memory_tpot_ms": 1000 * memory / max(1, output_len - 1),
            "ttft_ms": {"median": 1000 * prefill, "p99": 1000 * prefill},
            "tpot_ms": {"median": step_ms, "p99": step_ms}, "itl_ms": {"median": step_ms, "p99": step_ms},
            "e2e_ms": {"median": 1000 * total, "p99": 1000 * total}, "errors": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args()
    floor = measure(args.model)
    out = {"measurements": floor, "workload": {}}
    for c in (int(x) for x in args.concurrency.split(",")):
        w = out["workload"][c] = workload_floor(floor, c, args.input_len, args.output_len)
        print(f"    c={c:<3} floor {w['output_throughput']:8.1f} tok/s  prefill {w['ttft_ms']['median']:8.1f} ms  "
              f"decode step {w['tpot_ms']['median']:7.2f} ms (memory floor {w['memory_tpot_ms']:.2f})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
