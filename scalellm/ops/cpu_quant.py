"""numba kernels over block-quantized weights: out = x @ W^T (+ bias) (+ residual) reading W's GGUF
blocks directly, and rows of W dequantized (the embedding lookup).

Activations stay float32 (the blocks are dequantized in registers, ops/quant_ir.py), so the result
differs from the float64 product of x and the dequantized W by float32 rounding only. Each weight row
is dotted with four rows of x at a time while its blocks are in registers; rows of W are split over
the threads. Formats are picked by a code at run time, so each kernel compiles once for all three.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from scalellm.ops.cpu_kernels import FAST, renamed
from scalellm.ops.numba_util import load, store
from scalellm.ops.quant_ir import make_dequant_row, make_row_dot

FORMAT_CODES = {"q8_0": 0, "q4_0": 1, "q4_1": 2}
PARALLEL_WEIGHTS = 100_000  # weight elements from which a call splits its rows over the threads

_Q8_1, _Q40_1, _Q41_1 = (make_row_dot(f, 1) for f in FORMAT_CODES)
_Q8_2, _Q40_2, _Q41_2 = (make_row_dot(f, 2) for f in FORMAT_CODES)
_Q8_4, _Q40_4, _Q41_4 = (make_row_dot(f, 4) for f in FORMAT_CODES)
_Q8_DQ, _Q40_DQ, _Q41_DQ = (make_dequant_row(f) for f in FORMAT_CODES)


@njit(inline="always", nogil=True)
def _dot1(fmt, q, d, m, x, stride, xsum, nb):
    if fmt == 0:
        return _Q8_1(q, d, m, x, stride, xsum, nb)
    if fmt == 1:
        return _Q40_1(q, d, m, x, stride, xsum, nb)
    return _Q41_1(q, d, m, x, stride, xsum, nb)


@njit(inline="always", nogil=True)
def _dot2(fmt, q, d, m, x, stride, xsum, nb):
    if fmt == 0:
        return _Q8_2(q, d, m, x, stride, xsum, nb)
    if fmt == 1:
        return _Q40_2(q, d, m, x, stride, xsum, nb)
    return _Q41_2(q, d, m, x, stride, xsum, nb)


@njit(inline="always", nogil=True)
def _dot4(fmt, q, d, m, x, stride, xsum, nb):
    if fmt == 0:
        return _Q8_4(q, d, m, x, stride, xsum, nb)
    if fmt == 1:
        return _Q40_4(q, d, m, x, stride, xsum, nb)
    return _Q41_4(q, d, m, x, stride, xsum, nb)


@njit(nogil=True, fastmath=FAST)  # not inline="always": numba's IR inlining mixes up two inlined copies
def _finish(out, r, col, n, value, bias, residual):
    total = value
    if bias.shape[0]:
        total += load(bias[n])
    if residual.shape[0]:
        total += load(residual[r, col])
    store(out, (r, col), total)


def _quant_gemm(fmt, x, qs, d, mins, bias, residual, out, col0):
    """x: float32 [M, K] C-contiguous; qs/d/mins: one weight's blocks [N, ...]; writes out[:, col0:col0+N]
    (and reads residual there); bias [N] or empty, residual like out or empty."""
    rows, k = x.shape
    n_out = qs.shape[0]
    nb = k // 32
    chunks = min(n_out, 64)
    xsum = np.empty((rows, nb), np.float32)
    if fmt != 0:
        for r in range(rows):
            for b in range(nb):
                total = np.float32(0.0)
                for j in range(32):
                    total += x[r, b * 32 + j]
                xsum[r, b] = total
    xa, sa = x.ctypes.data, xsum.ctypes.data
    qa, da, ma = qs.ctypes.data, d.ctypes.data, mins.ctypes.data
    q_row, d_row = qs.strides[0], d.strides[0]
    for c in prange(chunks):
        for n in range(c * n_out // chunks, (c + 1) * n_out // chunks):
            q, s, mn = qa + n * q_row, da + n * d_row, ma + n * d_row
            col = col0 + n
            r = 0
            while r + 4 <= rows:
                v = _dot4(fmt, q, s, mn, xa + r * k * 4, k, sa + r * nb * 4, nb)
                for t in range(4):
                    _finish(out, r + t, col, n, v[t], bias, residual)
                r += 4
            if r + 2 <= rows:
                v2 = _dot2(fmt, q, s, mn, xa + r * k * 4, k, sa + r * nb * 4, nb)
                _finish(out, r, col, n, v2[0], bias, residual)
                _finish(out, r + 1, col, n, v2[1], bias, residual)
                r += 2
            if r < rows:
                _finish(out, r, col, n, _dot1(fmt, q, s, mn, xa + r * k * 4, k, sa + r * nb * 4, nb)[0], bias, residual)


_gemm_serial = njit(nogil=True, cache=True, fastmath=FAST)(_quant_gemm)
_gemm_parallel = njit(nogil=True, cache=True, fastmath=FAST, parallel=True)(renamed(_quant_gemm, "parallel"))


def quant_gemm(fmt: str, x: np.ndarray, qs: np.ndarray, d: np.ndarray, mins: np.ndarray, bias: np.ndarray,
               residual: np.ndarray, out: np.ndarray, col0: int = 0) -> None:
    parallel = qs.shape[0] * x.shape[1] >= PARALLEL_WEIGHTS
    (_gemm_parallel if parallel else _gemm_serial)(FORMAT_CODES[fmt], x, qs, d, mins, bias, residual, out, col0)


def _dequant_rows(fmt, qs, d, mins, ids, out):
    """out[i] = row ids[i] of the weight, as float32 (out: [len(ids), K] C-contiguous)."""
    nb = out.shape[1] // 32
    qa, da, ma, oa = qs.ctypes.data, d.ctypes.data, mins.ctypes.data, out.ctypes.data
    for i in prange(ids.shape[0]):
        n = ids[i]
        q, s, mn, o = qa + n * qs.strides[0], da + n * d.strides[0], ma + n * d.strides[0], oa + i * out.strides[0]
        if fmt == 0:
            _Q8_DQ(q, s, mn, o, nb)
        elif fmt == 1:
            _Q40_DQ(q, s, mn, o, nb)
        else:
            _Q41_DQ(q, s, mn, o, nb)


_dequant_serial = njit(nogil=True, cache=True)(_dequant_rows)
_dequant_parallel = njit(nogil=True, cache=True, parallel=True)(renamed(_dequant_rows, "parallel"))


def dequant_rows(fmt: str, qs: np.ndarray, d: np.ndarray, mins: np.ndarray, ids: np.ndarray,
                 out: np.ndarray) -> None:
    parallel = ids.shape[0] * out.shape[1] >= PARALLEL_WEIGHTS
    (_dequant_parallel if parallel else _dequant_serial)(FORMAT_CODES[fmt], qs, d, mins, ids, out)
