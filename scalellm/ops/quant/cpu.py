"""numba kernels over block-quantized weights: out = x @ W^T (+ bias) (+ residual) reading W's GGUF
blocks directly, and rows of W dequantized (the embedding lookup).

Two GEMMs (ops/quant/ir.py has their inner loops):
- int8 (bfloat16 activations on CPUs with AVX512-VNNI): each row of x is quantized per 32-element block to
  int8 with a float32 scale, as llama.cpp does for these formats, and each block product is an integer
  dot product. The result equals the float64 product of the quantized x and the dequantized W up to
  float32 rounding. Q8_0 and Q4_0 weights grouped by 16 rows have a kernel of their own (grouped_gemm).
- float (float32 activations, CPUs without VNNI, or SCALELLM_QUANT_INT8=0): x stays float32 and the
  blocks are dequantized in registers; the result equals the float64 product of x and the dequantized W
  up to float32 rounding. quant_linear.uses_int8 picks.
Each weight row is dotted with four rows of x at a time while its blocks are in registers; rows of W
are split over the threads. Formats are picked by a code at run time, so each kernel compiles once.
"""
from __future__ import annotations

import hashlib
import inspect
import os

import numpy as np
from numba import njit, prange

from scalellm.ops.cpu.kernels import FAST, NO_PROLOGUE, NO_WEIGHT, prologue_row, renamed
from scalellm.ops.cpu.numba_util import keep_alive, load, store
from scalellm.ops.quant import ir as quant_ir
from scalellm.ops.quant.ir import (GROUP_ROWS, half_to_f32, host_has_vnni, make_dequant_row,
                                   make_grouped_dot, make_row_dot, make_row_dot_i8)

FORMAT_CODES = {"q8_0": 0, "q4_0": 1, "q4_1": 2}
# how activations are quantized to int8 (_quantize_row): signed bytes with xo = scale * sum; unsigned
# bytes q + 128 (Q8_0's row kernel), xo as for SIGNED; signed bytes with xo = the sum alone (grouped Q8_0)
SIGNED, BIASED, SIGNED_SUM = 0, 1, 2
PARALLEL_WEIGHTS = 100_000  # weight elements from which a call splits its rows over the threads
PARALLEL_ROWS = 64  # rows from which a lookup does (the engine's warm-up prefill, 96 rows, compiles that build)
INT8 = host_has_vnni() and os.environ.get("SCALELLM_QUANT_INT8", "1") != "0"
# numba's disk cache checks only the source file of the function it caches, not the IR the intrinsics
# generate in quant/ir.py: the kernels' cached names carry a hash of that file, so a change there
# compiles them afresh.
_IR = hashlib.sha1(inspect.getsource(quant_ir).encode()).hexdigest()[:10]


def _builds(fn):
    """Serial and parallel builds of a kernel that calls the intrinsics."""
    serial = njit(nogil=True, cache=True, fastmath=FAST)(renamed(fn, _IR))
    return serial, njit(nogil=True, cache=True, fastmath=FAST, parallel=True)(renamed(fn, f"parallel_{_IR}"))


# (float, int8) x (q8_0, q4_0, q4_1) for 1, 2 and 4 rows of x; index [int8 * 3 + format code]
_F1, _F2, _F4 = ([make_row_dot(f, t) for f in FORMAT_CODES] for t in (1, 2, 4))
_I1, _I2, _I4 = ([make_row_dot_i8(f, t) for f in FORMAT_CODES] for t in (1, 2, 4))
_F1_Q8, _F1_Q40, _F1_Q41 = _F1
_F2_Q8, _F2_Q40, _F2_Q41 = _F2
_F4_Q8, _F4_Q40, _F4_Q41 = _F4
_I1_Q8, _I1_Q40, _I1_Q41 = _I1
_I2_Q8, _I2_Q40, _I2_Q41 = _I2
_I4_Q8, _I4_Q40, _I4_Q41 = _I4
_Q8_DQ, _Q40_DQ, _Q41_DQ = (make_dequant_row(f) for f in FORMAT_CODES)


@njit(inline="always", nogil=True)
def _dot1(kind, q, d, m, x, stride, a, b, nb):
    if kind == 0:
        return _F1_Q8(q, d, m, x, stride, a, b, nb)
    if kind == 1:
        return _F1_Q40(q, d, m, x, stride, a, b, nb)
    if kind == 2:
        return _F1_Q41(q, d, m, x, stride, a, b, nb)
    if kind == 3:
        return _I1_Q8(q, d, m, x, stride, a, b, nb)
    if kind == 4:
        return _I1_Q40(q, d, m, x, stride, a, b, nb)
    return _I1_Q41(q, d, m, x, stride, a, b, nb)


