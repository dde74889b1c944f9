"""Element access shared by the numba kernels: float32 arrays pass through; bfloat16 arrays arrive as
16-bit integer bit patterns (int16 from as_numba, uint16 accepted too), widened on load and rounded to
nearest-even on store (as torch rounds)."""
from __future__ import annotations

import math

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
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


@njit(inline="always", nogil=True, fastmath={"contract", "nsz", "arcp"})
def exp_f32(x):
    """exp(x) in float32 that LLVM can vectorize (libm's exp is a call per element): Cody-Waite
    reduction by ln 2 and a polynomial; relative error under 3e-7. Inputs are clamped to [-87, 88],
    so exp(-inf) gives ~1e-38 rather than 0 and large inputs stay finite."""
    x = min(max(np.float32(x), np.float32(-87.0)), np.float32(88.0))
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693359375)
    r = r - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * bits_to_f32(np.uint32((np.int32(n) + np.int32(127)) << 23))


def load(x):
    """An element as float32 (numba-compiled code only)."""
    raise TypeError("load is only callable from numba-compiled code")


def store(array, index, value):
    """array[index] = value, rounding float32 to the array's element type (numba-compiled code only)."""
    raise TypeError("store is only callable from numba-compiled code")


def round_as(like, value):
    """value rounded to the element type of `like` (a scalar of the array) and widened back."""
    raise TypeError("round_as is only callable from numba-compiled code")


_BF16_BITS = (types.uint16, types.int16)


@overload(round_as, inline="always")
def _round_as_impl(like, value):
    if like in _BF16_BITS:
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
    if x == types.int16:
        return lambda x: bits_to_f32(np.uint32(np.uint16(x)) << 16)
    return lambda x: np.float32(x)


@overload(store, inline="always")
def _store_impl(array, index, value):
    if array.dtype in _BF16_BITS:
        bits_type = array.dtype

        def to_bf16(array, index, value):
            v = np.float32(value)
            if v != v:
                array[index] = bits_type(0x7FC0)
            else:
                bits = f32_to_bits(v)
                array[index] = bits_type((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16)
        return to_bf16

    def plain(array, index, value):
        array[index] = value
    return plain


@njit(nogil=True)
def keep_alive(a, b, c):
    """A use of arrays after code that reads them only through .ctypes.data addresses: numba frees an
    array after its last use, and an address is not one."""
    return a.shape[0] + b.shape[0] + c.shape[0]


def as_numba(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array over the same memory (bfloat16 as int16 bits, strides kept)."""
    kept = t.__dict__.get("_numba_view")
    if kept is not None:
        return kept
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    if t.dtype in (torch.float32, torch.int32, torch.int64):
        return t.numpy()
    raise TypeError(f"numba kernels support float32 and bfloat16, not {t.dtype}")


_NUMPY_TYPES = {torch.bfloat16: np.int16, torch.float32: np.float32}


ALIGN_TENSORS = True  # new_tensor's memory starts on a 64-byte boundary (False: numpy's own, for comparisons)
# from this size: realigning costs ~2.7 us a tensor, more than it saves on the small batches' tensors
# (their projections are the panel kernel's, which does not care; batch 16 measured even)
ALIGN_BYTES = 64 << 10


def new_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor (bfloat16 or float32) that remembers its numpy view, so as_numba on it
    costs a lookup: a kernel's output is usually the next kernel's input, and converting a fresh tensor
    costs more than many of the kernels at one row. From ALIGN_BYTES on, the memory starts on a 64-byte
    boundary: numpy's arrays start 32 bytes off one here, and oneDNN's AMX kernels read a misaligned input
    up to ~40% slower (bench/results/step_profile_aligned.md). (Not torch.empty: its numpy view would go through
    Tensor.numpy, which the CUDA step's tests count as a host sync.)"""
    np_dtype = _NUMPY_TYPES[dtype]
    array = np.empty(shape, np_dtype)
    t = torch.from_numpy(array)
    if ALIGN_TENSORS and array.nbytes >= ALIGN_BYTES and t.data_ptr() % 64:  # again, at a 64-byte boundary
        size, itemsize = math.prod(shape), array.itemsize
        raw = np.empty(size + 64 // itemsize, np_dtype)
        start = (-raw.ctypes.data % 64) // itemsize
        array = raw[start:start + size].reshape(shape)
        t = torch.from_numpy(array)
    if dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    t.__dict__["_numba_view"] = array
    return t


def keep_numba_view(t: torch.Tensor) -> torch.Tensor:
    """Remember the tensor's numpy view on the tensor itself, for tensors that live as long as the
    model (weights, cache layers): the conversion then costs nothing on each kernel call."""
    if t.device.type == "cpu" and "_numba_view" not in t.__dict__:
        t.__dict__["_numba_view"] = as_numba(t)
    return t
