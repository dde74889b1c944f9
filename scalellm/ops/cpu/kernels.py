"""numba twins of the CUDA kernels. The Llama forward on the CPU runs RMSNorm, the attention inputs
(q/k norm, rotary, KV-cache write in one pass), SiLU-and-multiply and the small-batch GEMM from here;
RMSNorm with a residual, rotary alone and the KV-cache write serve the ops of those names, which the
forward does not call; chunked-prefill attention is a tested twin only, because torch's is faster
for it on the CPU (scalellm/ops/__init__.py routes each op).

Each kernel is compiled twice from one source: a serial build for the small batches of decoding,
where a parallel launch costs more than the work, and a parallel build (rows split over the compute
threads) for prefill-sized batches. Both release the GIL. bfloat16 arithmetic rounds where torch
rounds (numba_util.round_as), so outputs follow transformers' bfloat16 numerics; float32 is plain.
"""
from __future__ import annotations

import types

import numpy as np
import torch
from numba import njit, prange

from scalellm.ops.cpu.numba_util import as_numba, exp_f32, load, new_tensor, round_as, store

# Reassociation lets LLVM vectorize the reductions; no-NaN/no-Inf assumptions stay off (masked scores
# are -inf, and a NaN must propagate rather than vanish).
FAST = {"reassoc", "contract", "nsz", "arcp", "afn"}
PARALLEL_ROWS = 64  # rows (tokens) from which the parallel build runs
NO_WEIGHT = np.zeros(0, np.float32)  # an absent norm weight (kernels test shape[0] == 0)


