"""Projections: y = x W^T (+ bias) (+ residual).

On the CPU the weight is packed once, at load, into oneDNN's blocked layout (a plain torch linear
re-lays it out on every call, which costs up to half the time of a small-batch GEMM), and the
residual add rides in the GEMM's epilogue. torch.ops.mkldnn is a private API: when it is missing or
refuses the weight, the plain torch path serves instead (tests check that both agree).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PACK_BATCH_HINT = 128  # the batch size oneDNN tunes the packed layout for; measured flat from 1 to 512
PACK_WEIGHTS = True  # the default for new Linears (benchmarks turn it off to measure the plain path)


def _can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool | None = None):
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.bias = bias
        self.weight: torch.Tensor | None = weight  # kept only where the plain path serves
        self.packed: torch.Tensor | None = None
        if (PACK_WEIGHTS if pack is None else pack) and _can_pack(weight):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_BATCH_HINT)
                self.weight = None
            except RuntimeError:
                self.packed = None

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features + (0 if self.bias is None else self.bias.numel())

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T + bias, plus `residual` when given (a new tensor; the inputs are not modified)."""
        if self.packed is not None:
            if residual is None:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], None)
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.bias, "add")
        y = F.linear(x, self.weight, self.bias)
        return y if residual is None else y.add_(residual)