@njit(inline="always", nogil=True)
def _dot2(kind, q, d, m, x, stride, a, b, nb):
    if kind == 0:
        return _F2_Q8(q, d, m, x, stride, a, b, nb)
    if kind == 1:
        return _F2_Q40(q, d, m, x, stride, a, b, nb)
    if kind == 2:
        return _F2_Q41(q, d, m, x, stride, a, b, nb)
    if kind == 3:
        return _I2_Q8(q, d, m, x, stride, a, b, nb)
    if kind == 4:
        return _I2_Q40(q, d, m, x, stride, a, b, nb)
    return _I2_Q41(q, d, m, x, stride, a, b, nb)


@njit(inline="always", nogil=True)
def _dot4(kind, q, d, m, x, stride, a, b, nb):
    if kind == 0:
        return _F4_Q8(q, d, m, x, stride, a, b, nb)
    if kind == 1:
        return _F4_Q40(q, d, m, x, stride, a, b, nb)
    if kind == 2:
        return _F4_Q41(q, d, m, x, stride, a, b, nb)
    if kind == 3:
        return _I4_Q8(q, d, m, x, stride, a, b, nb)
    if kind == 4:
        return _I4_Q40(q, d, m, x, stride, a, b, nb)
    return _I4_Q41(q, d, m, x, stride, a, b, nb)


@njit(inline="always", nogil=True, fastmath=FAST)
def _quantize_row(x, r, form, xq, xd, xo):
    """Each 32-element block of x's row r (float32 or bfloat16 bits) -> int8 values round(x / s) with
    s = max|x| / 127: xq gets their bytes (plus 128 when form is BIASED, Q8_0's unsigned form), xd the
    scales, xo scale * sum (the sum alone when form is SIGNED_SUM: an integer, exact in float32)."""
    block = np.empty(32, np.float32)
    for b in range(xd.shape[1]):
        amax = np.float32(0.0)
        for j in range(32):
            block[j] = load(x[r, b * 32 + j])
            amax = max(amax, abs(block[j]))
        scale = amax / np.float32(127.0)
        inv = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
        total = 0
        for j in range(32):
            q = int(np.rint(block[j] * inv))
            total += q
            xq[r, b * 32 + j] = (q + 128) if form == BIASED else (q & 255)
        xd[r, b] = scale
        xo[r, b] = np.float32(total) if form == SIGNED_SUM else scale * np.float32(total)


@njit(nogil=True, fastmath=FAST)
def quantize_activations(x, form, xq, xd, xo):
    """_quantize_row for every row of x ([rows, K])."""
    for r in range(x.shape[0]):
        _quantize_row(x, r, form, xq, xd, xo)


@njit(inline="always", nogil=True, fastmath=FAST)
def _block_sums(x, r, sums):
    for b in range(sums.shape[1]):
        total = np.float32(0.0)
        for j in range(32):
            total += x[r, b * 32 + j]
        sums[r, b] = total


@njit(inline="always", nogil=True, fastmath=FAST)
def _activations(int8, fmt, form, x, op, norm, eps, nb):
    """The activations' rows made ready -> (xs, xq, xd, xo): the prologue into xs (when op), then int8
    quantized as `form` (xq, xd, xo), or (float kernel) block sums into xd. In a prange: see prologue_row."""
    rows, k = x.shape[0], nb * 32
    xs = np.empty((rows if op != NO_PROLOGUE else 0, k), np.float32)
    xq = np.empty((rows, k if int8 else 0), np.uint8)
    xd = np.empty((rows, nb), np.float32)
    xo = np.empty((rows, nb), np.float32)
    for r in prange(rows):
        if op != NO_PROLOGUE:
            prologue_row(op, x, r, norm, eps, xs)
            if int8:
                _quantize_row(xs, r, form, xq, xd, xo)
            elif fmt != 0:
                _block_sums(xs, r, xd)
        elif int8:
            _quantize_row(x, r, form, xq, xd, xo)
        elif fmt != 0:
            _block_sums(x, r, xd)
    return xs, xq, xd, xo


@njit(inline="always", nogil=True)
def _store_output(out, row, n, col0, total, bias, residual):
    """out[row, col0 + n] = total (+ bias[n]) (+ residual[row, col0 + n]); empty bias/residual skip."""
    if bias.shape[0] > 0:
        total += load(bias[n])
    if residual.shape[0] > 0:
        total += load(residual[row, col0 + n])
    store(out, (row, col0 + n), total)