def renamed(fn, suffix: str):
    """The same function under another qualified name: numba's on-disk cache is keyed by the name and
    not by compile options, so two builds of one function would otherwise load each other's code."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = f"{fn.__qualname__}_{suffix}"
    return copy


def twin(fn):
    """Serial and parallel builds of one kernel: call `pick(rows)` for the one that suits a batch."""
    serial = njit(nogil=True, cache=True, fastmath=FAST)(fn)
    parallel = njit(nogil=True, cache=True, fastmath=FAST, parallel=True)(renamed(fn, "parallel"))

    def pick(rows: int):
        return parallel if rows >= PARALLEL_ROWS else serial
    pick.serial, pick.parallel = serial, parallel
    return pick


@njit(inline="always", nogil=True)
def _inv_rms(x, r, hidden, eps):
    sq = np.float32(0.0)
    for i in range(hidden):
        v = load(x[r, i])
        sq += v * v
    return np.float32(1.0) / np.sqrt(sq / np.float32(hidden) + eps)


@twin
def rms_norm_kernel(out, x, weight, eps):
    rows, hidden = x.shape
    for r in prange(rows):
        inv = _inv_rms(x, r, hidden, eps)
        for i in range(hidden):
            store(out, (r, i), load(weight[i]) * round_as(x[r, i], load(x[r, i]) * inv))


@twin
def _add_rms_norm(out, residual, x, weight, eps):
    """residual += x (rounded to the residual's type), then out = rms_norm(residual) * weight."""
    rows, hidden = x.shape
    for r in prange(rows):
        for i in range(hidden):
            store(residual, (r, i), load(x[r, i]) + load(residual[r, i]))
        inv = _inv_rms(residual, r, hidden, eps)
        for i in range(hidden):
            store(out, (r, i), load(weight[i]) * round_as(residual[r, i], load(residual[r, i]) * inv))


@njit(inline="always", nogil=True)
def _rotate(buf, like, cos, sin, p, half):
    """Rotate-half rotary on a float32 head buffer, rounding each product and sum as torch does."""
    for d in range(half):
        x1, x2 = buf[d], buf[d + half]
        a = round_as(like, x1 * load(cos[p, d]))
        b = round_as(like, x2 * load(sin[p, d]))
        c = round_as(like, x2 * load(cos[p, d + half]))
        e = round_as(like, x1 * load(sin[p, d + half]))
        buf[d] = round_as(like, a - b)
        buf[d + half] = round_as(like, c + e)


@njit(inline="always", nogil=True)
def _rotate_row(buf, like, cos, sin, half):
    """_rotate with the position's cos and sin rows, its loop over 0-based slices: numba vectorizes
    those, not indices like d + half that it must check for wrap-around (used by the attention inputs'
    serial build, bit-identical; the rotary op keeps its own loop, which is faster there)."""
    x1s, x2s = buf[:half], buf[half:]
    c1, c2, s1, s2 = cos[:half], cos[half:], sin[:half], sin[half:]
    for d in range(half):
        x1, x2 = x1s[d], x2s[d]
        a = round_as(like, x1 * load(c1[d]))
        b = round_as(like, x2 * load(s1[d]))
        c = round_as(like, x2 * load(c2[d]))
        e = round_as(like, x1 * load(s2[d]))
        x1s[d] = round_as(like, a - b)
        x2s[d] = round_as(like, c + e)


@twin
def _attention_inputs(qkv, positions, cos, sin, q_norm, k_norm, eps, num_heads, num_kv_heads, k_cache, v_cache,
                      slots, q_out):
    """Per token: split the fused qkv row, RMS-normalize each q/k head (when q_norm has weights), rotate
    q and k, write q to q_out and k, v to the cache at the token's slot (slot < 0: not written)."""
    tokens = qkv.shape[0]
    dim = q_out.shape[2]
    half = dim // 2
    block_size = k_cache.shape[1]
    use_norm = q_norm.shape[0] > 0
    like = qkv[0, 0]
    for t in prange(tokens):
        p = positions[t]
        slot = slots[t]
        blk, off = slot // block_size, slot % block_size
        row = qkv[t]
        cos_p, sin_p = cos[p], sin[p]
        buf = np.empty(dim, np.float32)
        for h in range(num_heads + num_kv_heads):
            src = row[h * dim:(h + 1) * dim]
            if use_norm:
                w = q_norm if h < num_heads else k_norm
                sq = np.float32(0.0)
                for d in range(dim):
                    v = load(src[d])
                    sq += v * v
                inv = np.float32(1.0) / np.sqrt(sq / np.float32(dim) + eps)
                for d in range(dim):
                    buf[d] = round_as(like, load(w[d]) * round_as(like, load(src[d]) * inv))
            else:
                for d in range(dim):
                    buf[d] = load(src[d])
            _rotate_row(buf, like, cos_p, sin_p, half)
            if h < num_heads:
                dst = q_out[t, h]
                for d in range(dim):
                    store(dst, d, buf[d])
            elif slot >= 0:
                dst = k_cache[blk, off, h - num_heads]
                for d in range(dim):
                    store(dst, d, buf[d])
        if slot >= 0:
            v_src, v_dst = row[(num_heads + num_kv_heads) * dim:], v_cache[blk, off]
            for kh in range(num_kv_heads):
                src, dst = v_src[kh * dim:(kh + 1) * dim], v_dst[kh]
                for d in range(dim):
                    dst[d] = src[d]


@twin
def _rotary(q, k, positions, cos, sin):
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    half = dim // 2
    like = q[0, 0, 0]
    for t in prange(tokens):
        p = positions[t]
        buf = np.empty(dim, np.float32)
        for h in range(heads + kv_heads):
            for d in range(dim):
                buf[d] = load(q[t, h, d]) if h < heads else load(k[t, h - heads, d])
            _rotate(buf, like, cos, sin, p, half)
            for d in range(dim):
                if h < heads:
                    store(q, (t, h, d), buf[d])
                else:
                    store(k, (t, h - heads, d), buf[d])


@twin
def _silu_mul(out, x):
    tokens, n = out.shape
    for t in prange(tokens):
        for i in range(n):
            g = load(x[t, i])
            s = round_as(x[t, i], g / (np.float32(1.0) + exp_f32(-g)))
            store(out, (t, i), s * load(x[t, n + i]))


@twin
def _write_kv(k, v, k_cache, v_cache, slots):
    block_size = k_cache.shape[1]
    for t in prange(k.shape[0]):
        s = slots[t]
        if s < 0:
            continue
        b, o = s // block_size, s % block_size
        k_cache[b, o] = k[t]
        v_cache[b, o] = v[t]


# What a GEMM does to its input rows first (prologue_row): the op that would otherwise run as a kernel
# call of its own before it, at one or two rows per decode step costing more than its arithmetic.
NO_PROLOGUE, RMS_NORM, SILU_MUL = 0, 1, 2


@njit(inline="always", nogil=True, fastmath=FAST)
def prologue_row(op, x, r, weight, eps, xs):
    """xs [rows, K] float32, row r <- x's row r as it is (NO_PROLOGUE), RMS-normalized times weight
    (RMS_NORM), or silu(x[r, :K]) * x[r, K:] (SILU_MUL); rounded where rms_norm_kernel and _silu_mul round, so
    the GEMM sees the values those kernels would have written in x's type. Callers run it inside a prange
    over rows: LLVM vectorizes the exp there, not in a plain loop (~3 us against ~11 us for 1536 values)."""
    k = xs.shape[1]
    like = x[0, 0]
    if op == RMS_NORM:
        inv = _inv_rms(x, r, k, eps)
        for i in range(k):
            xs[r, i] = round_as(like, load(weight[i]) * round_as(like, load(x[r, i]) * inv))
    elif op == SILU_MUL:
        for i in range(k):
            g = load(x[r, i])
            s = round_as(like, g / (np.float32(1.0) + exp_f32(-g)))
            xs[r, i] = round_as(like, s * load(x[r, k + i]))
    else:
        for i in range(k):
            xs[r, i] = load(x[r, i])


@njit(inline="always", nogil=True, fastmath=FAST)
def _gemv_rows(xs, w, bias, residual, out, lo, hi):
    m, k = xs.shape
    for i in range(lo, hi):
        for r in range(m):
            s = np.float32(0.0)
            for j in range(k):
                s += load(w[i, j]) * xs[r, j]
            if bias.shape[0]:
                s += load(bias[i])
            if residual.shape[0]:
                s += load(residual[r, i])
            store(out, (r, i), s)


def _small_gemm(x, w, bias, residual, out, op, norm, eps):
    """out = prologue(x) @ w^T (+ bias) (+ residual) for a few rows of x: each weight row is streamed once
    from memory and dotted with every row of x (float32 accumulation, one rounding at the store); op,
    norm, eps: prologue_row'."""
    n, k = w.shape
    xs = np.empty((x.shape[0], k), np.float32)
    for r in prange(x.shape[0]):
        prologue_row(op, x, r, norm, eps, xs)
    chunks = min(n, 64)
    for c in prange(chunks):
        _gemv_rows(xs, w, bias, residual, out, c * n // chunks, (c + 1) * n // chunks)


_small_gemm_serial = njit(nogil=True, cache=True, fastmath=FAST)(_small_gemm)
_small_gemm_parallel = njit(nogil=True, cache=True, fastmath=FAST, parallel=True)(renamed(_small_gemm, "parallel"))
PARALLEL_GEMM_ELEMENTS = 100_000  # weights from which a small-batch GEMM splits its rows over threads


def small_gemm(x: np.ndarray, w: np.ndarray, bias: np.ndarray, residual: np.ndarray, out: np.ndarray,
               op: int = NO_PROLOGUE, norm: np.ndarray = NO_WEIGHT, eps: float = 0.0) -> None:
    """numba-ready arrays; bias and residual may be empty (shape[0] == 0) to skip them; op, norm, eps: what
    x goes through first (prologue_row)."""
    kernel = _small_gemm_parallel if w.shape[0] * w.shape[1] >= PARALLEL_GEMM_ELEMENTS else _small_gemm_serial
    kernel(x, w, bias, residual, out, op, norm, np.float32(eps))


@njit(parallel=True, fastmath=FAST, nogil=True, cache=True)
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
            b, o = slot // block_size, slot % block_size
            s = np.float32(0.0)
            for d in range(dim):
                s += load(q[query_start + i, h, d]) * load(k_cache[b, o, kh, d])
            s *= scale
            scores[t - lo] = s
            m = max(m, s)
        total = np.float32(0.0)
        for j in range(scores.shape[0]):
            scores[j] = exp_f32(scores[j] - m)
            total += scores[j]
        acc = np.zeros(dim, np.float32)
        for t in range(lo, pos + 1):
            slot = key_slots[t]
            b, o = slot // block_size, slot % block_size
            p = scores[t - lo] / total
            for d in range(dim):
                acc[d] += p * load(v_cache[b, o, kh, d])
        for d in range(dim):
            store(out, (query_start + i, h, d), acc[d])


# -- torch-facing wrappers ---------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if out is None:
        out = new_tensor(x2.shape, x.dtype)
    elif out.shape != x2.shape:
        out = out.view(x2.shape)
    rms_norm_kernel(x2.shape[0])(as_numba(out), as_numba(x2), as_numba(weight), np.float32(eps))
    return out if x2 is x else out.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None):
    """Returns (rms_norm(residual + x) * weight, residual + x); the residual argument is not modified."""
    residual = residual.clone()
    out = torch.empty_like(residual) if out is None else out
    _add_rms_norm(x.shape[0])(as_numba(out), as_numba(residual), as_numba(x.contiguous()), as_numba(weight),
                              np.float32(eps))
    return out, residual


def attention_inputs(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float, num_heads: int,
                     num_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                     q_out: torch.Tensor | None = None) -> torch.Tensor:
    """qkv: [tokens, (heads + 2 kv_heads) * head_dim] -> q [tokens, heads, head_dim]; k and v go to the cache."""
    dim = k_cache.shape[-1]
    if q_out is None:
        q_out = new_tensor((qkv.shape[0], num_heads, dim), qkv.dtype)
    qn = NO_WEIGHT if q_norm is None else as_numba(q_norm)
    kn = NO_WEIGHT if k_norm is None else as_numba(k_norm)
    _attention_inputs(qkv.shape[0])(as_numba(qkv), positions.numpy(), as_numba(cos), as_numba(sin), qn, kn,
                                    np.float32(eps), num_heads, num_kv_heads, as_numba(k_cache),
                                    as_numba(v_cache), slot_mapping.numpy(), as_numba(q_out))
    return q_out


def rotary_inplace(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> None:
    _rotary(q.shape[0])(as_numba(q), as_numba(k), positions.numpy(), as_numba(cos), as_numba(sin))


def silu_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    n = x.shape[-1] // 2
    out = new_tensor((*x.shape[:-1], n), x.dtype) if out is None else out
    x2 = x if x.dim() == 2 else x.reshape(-1, 2 * n)
    # the parallel build at every size: LLVM vectorizes its row loop (exp_f32 included) but not the
    # serial build's, which is slower even for one row
    _silu_mul.parallel(as_numba(out if out.dim() == 2 else out.view(-1, n)), as_numba(x2))
    return out


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    _write_kv(k.shape[0])(as_numba(k), as_numba(v), as_numba(k_cache), as_numba(v_cache), slot_mapping.numpy())


def prefill_attention(out, q, k_cache, v_cache, key_slots, query_start, query_len, context_len, window, scale):
    _prefill_attention(as_numba(out), as_numba(q), as_numba(k_cache), as_numba(v_cache), key_slots.numpy(),
                       query_start, query_len, context_len, window or 0, np.float32(scale))
