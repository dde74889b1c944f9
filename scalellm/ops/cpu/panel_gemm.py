"""Small-batch bfloat16 GEMMs over a weight packed in panels of 16 output columns.

A decode step's projections at a few rows are bound by streaming the weight from memory. Here the
weight is packed once, at load, into panels of 16 output columns: panel p holds, for every pair of
input columns (k, k + 1), the 16 columns' two weights side by side ([K / 2, 16] pairs, 64 bytes per
pair). A 64-byte line of the weight widens to two float32 vectors (a shift, a mask) and each
multiplies one broadcast input value into that row's 16 outputs: no horizontal sums, each line
used by every row of the batch while it is in a register. The products are exact and summed in
float32 (the order differs from a plain dot product, as in any blocked GEMM). Rows go through the
panel two at a time (accumulators in registers; Linear sends it one or two rows, as oneDNN's AMX
kernels win from three on), the threads split the panels. The IR is generic LLVM vector code: no
instruction set is named.
"""
from __future__ import annotations

import hashlib
import inspect

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from scalellm.ops.cpu.attention_ir import fma, splat
from scalellm.ops.cpu.kernels import NO_PROLOGUE, NO_WEIGHT, prologue_row, twin
from scalellm.ops.cpu.numba_util import keep_alive, load, store

LANES = 16  # output columns per panel (float32 lanes of one vector)
PREFETCH_LINES = 16  # 64-byte weight lines ahead of the one in use that the kernel asks memory for (0: none)
_I32, _I64, _F32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
_V16I, _V16F = ir.VectorType(_I32, 16), ir.VectorType(_F32, 16)


