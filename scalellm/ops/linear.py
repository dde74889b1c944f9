"""Projections: y = x W^T (+ bias) (+ residual).

On the CPU the weight is packed once, at load, into oneDNN's blocked layout (a plain torch linear
re-lays it out on every call, which costs up to half the time of a small-batch GEMM), and the
residual add rides in the GEMM's epilogue. Batches of one or two rows go to a numba kernel instead,
which streams the weight once per call at close to memory bandwidth where oneDNN's fixed per-call
cost dominates: for bfloat16 over a second copy packed in 16-column panels (cpu/panel_gemm.py), for
float32 over the plain weight (bench/results/ablation.md).
torch.ops.mkldnn is a private API: when it is missing or refuses the weight, the plain torch path
serves instead (tests check that all paths agree).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import scalellm.ops  # for rms_norm and silu_mul, read at call time (this module loads while ops does)
from scalellm.ops.cpu import panel_gemm
from scalellm.ops.cpu.kernels import NO_PROLOGUE, NO_WEIGHT, RMS_NORM, SILU_MUL, small_gemm
from scalellm.ops.cpu.numba_util import as_numba, new_tensor

PACK_BATCH_HINT = 128  # the batch size oneDNN tunes the packed layout for (the packed GEMM's speed barely depends on it)
PACK_WEIGHTS = True  # the default for new Linears (benchmarks turn it off to measure the plain path)
SMALL_BATCH_ROWS = 2  # batches up to this many rows take a numba small-batch kernel where one is built
FUSED_PROLOGUE = True  # small-batch kernels apply RMSNorm / SiLU-and-multiply (False: the ops, for comparisons)
PANELS = True  # bfloat16 small batches on the panel kernel (False: the plain-weight kernel, for comparisons)
KEEP_PLAIN = False  # keep the plain weight's kernel beside the panels too (benchmarks flip PANELS at run time)


def _can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool | None = None,
                 small_batch: bool = True):
        """small_batch: keep a second copy of the weight beside oneDNN's for the numba small-batch path
        (panels for bfloat16, the plain weight for float32)."""
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.bias = bias
        self.weight: torch.Tensor | None = weight.contiguous()  # the plain weight, where a path needs it
        self.packed: torch.Tensor | None = None
        self._plain = self._bias = self._panels = None  # for the small-batch path: numba views, panels
        if (PACK_WEIGHTS if pack is None else pack) and _can_pack(weight):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, PACK_BATCH_HINT)
            except RuntimeError:
                self.packed = None
        small = small_batch and self.weight.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16)
        if small and self.dtype == torch.bfloat16 and PANELS and self.in_features % 2 == 0:
            self._panels = panel_gemm.pack(self.weight)
        if small and (self._panels is None or KEEP_PLAIN):
            self._plain = as_numba(self.weight)
        if small:  # _bias set marks a small-batch kernel
            np_dtype = np.int16 if self.dtype == torch.bfloat16 else np.float32
            self._bias = np.zeros(0, np_dtype) if bias is None else as_numba(bias)
            self._no_residual = np.zeros((0, 0), np_dtype)
        if self.packed is not None and self._plain is None:
            self.weight = None

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed weight, the panels and the plain one, each where kept (the packed layout's
        and the last panel's padding are not counted)."""
        copies = (self.weight is not None) + (self.packed is not None) + (self._panels is not None)
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return copies * self.out_features * self.in_features * self.dtype.itemsize + bias

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None, norm: torch.Tensor | None = None,
                 eps: float = 0.0, silu_mul: bool = False) -> torch.Tensor:
        """x @ W^T + bias, plus `residual` when given (a new tensor; the inputs are not modified). x goes
        through rms_norm(x, norm, eps) first when norm is given, or through silu_mul when asked: the
        small-batch kernel does either on its way in (fusable_prologue), other paths call the op."""
        if self._bias is not None and x.shape[0] <= SMALL_BATCH_ROWS and x.dim() == 2:
            out = new_tensor((x.shape[0], self.out_features), self.dtype)
            x, op, norm_np = fusable_prologue(x, norm, eps, silu_mul)
            panels = self._panels is not None and (PANELS or self._plain is None)
            kernel, w = (panel_gemm.panel_gemm, self._panels) if panels else (small_gemm, self._plain)
            kernel(as_numba(x), w, self._bias, self._no_residual if residual is None else as_numba(residual),
                   as_numba(out), op, norm_np, eps)
            return out
        x = apply_prologue(x, norm, eps, silu_mul)
        if self.packed is not None:
            if residual is None:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], None)
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.bias, "add")
        if residual is not None and self.bias is None and x.is_cuda and x.dim() == 2:
            return torch.addmm(residual, x, self.weight.t())  # one GEMM with the residual as its C: one node
        y = F.linear(x, self.weight, self.bias)
        return y if residual is None else y.add_(residual)


def fusable_prologue(x: torch.Tensor, norm: torch.Tensor | None, eps: float, silu_mul: bool):
    """(x, op, norm weight) for a kernel that fuses the prologue (cpu_kernels.prologue_row), in bfloat16
    only: there the fused values are the op's own bits, as both round at the same points (tests check).
    float32 has no rounding between the op and the GEMM, and LLVM's fast-math rewrites differ by an ulp
    between the two kernels (SiLU's division); a float32 near-tie (the bundled model's answer to the
    Paris question) turned on such an ulp once, so float32 runs the op first, as before."""
    if not FUSED_PROLOGUE or x.dtype != torch.bfloat16:
        return apply_prologue(x, norm, eps, silu_mul), NO_PROLOGUE, NO_WEIGHT
    if norm is not None:
        return x, RMS_NORM, as_numba(norm)
    return x, (SILU_MUL if silu_mul else NO_PROLOGUE), NO_WEIGHT


def apply_prologue(x: torch.Tensor, norm: torch.Tensor | None, eps: float, silu_mul: bool) -> torch.Tensor:
    """The prologue as its own op, for the paths that do not fuse it."""
    if norm is not None:
        return scalellm.ops.rms_norm(x, norm, eps)
    return scalellm.ops.silu_mul(x) if silu_mul else x
