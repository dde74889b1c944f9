"""numba kernels for decode attention straight from the paged KV cache (no gather, no padding).

bfloat16 caches with head_dim a multiple of 16 (the models' case) take the vector-IR kernel: scores
sixteen cached positions per call with each K row widened once for the whole query group, softmax in
float32, values accumulated in registers over each block (attention_ir.py), every KV head taken at
each position so the cache is read in memory order. On CPUs with AVX512-BF16 it multiplies in
bfloat16 (vdpbf16ps: exact products summed in float32, no widening of K and V; the softmax weights
rounded to bfloat16 for the values' products, as GPU flash attention does): ~5-10% less time than
float32 products, as reading the KV cache from memory bounds both (bench/results/step_profile.md).
Other caches (float32: the token-identity tests' dtype) take the plain kernel: each key row read once
for the group, the accumulator in memory. Both walk each row's blocks in order, the threads taking runs
of rows of about equal work (balanced_parts); small batches run serial builds (a parallel launch costs
more than their work). The kernels release the GIL. bfloat16 prefill tokens take the IR kernel too, each as a
decode row over its own causal context, in the same call as the step's decodes
(attention_metadata.prefill_as_decode; routed in ops.paged_attention).
"""
from __future__ import annotations

import hashlib
import inspect
import types

import numba
import numpy as np
from llvmlite import binding as llvm
import torch
from numba import njit, prange

from scalellm.ops.cpu import attention_ir
from scalellm.ops.cpu.attention_ir import (TILE, accumulator_dims, make_accumulate, make_accumulate_dot, make_scores,
                                       make_scores_dot)
from scalellm.ops.cpu.kernels import FAST, renamed, twin
from scalellm.ops.cpu.numba_util import as_numba, bits_to_f32, exp_f32, f32_to_bits, keep_alive, load, store

PARALLEL_SEQS = 4  # sequences from which the parallel build runs
# The IR kernel unrolls every query head's 16-lane vectors (heads x head_dim / 16 of q, and as many
# accumulators); up to MAX_IR_VECTORS they stay in registers. Larger shapes (32 heads of 128: 256 vectors)
# would mostly spill: they keep the plain kernel.
MAX_IR_VECTORS = 48
USE_IR = True  # bfloat16 caches take the vector-IR kernel (False: the plain one, for comparisons)
# Prefill tokens on the IR kernel too, each as a decode over its own causal context (ops.paged_attention):
# faster than torch's SDPA for small models' chunks, where SDPA's fixed cost per chunk and head dominates
# (bench/results/op_ab_ir_prefill_prefill.md). False: SDPA, for comparisons.
IR_PREFILL = True
# numba's disk cache checks only this file's source, not the IR cpu/attention_ir.py generates: the IR
# kernels' cached names carry a hash of that file
_IR = hashlib.sha1(inspect.getsource(attention_ir).encode()).hexdigest()[:10]
_SCORES = _ACCUMULATE = None  # the intrinsics, bound per (head_dim, group, kv_heads) build by _ir_kernel
_DOT, _DIMS = False, np.zeros(0, np.int64)  # bound by _ir_kernel too: dot products; the accumulator's order
# bfloat16 dot products for the scores and the values where the CPU has them (AVX512-BF16): half the
# instructions of widening each element; the values' weights are rounded to bfloat16 (tests bound the
# error). False: float32 products.
USE_DOT = True
HOST_BF16_DOT = bool(llvm.get_host_cpu_features().get("avx512bf16", False))


def uses_dot(head_dim: int) -> bool:
    """Whether the bfloat16 kernel for this head_dim runs on bfloat16 dot products."""
    return USE_DOT and HOST_BF16_DOT and head_dim % 32 == 0


@njit(inline="always", nogil=True, fastmath=FAST)
def _softmax_rows(scores, rows, length):
    for h in range(rows):
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


@njit(inline="always", nogil=True, fastmath=FAST)
def _exp_rows(scores, maxes, rows, length, sums):
    """scores[h, :length] = exp(scores - the row's maximum), in place, and each row's sum in sums[h]. The
    maxima come lane-wise from the scoring (maxes [rows, TILE]); the weights stay unnormalized, the
    caller divides the accumulated values by the sum once."""
    for h in range(rows):
        m = maxes[h, 0]
        for i in range(1, TILE):
            m = max(m, maxes[h, i])
        total = np.float32(0.0)
        for t in range(length):
            e = exp_f32(scores[h, t] - m)
            scores[h, t] = e
            total += e
        sums[h] = total