def pack(weight: torch.Tensor) -> np.ndarray:
    """A bfloat16 weight [N, K] (K even) -> int32 [ceil(N / 16), K / 2, 16]: panel p, pair j, lane l holds
    weight[16p + l, 2j] in its low half and weight[16p + l, 2j + 1] in its high half (zeros past N)."""
    n, k = weight.shape
    panels = -(-n // LANES)
    padded = torch.zeros(panels * LANES, k, dtype=torch.bfloat16)
    padded[:n] = weight
    pairs = padded.view(panels, LANES, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    return pairs.view(torch.int32).view(panels, k // 2, LANES).numpy()


def _make_panel_dot(rows: int):
    """An intrinsic (w, x, pairs, acc, acc_stride): acc[r, :16] = sum over j < pairs of weight line w[j]
    (16 lanes of bfloat16 pairs) times x[r, 2j] (the pairs' low halves) and x[r, 2j + 1] (the high ones),
    for r < rows. w, x and acc are addresses (int32 panel lines; float32 rows of 2 * pairs values holding
    bfloat16 values; float32 rows acc_stride floats apart). The halves widen to float32 exactly (a shift,
    a mask) and go through float32 multiply-adds with the broadcast inputs: on the CPUs measured this
    beats vdpbf16ps, whose throughput there is a fraction of two FMA ports'. Each row keeps two
    accumulators (the halves' chains run side by side)."""

    def panel_dot(typingctx, w, x, pairs, acc, acc_stride):
        sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            w_p = builder.inttoptr(args[0], _V16I.as_pointer())
            x_p = builder.inttoptr(args[1], _F32.as_pointer())
            pairs, acc_p = args[2], builder.inttoptr(args[3], _F32.as_pointer())
            zero = ir.Constant(_V16F, [0.0] * 16)
            slots = [[cgutils.alloca_once_value(builder, zero) for _ in range(2)] for _ in range(rows)]
            x_rows = [builder.gep(x_p, [builder.mul(pairs, ir.Constant(_I64, 2 * r))]) for r in range(rows)]
            prefetch = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [
                ir.IntType(8).as_pointer(), _I32, _I32, _I32]), "llvm.prefetch.p0")
            with cgutils.for_range(builder, pairs) as loop:
                j = loop.index
                if PREFETCH_LINES:
                    ahead = builder.bitcast(builder.gep(w_p, [builder.add(j, ir.Constant(_I64, PREFETCH_LINES))]),
                                            ir.IntType(8).as_pointer())
                    builder.call(prefetch, [ahead, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
                line = builder.load(builder.gep(w_p, [j]), align=64)
                halves = (builder.bitcast(builder.shl(line, ir.Constant(_V16I, [16] * 16)), _V16F),
                          builder.bitcast(builder.and_(line, ir.Constant(_V16I, [-65536] * 16)), _V16F))
                at = builder.mul(j, ir.Constant(_I64, 2))
                for r in range(rows):
                    for h in range(2):
                        value = builder.load(builder.gep(x_rows[r], [builder.add(at, ir.Constant(_I64, h))]))
                        slot = slots[r][h]
                        builder.store(fma(builder, halves[h], splat(builder, value), builder.load(slot)), slot)
            for r in range(rows):
                total = builder.fadd(builder.load(slots[r][0]), builder.load(slots[r][1]))
                dst = builder.gep(acc_p, [builder.mul(args[4], ir.Constant(_I64, r))])
                builder.store(total, builder.bitcast(dst, _V16F.as_pointer()), align=4)
            return context.get_dummy_value()
        return sig, codegen
    panel_dot.__name__ = panel_dot.__qualname__ = f"panel_dot_{rows}"
    return intrinsic(panel_dot)


_DOT2, _DOT1 = _make_panel_dot(2), _make_panel_dot(1)


@njit(inline="always", nogil=True)
def _panel_rows(w_at, x_at, pairs, acc_at, stride, rows):
    """Every row of x through one panel, two at a time."""
    for r in range(0, rows - 1, 2):
        _DOT2(w_at, x_at + 8 * r * pairs, pairs, acc_at + 4 * r * stride, stride)
    if rows % 2:
        _DOT1(w_at, x_at + 8 * (rows - 1) * pairs, pairs, acc_at + 4 * (rows - 1) * stride, stride)


def _panel_gemm(x, w, bias, residual, out, op, norm, eps):
    """out = prologue(x) @ W^T (+ bias) (+ residual), W packed by pack(); op, norm, eps: prologue_row's.
    bias and residual may be empty (shape[0] == 0)."""
    rows, n = x.shape[0], out.shape[1]
    panels, pairs = w.shape[0], w.shape[1]
    xs = np.empty((rows, 2 * pairs), np.float32)
    for r in prange(rows):
        prologue_row(op, x, r, norm, eps, xs)
    acc = np.empty((rows, LANES * panels), np.float32)
    w_base, x_at, acc_base = w.ctypes.data, xs.ctypes.data, acc.ctypes.data
    stride = LANES * panels
    for p in prange(panels):
        _panel_rows(w_base + 64 * pairs * p, x_at, pairs, acc_base + 4 * LANES * p, stride, rows)
        for r in range(rows):
            for i in range(LANES * p, min(n, LANES * (p + 1))):
                s = acc[r, i]
                if bias.shape[0]:
                    s += load(bias[i])
                if residual.shape[0]:
                    s += load(residual[r, i])
                store(out, (r, i), s)
    keep_alive(xs, acc, w)


# numba's disk cache checks only this file's source; the intrinsics' IR comes from attention_ir too
_IR = hashlib.sha1((inspect.getsource(fma) + inspect.getsource(splat)).encode()).hexdigest()[:8]
_panel_gemm.__qualname__ = _panel_gemm.__name__ = f"_panel_gemm_{_IR}"
panel_gemm_kernel = twin(_panel_gemm)  # .serial and .parallel builds
PARALLEL_PANELS = 8  # panels from which the kernel splits them over threads


def panel_gemm(x: np.ndarray, w: np.ndarray, bias: np.ndarray, residual: np.ndarray, out: np.ndarray,
               op: int = NO_PROLOGUE, norm: np.ndarray = NO_WEIGHT, eps: float = 0.0) -> None:
    """numba-ready arrays: x [rows, K] (bfloat16 bits), w from pack(), out [rows, N] bfloat16 bits; the
    rest as kernels.small_gemm's."""
    build = panel_gemm_kernel.parallel if w.shape[0] >= PARALLEL_PANELS else panel_gemm_kernel.serial
    build(x, w, bias, residual, out, op, norm, np.float32(eps))
