"""numba twins of the CUDA kernels for the CPU backend: RMSNorm (+ residual), rotary embedding,
SiLU-and-multiply, KV-cache write and chunked-prefill attention. Each releases the GIL and
parallelizes over rows where that pays; semantics match the torch reference and the CUDA kernels.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from scalellm.ops.numba_util import as_numba, load, round_as, store

_JIT = dict(nogil=True, cache=True, fastmath=False)
_FAST = dict(nogil=True, cache=True, fastmath=True)


@njit(parallel=True, **_JIT)
def _rms_norm(out, x, weight, eps):
    rows, hidden = x.shape
    for r in prange(rows):
        sq = 0.0
        for i in range(hidden):
            v = load(x[r, i])
            sq += v * v
        inv = np.float32(1.0 / np.sqrt(np.float32(sq / hidden) + eps))
        for i in range(hidden):
            store(out[r], i, load(weight[i]) * round_as(x[r, i], load(x[r, i]) * inv))


@njit(parallel=True, **_JIT)
def _add_rms_norm(out, residual, x, weight, eps):
    rows, hidden = x.shape
    for r in prange(rows):
        sq = 0.0
        for i in range(hidden):
            store(residual[r], i, load(x[r, i]) + load(residual[r, i]))
            v = load(residual[r, i])
            sq += v * v
        inv = np.float32(1.0 / np.sqrt(np.float32(sq / hidden) + eps))
        for i in range(hidden):
            store(out[r], i, load(weight[i]) * round_as(residual[r, i], load(residual[r, i]) * inv))


@njit(parallel=True, **_JIT)
def _rotary(q, k, positions, cos, sin):
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    half = dim // 2
    for t in prange(tokens):
        p = positions[t]
        for h in range(heads + kv_heads):
            row = q[t, h] if h < heads else k[t, h - heads]
            for d in range(half):
                x1, x2 = load(row[d]), load(row[d + half])
                a = round_as(row[d], x1 * load(cos[p, d]))
                b = round_as(row[d], x2 * load(sin[p, d]))
                c = round_as(row[d], x2 * load(cos[p, d + half]))
                e = round_as(row[d], x1 * load(sin[p, d + half]))
                store(row, d, a - b)
                store(row, d + half, c + e)


@njit(parallel=True, **_FAST)
def _silu_mul(out, x):
    tokens, n = out.shape
    for t in prange(tokens):
        for i in range(n):
            g = load(x[t, i])
            s = round_as(x[t, i], g / (np.float32(1.0) + np.exp(np.float32(-g))))
            store(out[t], i, s * load(x[t, n + i]))


@njit(parallel=True, **_JIT)
def _write_kv(k, v, k_cache, v_cache, slots):
    block_size = k_cache.shape[1]
    for t in prange(k.shape[0]):
        s = slots[t]
        if s < 0:
            continue
        b, o = s // block_size, s % block_size
        k_cache[b, o] = k[t]
        v_cache[b, o] = v[t]


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _prefill_attention(out, q, k_cache, v_cache, key_slots, query_start, query_len, context_len, window, scale):
    """One chunk of one sequence: queries at positions context_len - query_len .. context_len - 1."""
    heads, dim = q.shape[1], q.shape[2]
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    first_pos = context_len - query_len
    for task in prange(query_len * heads):
        i, h = task // heads, task % heads
        kh = h // group
        pos = first_pos + i
        lo = 0 if window <= 0 else max(0, pos - window + 1)
        scores = np.empty(pos + 1 - lo, np.float32)
        m = np.float32(-np.inf)
        for t in range(lo, pos + 1):
            slot = key_slots[t]
            krow = k_cache[slot // block_size, slot % block_size, kh]
            s = np.float32(0.0)
            for d in range(dim):
                s += load(q[query_start + i, h, d]) * load(krow[d])
            s *= scale
            scores[t - lo] = s
            m = max(m, s)
        total = np.float32(0.0)
        for j in range(scores.shape[0]):
            scores[j] = np.exp(scores[j] - m)
            total += scores[j]
        acc = np.zeros(dim, np.float32)
        for t in range(lo, pos + 1):
            slot = key_slots[t]
            vrow = v_cache[slot // block_size, slot % block_size, kh]
            p = scores[t - lo] / total
            for d in range(dim):
                acc[d] += p * load(vrow[d])
        for d in range(dim):
            store(out[query_start + i, h], d, acc[d])


# -- torch-facing wrappers ---------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(x2) if out is None else out.view(x2.shape)
    _rms_norm(as_numba(out), as_numba(x2), as_numba(weight), np.float32(eps))
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None):
    residual = residual.clone()
    out = torch.empty_like(residual) if out is None else out
    _add_rms_norm(as_numba(out), as_numba(residual), as_numba(x.contiguous()), as_numba(weight), np.float32(eps))
    return out, residual


def rotary_inplace(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> None:
    _rotary(as_numba(q), as_numba(k), positions.numpy(), as_numba(cos), as_numba(sin))


def silu_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    n = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype) if out is None else out
    _silu_mul(as_numba(out.view(-1, n)), as_numba(x.reshape(-1, 2 * n)))
    return out


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    _write_kv(as_numba(k), as_numba(v), as_numba(k_cache), as_numba(v_cache), slot_mapping.numpy())


def prefill_attention(out, q, k_cache, v_cache, key_slots, query_start, query_len, context_len, window, scale):
    _prefill_attention(as_numba(out), as_numba(q), as_numba(k_cache), as_numba(v_cache), key_slots.numpy(),
                       query_start, query_len, context_len, window or 0, np.float32(scale))