def _quant_gemm(int8, fmt, x, qs, d, mins, bias, residual, out, col0, op, norm, eps):
    """x: [M, K] (float32 C-contiguous; bfloat16 bits too when int8 or op); qs/d/mins: one weight's blocks
    [N, ...]; writes out[:, col0:col0+N] (and reads residual there); bias [N] or empty, residual like out
    or empty; op, norm, eps: what x goes through first (cpu_kernels.prologue_row; x is [M, 2K] for
    SILU_MUL). int8: activations quantized per block (xq, xd, xo); else float32, with block sums in xd."""
    rows = x.shape[0]
    n_out, nb = qs.shape[0], d.shape[1]
    k = nb * 32
    xs, xq, xd, xo = _activations(int8, fmt, BIASED if fmt == 0 else SIGNED, x, op, norm, eps, nb)
    if int8:
        xa, width = xq.ctypes.data, 1
    else:
        xa, width = (xs.ctypes.data if op != NO_PROLOGUE else x.ctypes.data), 4
    kind = 3 * int8 + fmt
    xda, xoa = xd.ctypes.data, xo.ctypes.data
    qa, da, ma = qs.ctypes.data, d.ctypes.data, mins.ctypes.data
    q_row, d_row = qs.strides[0], d.strides[0]
    chunks = min(n_out, 64)
    for c in prange(chunks):
        vals = np.empty(4, np.float32)
        for n in range(c * n_out // chunks, (c + 1) * n_out // chunks):
            q, s, mn = qa + n * q_row, da + n * d_row, ma + n * d_row
            r = 0
            while r < rows:
                left = rows - r
                at_x, at_s = xa + r * k * width, r * nb * 4
                if left >= 4:
                    v = _dot4(kind, q, s, mn, at_x, k, xda + at_s, xoa + at_s, nb)
                    vals[0], vals[1], vals[2], vals[3] = v[0], v[1], v[2], v[3]
                    got = 4
                elif left >= 2:
                    v2 = _dot2(kind, q, s, mn, at_x, k, xda + at_s, xoa + at_s, nb)
                    vals[0], vals[1] = v2[0], v2[1]
                    got = 2
                else:
                    vals[0] = _dot1(kind, q, s, mn, at_x, k, xda + at_s, xoa + at_s, nb)[0]
                    got = 1
                for t in range(got):
                    _store_output(out, r + t, n, col0, vals[t], bias, residual)
                r += got
    return keep_alive(xq, xd, xo) + xs.shape[0]  # the loop reads them through raw addresses, which hold no reference


_gemm_serial, _gemm_parallel = _builds(_quant_gemm)

# grouped kernels for 1, 2 and 4 rows of x; index [format code] (Q8_0 0, Q4_0 1)
_G1, _G2, _G4 = ([make_grouped_dot(f, t) for f in ("q8_0", "q4_0")] for t in (1, 2, 4))
_G1_Q8, _G1_Q40 = _G1
_G2_Q8, _G2_Q40 = _G2
_G4_Q8, _G4_Q40 = _G4


@njit(inline="always", nogil=True)
def _grouped_dot(fmt, rows, q, s, x, stride, xd, xo, nb, out):
    if rows >= 4:
        if fmt == 0:
            _G4_Q8(q, s, x, stride, xd, xo, nb, out)
        else:
            _G4_Q40(q, s, x, stride, xd, xo, nb, out)
        return 4
    if rows >= 2:
        if fmt == 0:
            _G2_Q8(q, s, x, stride, xd, xo, nb, out)
        else:
            _G2_Q40(q, s, x, stride, xd, xo, nb, out)
        return 2
    if fmt == 0:
        _G1_Q8(q, s, x, stride, xd, xo, nb, out)
    else:
        _G1_Q40(q, s, x, stride, xd, xo, nb, out)
    return 1


def _grouped_gemm(fmt, x, qs, d, bias, residual, out, col0, op, norm, eps):
    """_quant_gemm's int8 kernel for Q8_0 or Q4_0 weights grouped by GROUP_ROWS (16) rows
    (QuantizedTensor.grouped): qs [N / 16, blocks * 64 * vectors], d [N / 16, blocks * 16] (float16 bits);
    each group's 16 outputs per x row come out of one call together."""
    rows, groups = x.shape[0], qs.shape[0]
    nb = d.shape[1] // GROUP_ROWS
    k = nb * 32
    xs, xq, xd, xo = _activations(True, fmt, SIGNED_SUM if fmt == 0 else SIGNED, x, op, norm, eps, nb)
    xa, xda, xoa, qa, da = xq.ctypes.data, xd.ctypes.data, xo.ctypes.data, qs.ctypes.data, d.ctypes.data
    q_row, d_row = qs.strides[0], d.strides[0]
    chunks = min(groups, 64)
    for c in prange(chunks):
        vals = np.empty(4 * GROUP_ROWS, np.float32)
        va = vals.ctypes.data
        for g in range(c * groups // chunks, (c + 1) * groups // chunks):
            r = 0
            while r < rows:
                got = _grouped_dot(fmt, rows - r, qa + g * q_row, da + g * d_row, xa + r * k, k, xda + r * nb * 4,
                                   xoa + r * nb * 4, nb, va)
                for t in range(got):
                    for lane in range(GROUP_ROWS):
                        _store_output(out, r + t, g * GROUP_ROWS + lane, col0, vals[t * GROUP_ROWS + lane], bias,
                                      residual)
                r += got
    return keep_alive(xq, xd, xo) + xs.shape[0]


_grouped_serial, _grouped_parallel = _builds(_grouped_gemm)


def grouped_gemm(fmt: str, x: np.ndarray, qs: np.ndarray, d: np.ndarray, bias: np.ndarray, residual: np.ndarray,
                 out: np.ndarray, col0: int = 0, op: int = NO_PROLOGUE, norm: np.ndarray = NO_WEIGHT,
                 eps: float = 0.0) -> None:
    """quant_gemm for Q8_0 or Q4_0 grouped by 16 rows, on the int8 kernel (x float32 or bfloat16 bits)."""
    parallel = qs.shape[0] * d.shape[1] * 32 >= PARALLEL_WEIGHTS
    (_grouped_parallel if parallel else _grouped_serial)(FORMAT_CODES[fmt], x, qs, d, bias, residual, out, col0, op,
                                                         norm, np.float32(eps))


def quant_gemm(fmt: str, x: np.ndarray, qs: np.ndarray, d: np.ndarray, mins: np.ndarray, bias: np.ndarray,
               residual: np.ndarray, out: np.ndarray, col0: int = 0, int8: bool | None = None,
               op: int = NO_PROLOGUE, norm: np.ndarray = NO_WEIGHT, eps: float = 0.0) -> None:
    """int8: the int8 GEMM (default where the CPU has it, INT8; x float32 or bfloat16 bits) or the float
    one (x float32, C-contiguous, or bfloat16 bits with a prologue); op, norm, eps: what x goes through
    first (cpu_kernels.prologue_row)."""
    parallel = qs.shape[0] * d.shape[1] * 32 >= PARALLEL_WEIGHTS
    kernel = _gemm_parallel if parallel else _gemm_serial
    kernel(INT8 if int8 is None else int8, FORMAT_CODES[fmt], x, qs, d, mins, bias, residual, out, col0, op, norm,
           np.float32(eps))


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


_dequant_serial, _dequant_parallel = _builds(_dequant_rows)


def dequant_rows(fmt: str, qs: np.ndarray, d: np.ndarray, mins: np.ndarray, ids: np.ndarray,
                 out: np.ndarray) -> None:
    parallel = ids.shape[0] >= PARALLEL_ROWS
    (_dequant_parallel if parallel else _dequant_serial)(FORMAT_CODES[fmt], qs, d, mins, ids, out)


def _dequant_grouped_rows(fmt, qs, d, ids, out):
    """dequant_rows for Q8_0 or Q4_0 grouped by 16 rows (d: float16 bits, uint16)."""
    nb = out.shape[1] // 32
    width = GROUP_ROWS * (32 if fmt == 0 else 16)  # bytes per block of a group (QUANT_BYTES per row)
    for i in prange(ids.shape[0]):
        g, lane = ids[i] // GROUP_ROWS, ids[i] % GROUP_ROWS
        for b in range(nb):
            scale = half_to_f32(d[g, b * GROUP_ROWS + lane])
            base = b * width + lane * 4
            if fmt == 0:
                for j in range(32):
                    byte = np.int32(qs[g, base + (j // 4) * 64 + j % 4])
                    out[i, b * 32 + j] = scale * np.float32(byte - 128)
            else:
                for j in range(16):
                    byte = np.int32(qs[g, base + (j // 4) * 64 + j % 4])
                    out[i, b * 32 + j] = scale * np.float32((byte & 15) - 8)
                    out[i, b * 32 + 16 + j] = scale * np.float32((byte >> 4) - 8)


_grouped_dequant_serial, _grouped_dequant_parallel = _builds(_dequant_grouped_rows)


def dequant_grouped_rows(fmt: str, qs: np.ndarray, d: np.ndarray, ids: np.ndarray, out: np.ndarray) -> None:
    """Rows ids (the weight's own row numbers) of a grouped Q8_0/Q4_0 weight -> out [len(ids), K] float32."""
    parallel = ids.shape[0] >= PARALLEL_ROWS
    (_grouped_dequant_parallel if parallel else _grouped_dequant_serial)(FORMAT_CODES[fmt], qs, d, ids, out)
