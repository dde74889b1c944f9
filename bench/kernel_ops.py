"""Time each operation at realistic sizes against the device's measured memory bandwidth.

    .venv/bin/python bench/kernel_ops.py [--device cpu|cuda]

Shapes follow Llama-3-8B (32 heads, 8 KV heads, head_dim 128, hidden 4096, intermediate 14336,
vocab 128256); decode attention runs at batch 64 with 2,048-token contexts. Each row gives the
bytes an operation must move, its time, the achieved bandwidth and its share of the ceiling (a
large tensor copy). Fused sampling is also timed against the equivalent sequence of torch
operations. Writes bench/results/kernels_<device>.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]

from harness import write_table  # noqa: E402
from scalellm import SamplingParams, ops  # noqa: E402
from scalellm.engine.sequence import Sequence  # noqa: E402
from scalellm.engine.sampler import build_sampling_batch  # noqa: E402


def timeit(fn, device: str, repeat: int) -> float:
    fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        sync()
        best = min(best, (time.perf_counter() - start) / repeat)
    return best


def copy_bandwidth(device: str) -> float:
    x = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = timeit(lambda: y.copy_(x), device, 5)
    return 2 * x.numel() / t


def torch_sampling(logits, temperature, top_k, top_p):
    """The same work as the fused kernel, as separate torch operations (penalty-free rows)."""
    x = logits / temperature[:, None]
    kth = x.topk(int(top_k.max()), dim=-1).values[:, -1:]
    x = x.masked_fill(x < kth, float("-inf"))
    sorted_x, order = x.sort(dim=-1, descending=True)
    p = sorted_x.softmax(-1)
    remove = (p.cumsum(-1) - p) >= top_p[:, None]
    x = x.scatter(1, order, sorted_x.masked_fill(remove, float("-inf")))
    token = torch.multinomial(x.softmax(-1), 1)
    logprobs = torch.log_softmax(logits, -1)
    return token, logprobs.gather(1, token), logprobs.topk(5, dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    dev, dt = args.device, getattr(torch, args.dtype)
    reps = 20 if dev == "cuda" else 3
    ceiling = copy_bandwidth(dev)
    rows = []

    def record(name, shape, nbytes, seconds, note=""):
        rows.append((name, shape, nbytes / 1e6, seconds * 1e3, nbytes / seconds / 1e9, nbytes / seconds / ceiling, note))
        print(f"{name:24s} {seconds * 1e3:9.3f} ms  {nbytes / seconds / 1e9:7.1f} GB/s  "
              f"{100 * nbytes / seconds / ceiling:5.1f}% of ceiling {note}", flush=True)

    # decode attention: batch 64, 2k context, Llama-3-8B heads
    B, ctx, heads, kvh, hd, bs = 64, 2048, 32, 8, 128, 16
    nblocks = B * ctx // bs
    k_cache = torch.randn(nblocks, bs, kvh, hd, device=dev).to(dt)
    v_cache = torch.randn(nblocks, bs, kvh, hd, device=dev).to(dt)
    tables = torch.randperm(nblocks, device=dev).view(B, ctx // bs).to(torch.int32)
    lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
    meta = ops.AttentionMetadata(slot_mapping=torch.zeros(B, dtype=torch.long, device=dev), num_decode_tokens=B,
                                 max_decode_context=ctx,
                                 decode_block_tables=tables, decode_context_starts=torch.zeros_like(lens),
                                 decode_context_lens=lens)
    q = torch.randn(B, heads, hd, device=dev).to(dt)
    kv_bytes = 2 * B * ctx * kvh * hd * k_cache.element_size()
    record("decode attention", f"B={B} ctx={ctx} {heads}/{kvh}x{hd}", kv_bytes,
           timeit(lambda: ops.paged_attention(q, k_cache, v_cache, meta, hd ** -0.5), dev, reps))
    del k_cache, v_cache

    T, hidden, inter = 64, 4096, 14336
    x, r, w = (torch.randn(T, hidden, device=dev).to(dt), torch.randn(T, hidden, device=dev).to(dt),
               torch.randn(hidden, device=dev).to(dt))
    es = x.element_size()
    record("add + RMSNorm", f"{T}x{hidden}", es * T * hidden * 4, timeit(lambda: ops.add_rms_norm(x, r, w, 1e-5), dev, reps * 10))
    g = torch.randn(T, 2 * inter, device=dev).to(dt)
    record("SiLU-mul", f"{T}x{2 * inter}", es * T * inter * 3, timeit(lambda: ops.silu_mul(g), dev, reps * 10))
    qk = torch.randn(T, (heads + kvh) * hd, device=dev).to(dt)
    qv, kv = qk[:, :heads * hd].view(T, heads, hd), qk[:, heads * hd:].view(T, kvh, hd)
    pos = torch.randint(0, 2048, (T,), device=dev)
    cos, sin = torch.randn(4096, hd, device=dev).to(dt), torch.randn(4096, hd, device=dev).to(dt)
    record("rotary (q and k)", f"{T}x({heads}+{kvh})x{hd}", es * T * (heads + kvh) * hd * 2,
           timeit(lambda: ops.rotary(qv, kv, pos, cos, sin), dev, reps * 10))
    kn, vn = torch.randn(T, kvh, hd, device=dev).to(dt), torch.randn(T, kvh, hd, device=dev).to(dt)
    kc, vc = torch.zeros(4096, bs, kvh, hd, device=dev).to(dt), torch.zeros(4096, bs, kvh, hd, device=dev).to(dt)
    slots = torch.randperm(4096 * bs, device=dev)[:T]
    record("KV write", f"{T}x{kvh}x{hd}", es * T * kvh * hd * 4, timeit(lambda: ops.write_kv(kn, vn, kc, vc, slots), dev, reps * 10))

    vocab = 128256
    logits = torch.randn(B, vocab, device=dev)
    seqs = [Sequence(i, "r", 0, [1], 1, SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=i, logprobs=5), 0.0)
            for i in range(B)]
    batch = build_sampling_batch(seqs, [], vocab)
    batch = batch.to(dev) if dev == "cuda" else batch
    fused = timeit(lambda: ops.fused_sample(logits, batch, 5), dev, reps)
    temperature = torch.full((B,), 0.8, device=dev)
    top_k, top_p = torch.full((B,), 50, device=dev), torch.full((B,), 0.9, device=dev)
    unfused = timeit(lambda: torch_sampling(logits, temperature, top_k, top_p), dev, reps)
    record("fused sampling", f"B={B} vocab={vocab}", 4 * B * vocab, fused,
           f"(torch ops: {unfused * 1e3:.2f} ms, {unfused / fused:.2f}x)")

    name = torch.cuda.get_device_name() if dev == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    lines = [f"# Kernel timings: {dev} ({name}), {args.dtype}", "",
             f"Ceiling: a {256} MiB copy at {ceiling / 1e9:.1f} GB/s. Bytes are what each operation must read and write.",
             "", "| operation | shape | MB moved | ms | GB/s | share of ceiling | note |", "|---|---|---:|---:|---:|---:|---|"]
    for name_, shape, mb, ms, gbs, share, note in rows:
        lines.append(f"| {name_} | {shape} | {mb:.1f} | {ms:.3f} | {gbs:.1f} | {share:.0%} | {note} |")
    write_table(f"kernels_{dev}", lines)


if __name__ == "__main__":
    main()