@njit(inline="always", nogil=True, fastmath=FAST)
def _round_weights(scores, weights, rows, length, sums):
    """The softmax weights rounded to bfloat16 (nearest even) for the dot-product accumulation, and each
    row's sum taken again over the rounded weights, so the output divides by the sum of what it used."""
    for h in range(rows):
        total = np.float32(0.0)
        for t in range(length):
            bits = f32_to_bits(scores[h, t])
            bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            weights[h, t] = np.uint16(bits)
            total += bits_to_f32(bits << np.uint32(16))
        sums[h] = total


@twin
def _decode_kernel(q, k_cache, v_cache, block_tables, context_starts, context_lens, scale, out, parts):
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    for part in prange(parts.shape[0] - 1):  # a run of sequences per task: each block read front to back once
        for b in range(parts[part], parts[part + 1]):
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
            _softmax_rows(scores, num_heads, length)
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


def _bf16_decode_kernel(q, k_cache, v_cache, block_tables, context_starts, context_lens, scale, out, parts):
    """bfloat16 caches, one task per run of rows: scores sixteen positions per call (keeping each head's
    maximum lane-wise), then the exponentials, then the values accumulated block by block (attention_ir)
    and divided by the sum once at the end; every KV head is taken at each position, so the cache is
    read in memory order. A run's scratch arrays are made once, for its longest row (a prefill's rows
    are many and short: per-row allocations cost about as much as their work). _SCORES and _ACCUMULATE
    are the intrinsics for this build's head_dim, group and KV heads (see _ir_kernel)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    row = kv_heads * head_dim  # elements from one position's K (or V) row to the next
    k_base, v_base = k_cache.ctypes.data, v_cache.ctypes.data
    for part in prange(parts.shape[0] - 1):
        longest = 0
        for b in range(parts[part], parts[part + 1]):
            longest = max(longest, context_lens[b] - context_starts[b])
        width = longest + TILE  # a tile writes all 16 lanes
        qs = np.empty((num_heads, head_dim), np.float32)
        scores = np.empty((num_heads, width), np.float32)
        acc = np.empty((num_heads, head_dim), np.float32)
        maxes = np.empty((num_heads, TILE), np.float32)
        sums = np.empty(num_heads, np.float32)
        weights = np.zeros((num_heads, width + 2) if _DOT else (1, 1), np.uint16)  # + 2: a pair read past the end
        q_at, s_at, a_at, m_at = qs.ctypes.data, scores.ctypes.data, acc.ctypes.data, maxes.ctypes.data
        w_at = weights.ctypes.data
        for b in range(parts[part], parts[part + 1]):
            start = context_starts[b]
            end = context_lens[b]
            length = end - start
            for h in range(num_heads):
                for d in range(head_dim):
                    qs[h, d] = load(q[b, h, d]) * (np.float32(1.0) if _DOT else scale)
                    acc[h, d] = 0.0
                for i in range(TILE):
                    maxes[h, i] = -np.inf
            first, last = start // block_size, (end + block_size - 1) // block_size
            for j in range(first, last):
                lo, hi = max(start, j * block_size), min(end, (j + 1) * block_size)
                at = (block_tables[b, j] * block_size + lo - j * block_size) * row
                for p in range(lo, hi, TILE):
                    _SCORES(q_at, k_base + 2 * (at + (p - lo) * row), row, min(TILE, hi - p), s_at + 4 * (p - start),
                            width, m_at, scale)
            _exp_rows(scores, maxes, num_heads, length, sums)
            if _DOT:
                _round_weights(scores, weights, num_heads, length, sums)
            for j in range(first, last):
                lo, hi = max(start, j * block_size), min(end, (j + 1) * block_size)
                at = (block_tables[b, j] * block_size + lo - j * block_size) * row
                if _DOT:
                    _ACCUMULATE(w_at + 2 * (lo - start), width + 2, v_base + 2 * at, row, hi - lo, a_at)
                else:
                    _ACCUMULATE(s_at + 4 * (lo - start), width, v_base + 2 * at, row, hi - lo, a_at)
            for h in range(num_heads):
                inv = np.float32(1.0) / sums[h]
                for d in range(head_dim):
                    store(out, (b, h, _DIMS[d]), acc[h, d] * inv)
        keep_alive(qs, scores, acc) + maxes.shape[0] + weights.shape[0]  # read through their addresses


_IR_KERNELS: dict = {}


def _ir_kernel(head_dim: int, group: int, kv_heads: int, parallel: bool):
    """The bfloat16 kernel built for one (head_dim, group, kv_heads), serial or parallel, compiled on
    first use: on bfloat16 dot products where the CPU has them (uses_dot), else on float32 products."""
    dot = uses_dot(head_dim)
    key = (head_dim, group, kv_heads, parallel, dot)
    if key not in _IR_KERNELS:
        fn = _bf16_decode_kernel
        made = (make_scores_dot, make_accumulate_dot) if dot else (make_scores, make_accumulate)
        dims = accumulator_dims(head_dim) if dot else range(head_dim)
        scope = {**fn.__globals__, "_SCORES": made[0](head_dim, group, kv_heads),
                 "_ACCUMULATE": made[1](head_dim, group, kv_heads), "_DOT": dot,
                 "_DIMS": np.array(dims, np.int64)}
        copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__qualname__ = fn.__qualname__
        name = f"{head_dim}_{group}_{kv_heads}_{'dot_' if dot else ''}{'parallel_' if parallel else ''}{_IR}"
        _IR_KERNELS[key] = njit(nogil=True, cache=True, fastmath=FAST, parallel=parallel)(renamed(copy, name))
    return _IR_KERNELS[key]


def takes_ir(heads: int, k_cache: np.ndarray, v_cache: np.ndarray) -> bool:
    """Whether decode_attention runs the vector-IR kernel for these (numba-ready) caches: bfloat16 (int16
    bits), head_dim a multiple of 16, at most MAX_IR_VECTORS query vectors."""
    head_dim = k_cache.shape[-1]
    return USE_IR and k_cache.dtype == np.int16 and head_dim % 16 == 0 and heads * head_dim // 16 <= MAX_IR_VECTORS \
        and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous


# A row's fixed cost (its setup, softmax passes and output), in cached positions, when splitting rows into
# runs of equal work: a mixed step's decode rows (long contexts) and prefill rows (a triangle of short to
# long ones) split by count leave one thread with most of the work.
ROW_COST = 16


def balanced_parts(context_starts: np.ndarray, context_lens: np.ndarray, parts: int) -> np.ndarray:
    """Boundaries (int64 [parts + 1]) of `parts` contiguous runs of rows with about equal work."""
    cost = (context_lens - context_starts + ROW_COST).astype(np.int64)
    middle = 2 * np.cumsum(cost) - cost  # twice each row's midpoint on the line of all the work
    part = middle * parts // (2 * int(cost.sum()))  # the run each row's midpoint falls in
    return np.searchsorted(part, np.arange(parts + 1), side="left").astype(np.int64)


def row_parts(context_starts: np.ndarray, context_lens: np.ndarray) -> np.ndarray:
    """The runs of rows decode_attention's threads take for these rows (one run for a serial build)."""
    if len(context_lens) < PARALLEL_SEQS:
        return np.array([0, len(context_lens)], np.int64)
    return balanced_parts(context_starts, context_lens, numba.get_num_threads())


def decode_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, block_tables: np.ndarray,
                     context_starts: np.ndarray, context_lens: np.ndarray, scale: float, out: np.ndarray,
                     parts: np.ndarray | None = None) -> None:
    """The kernel on numba-ready arrays (see paged_decode_attention): the vector-IR kernel where takes_ir,
    the plain one elsewhere. parts: the runs of rows the threads take (balanced_parts; computed here when
    not given)."""
    parallel = q.shape[0] >= PARALLEL_SEQS
    if parts is None:
        parts = row_parts(context_starts, context_lens)
    heads, head_dim, kv_heads = q.shape[1], q.shape[2], k_cache.shape[2]
    if takes_ir(heads, k_cache, v_cache):
        kernel = _ir_kernel(head_dim, heads // kv_heads, kv_heads, parallel)
    else:
        kernel = _decode_kernel.parallel if parallel else _decode_kernel.serial
    kernel(q, k_cache, v_cache, block_tables, context_starts, context_lens, np.float32(scale), out, parts)


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
