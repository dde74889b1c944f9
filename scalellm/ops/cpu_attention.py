"""numba kernel for decode attention straight from the paged KV cache (no gather, no padding).

One parallel task per sequence: it scores every query head against each cached key of the
sequence, softmaxes in float32, and accumulates the values. bfloat16 caches are read as raw 16-bit
words and widened to float32 in registers (numba_util.load). The kernel releases the GIL, so the
event loop keeps serving while it runs.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from scalellm.ops.numba_util import as_numba, load


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _decode_kernel(q, k_cache, v_cache, block_tables, context_starts, context_lens, scale, out):
    num_seqs, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    for b in prange(num_seqs):  # one task per sequence: its cached rows are read contiguously
        start = context_starts[b]
        length = context_lens[b] - start
        scores = np.empty((num_heads, length), np.float32)
        qb = q[b]
        for t in range(length):
            pos = start + t
            blk, off = block_tables[b, pos // block_size], pos % block_size
            for kh in range(kv_heads):
                k = k_cache[blk, off, kh]
                for h in range(kh * group, (kh + 1) * group):
                    s = np.float32(0.0)
                    for d in range(head_dim):
                        s += qb[h, d] * load(k[d])
                    scores[h, t] = s * scale
        for h in range(num_heads):
            m = scores[h, 0]
            for t in range(1, length):
                m = max(m, scores[h, t])
            total = np.float32(0.0)
            for t in range(length):
                e = np.exp(scores[h, t] - m)
                scores[h, t] = e
                total += e
            inv = np.float32(1.0) / total
            for t in range(length):
                scores[h, t] *= inv
        acc = np.zeros((num_heads, head_dim), np.float32)
        for t in range(length):
            pos = start + t
            blk, off = block_tables[b, pos // block_size], pos % block_size
            for kh in range(kv_heads):
                v = v_cache[blk, off, kh]
                for h in range(kh * group, (kh + 1) * group):
                    p = scores[h, t]
                    for d in range(head_dim):
                        acc[h, d] += p * load(v[d])
        out[b] = acc




def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_starts: torch.Tensor, context_lens: torch.Tensor,
                           scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [seqs, heads, head_dim]; caches: [blocks, block_size, kv_heads, head_dim];
    block_tables: [seqs, max_blocks] int32; each query attends to cached positions
    [context_starts, context_lens) (int32; the start is non-zero only under a sliding window)."""
    qf = q.float().contiguous()
    result = torch.empty_like(qf)
    _decode_kernel(qf.numpy(), as_numba(k_cache), as_numba(v_cache), block_tables.numpy(),
                   context_starts.numpy(), context_lens.numpy(), np.float32(scale), result.numpy())
    if out is None:
        return result.to(q.dtype)
    out.copy_(result)
    return out

