"""Projections and embedding lookups over block-quantized weights (ops/quant/tensor.py).

Small batches run the quantized GEMM, which reads each weight byte once and dequantizes in registers:
decoding is bound by memory bandwidth, so fewer bytes per weight is the point. From DENSE_ROWS rows
up (prefill chunks, large decode batches) the product is bound by arithmetic instead, and a dense
GEMM does it faster: the weight is dequantized to the activations' dtype a slab of rows at a time
(a few MiB, never the whole weight) and multiplied with torch.

Q8_0 and Q4_0 weights with a multiple of 16 rows are held in groups of 16 rows where the CPU has the int8
kernel (QuantizedTensor.grouped): one vpdpbusd advances 16 rows' dot products, ~2x faster per call than a
row at a time from 1 to 16 activation rows and faster than the dense path up to 256 rows at least
(bench/experiments/grouped_ab.py), so grouped weights take that kernel at every batch size.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import scalellm.ops  # for uses_cuda_kernels, read at call time (this module loads while ops does)
from scalellm.ops.quant import cpu as cpu_quant
from scalellm.ops.cpu.kernels import NO_PROLOGUE
from scalellm.ops.linear import apply_prologue, fusable_prologue
from scalellm.ops.cpu.numba_util import as_numba, new_tensor
from scalellm.ops.quant.ir import GROUP_ROWS, GROUPED_FORMATS
from scalellm.ops.quant.tensor import QuantizedTensor

DENSE_ROWS = 48  # from this many rows dequantizing a slab and running a dense GEMM beats the block kernel
SLAB_ELEMENTS = 1 << 21  # weight elements dequantized at a time on that path
GROUPED = cpu_quant.INT8  # Q8_0/Q4_0 weights on the CPU held in groups of 16 rows (QuantizedLinear)


def _uses_cuda_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda or scalellm.ops.uses_cuda_kernels(x)


class QuantizedLinear:
    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16):
        """Q8_0/Q4_0 weights are held in groups of 16 rows for the CPU's int8 kernel where groupable(weight,
        dtype) (QuantizedTensor.grouped: the same bytes, reordered). A tied embedding shares the grouped
        weight: the lookup reads either layout (dequantize_rows)."""
        if groupable(weight, dtype):
            weight = weight.grouped()
        self.weight = weight
        self.format = weight.format
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self.bias = None if bias is None else bias.to(dtype)
        self._np = numpy_fields(weight) if weight.device.type == "cpu" else None
        numba_bias = self.bias is not None and self._np is not None and dtype in (torch.float32, torch.bfloat16)
        self._bias = as_numba(self.bias) if numba_bias else np.zeros(0, np.float32)
        self._no_residual = np.zeros((0, 0), np.float32)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None, norm: torch.Tensor | None = None,
                 eps: float = 0.0, silu_mul: bool = False) -> torch.Tensor:
        """x @ W^T + bias, plus `residual` when given (a new tensor in x's dtype). x goes through
        rms_norm(x, norm, eps) first when norm is given, or through silu_mul when asked: the CPU kernel
        does either on its way in (linear.fusable_prologue), other paths call the op."""
        if x.shape[0] >= DENSE_ROWS and self.weight.group == 1:  # grouped: the int8 kernel measured faster
            return self._dense(apply_prologue(x, norm, eps, silu_mul), residual)  # to 256 rows at least
        if _uses_cuda_kernels(x):
            from scalellm.ops.cuda import backend as cuda_backend

            x = apply_prologue(x, norm, eps, silu_mul)
            w = self.weight.ungrouped()  # grouped only on the CPU: here the CUDA kernels' host build
            out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
            cuda_backend.quant_gemm(self.format, x, w.qs, w.d, w.m, self.bias, residual, out)
            return out
        x, op, norm_np = fusable_prologue(x, norm, eps, silu_mul)
        out = new_tensor((x.shape[0], self.out_features), x.dtype)
        int8 = uses_int8(x.dtype)
        if int8 or op != NO_PROLOGUE:  # the kernel reads either dtype (and rounds as x's)
            xs = as_numba(x.contiguous())
        else:
            xs = (x.contiguous() if x.dtype == torch.float32 else x.float()).numpy()
        res = self._no_residual if residual is None else as_numba(residual.contiguous())
        if self.weight.group > 1:
            cpu_quant.grouped_gemm(self.format, xs, *self._np[:2], self._bias, res, as_numba(out), op=op,
                                   norm=norm_np, eps=eps)
        else:
            cpu_quant.quant_gemm(self.format, xs, *self._np, self._bias, res, as_numba(out), int8=int8, op=op,
                                 norm=norm_np, eps=eps)
        return out

    def _dense(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        slab = max(1, SLAB_ELEMENTS // self.in_features)
        out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for lo in range(0, self.out_features, slab):
            hi = min(lo + slab, self.out_features)
            w = dequantize_rows(self.weight, torch.arange(lo, hi, device=x.device), x.dtype, self._np)
            out[:, lo:hi] = F.linear(x, w, None if self.bias is None else self.bias[lo:hi])
        return out if residual is None else out.add_(residual)


def uses_int8(dtype: torch.dtype) -> bool:
    """Whether activations of dtype are quantized to int8 for the GEMM (as llama.cpp does for these formats):
    bfloat16 ones, where the CPU has the int8 kernel. float32 ones stay float32 (the float kernel): a
    float32 model is asked for float32's answers, and 8-bit activations round more coarsely than bfloat16
    (the bundled model's greedy answer to the Paris question is a near tie that they tip)."""
    return cpu_quant.INT8 and dtype != torch.float32


def groupable(w: QuantizedTensor, dtype: torch.dtype) -> bool:
    return GROUPED and uses_int8(dtype) and w.device.type == "cpu" and w.format in GROUPED_FORMATS and \
        w.group == 1 and w.shape[0] % GROUP_ROWS == 0


def numpy_fields(w: QuantizedTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """qs, d and m as numpy arrays for the numba kernels (float16 as uint16 bits; d again for a missing m)."""
    d = w.d.view(torch.int16).numpy().view(np.uint16)
    m = d if w.m is None else w.m.view(torch.int16).numpy().view(np.uint16)
    return w.qs.numpy(), d, m


def dequantize_rows(w: QuantizedTensor, ids: torch.Tensor, dtype: torch.dtype, fields=None) -> torch.Tensor:
    """Rows ids of w (held in the file's order or grouped) as a dense [len(ids), in_features] tensor of dtype."""
    if _uses_cuda_kernels(ids):
        from scalellm.ops.cuda import backend as cuda_backend

        w = w.ungrouped()  # grouped only on the CPU: here the CUDA kernels' host build
        return cuda_backend.dequant_rows(w.format, w.qs, w.d, w.m, ids, dtype)
    out = torch.empty(ids.shape[0], w.shape[1], dtype=torch.float32)
    qs, d, m = fields or numpy_fields(w)
    if w.group > 1:
        cpu_quant.dequant_grouped_rows(w.format, qs, d, ids.to(torch.int64).numpy(), out.numpy())
    else:
        cpu_quant.dequant_rows(w.format, qs, d, m, ids.to(torch.int64).numpy(), out.numpy())
    return out if dtype == torch.float32 else out.to(dtype)


def embedding(ids: torch.Tensor, weight, dtype: torch.dtype) -> torch.Tensor:
    """The embedding lookup for a dense or a block-quantized table (rows dequantized to dtype)."""
    if isinstance(weight, QuantizedTensor):
        return dequantize_rows(weight, ids, dtype)
    return F.embedding(ids, weight)
