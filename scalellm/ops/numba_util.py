"""Element access shared by the numba kernels: float32 arrays pass through; bfloat16 arrays arrive as
uint16 bit patterns, widened on load and rounded to nearest-even on store (as torch rounds)."""
from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


@intrinsic
def bits_to_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def f32_to_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


def load(x):
    """An element as float32 (numba-compiled code only)."""
    raise TypeError("load is only callable from numba-compiled code")


def store(array, index, value):
    """array[index] = value, rounding float32 to the array's element type (numba-compiled code only)."""
    raise TypeError("store is only callable from numba-compiled code")


def round_as(like, value):
    """value rounded to the element type of `like` (a scalar of the array) and widened back."""
    raise TypeError("round_as is only callable from numba-compiled code")


@overload(round_as, inline="always")
def _round_as_impl(like, value):
    if like == types.uint16:
        def via_bf16(like, value):
            v = np.float32(value)
            if v != v:
                return v
            bits = f32_to_bits(v)
            return bits_to_f32(((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16) << 16)
        return via_bf16
    return lambda like, value: np.float32(value)


@overload(load, inline="always")
def _load_impl(x):
    if x == types.uint16:
        return lambda x: bits_to_f32(np.uint32(x) << 16)
    return lambda x: np.float32(x)


@overload(store, inline="always")
def _store_impl(array, index, value):
    if array.dtype == types.uint16:
        def to_bf16(array, index, value):
            v = np.float32(value)
            if v != v:
                array[index] = np.uint16(0x7FC0)
            else:
                bits = f32_to_bits(v)
                array[index] = np.uint16((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16)
        return to_bf16

    def plain(array, index, value):
        array[index] = value
    return plain


def as_numba(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array over the same memory (bfloat16 as uint16 bits, strides kept)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype in (torch.float32, torch.int32, torch.int64):
        return t.numpy()
    raise TypeError(f"numba kernels support float32 and bfloat16, not {t.dtype}")
