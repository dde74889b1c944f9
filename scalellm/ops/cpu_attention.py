"""numba kernel for decode attention straight from the paged KV cache (no gather, no padding).

One task per (sequence, KV head): the task scores its group of query heads against each cached key of
the sequence (each key row is read once for the whole group), softmaxes in float32 (with a
vectorizable exp) and accumulates the values. bfloat16 caches are read as raw 16-bit words and widened to float32 in registers
(numba_util.load). Small batches run the serial build (a parallel launch costs more than their work);
large ones spread the tasks over the compute threads. The kernel releases the GIL.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import prange

from scalellm.ops.cpu_kernels import twin
from scalellm.ops.numba_util import as_numba, exp_f32, load, store

PARALLEL_SEQS = 4  # sequences from which the parallel build runs


@twin
def _decode_kernel(q, k_cache, v_cache, block_tables, context_starts, context_lens, scale, out):
    num_seqs, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    for b in prange(num_seqs):  # one task per sequence: each cache block is read front to back once
        start = context_starts[b]
        end = context_lens[b]
        length = end - start
        qs = np.empty((num_heads, head_dim), np.float32)
        for h in range(num_heads):
            for d in range(head_dim):
                qs[h, d] = load(q[b, h, d]) * scale
        scores = np.empty((num_heads, length), np.float32)
        for j in range(start // block_size, (end + block_size - 1) // block_size):
            blk = block_tables[b, j]
            for pos in range(max(start, j * block_size), min(end, (j + 1) * block_size)):
                off = pos - j * block_size
                for kh in range(kv_heads):
                    for h in range(kh * group, (kh + 1) * group):
                        s = np.float32(0.0)
                        for d in range(head_dim):
                            s += qs[h, d] * load(k_cache[blk, off, kh, d])
                        scores[h, pos - start] = s
        for h in range(num_heads):
            m = scores[h, 0]
            for t in range(1, length):
                m = max(m, scores[h, t])
            total = np.float32(0.0)
            for t in range(length):
                e = exp_f32(scores[h, t] - m)
                scores[h, t] = e
                total += e
            inv = np.float32(1.0) / total
            for t in range(length):
                scores[h, t] *= inv
        acc = np.zeros((num_heads, head_dim), np.float32)
        for j in range(start // block_size, (end + block_size - 1) // block_size):
            blk = block_tables[b, j]
            for pos in range(max(start, j * block_size), min(end, (j + 1) * block_size)):
                off = pos - j * block_size
                for kh in range(kv_heads):
                    for h in range(kh * group, (kh + 1) * group):
                        p = scores[h, pos - start]
                        for d in range(head_dim):
                            acc[h, d] += p * load(v_cache[blk, off, kh, d])
        for h in range(num_heads):
            for d in range(head_dim):
                store(out, (b, h, d), acc[h, d])


def decode_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, block_tables: np.ndarray,
                     context_starts: np.ndarray, context_lens: np.ndarray, scale: float, out: np.ndarray) -> None:
    """The kernel on numba-ready arrays (see paged_decode_attention)."""
    kernel = _decode_kernel.parallel if q.shape[0] >= PARALLEL_SEQS else _decode_kernel.serial
    kernel(q, k_cache, v_cache, block_tables, context_starts, context_lens, np.float32(scale), out)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_starts: torch.Tensor, context_lens: torch.Tensor,
                           scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [seqs, heads, head_dim]; caches: [blocks, block_size, kv_heads, head_dim];
    block_tables: [seqs, max_blocks] int32; each query attends to cached positions
    [context_starts, context_lens) (int32; the start is non-zero only under a sliding window)."""
    out = torch.empty_like(q) if out is None else out
    decode_attention(as_numba(q.contiguous()), as_numba(k_cache), as_numba(v_cache), block_tables.numpy(),
                     context_starts.numpy(), context_lens.numpy(), scale, as_numba(out))
    return out
