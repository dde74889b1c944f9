"""LoRA's added term on a projection's output, y += (x A^T) B per token with that token's adapter, for a
batch mixing adapters (and the base model, whose tokens get nothing) in one step. Adapters sit in slots:
A [slots, R, in], B [slots, R, out] (B transposed, so both are read along their rows). Three forms:

- bgmv (the CPU's batched form): one numba kernel per projection, each token against its own slot
  (cpu/lora.py);
- masked (the batched form elsewhere, e.g. CUDA): every slot stacked; one GEMM gives each token its
  product with every slot's A, a mask keeps its own slot's columns, a second GEMM applies B: three
  ops whatever the mix (a dense form of Punica's BGMV, cheap while slots x R is small);
- grouped: tokens sorted by adapter, a pair of GEMMs per adapter, the results scattered back.
"""
from __future__ import annotations

import torch

from scalellm.ops.cpu.lora import bgmv
from scalellm.ops.cpu.numba_util import as_numba


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """y += ((x @ a^T) * mask) @ b, in place; a [R, in], b [R, out], mask [tokens, R] or None."""
    xa = x @ a.t()
    if mask is not None:
        xa.mul_(mask)
    return y.addmm_(xa, b)


def add_lora_bgmv(y: torch.Tensor, x: torch.Tensor, a_slots: torch.Tensor, b_slots: torch.Tensor,
                  token_slots) -> torch.Tensor:
    """The numba kernel on CPU tensors (float32 or bfloat16); token_slots: int64 numpy, -1 for none."""
    bgmv(as_numba(y), as_numba(x.contiguous()), as_numba(a_slots), as_numba(b_slots), token_slots)
    return y


def add_lora_grouped(y: torch.Tensor, x: torch.Tensor, a_slots: torch.Tensor, b_slots: torch.Tensor,
                     order: torch.Tensor | None, runs: list[tuple[int, int, int]]) -> torch.Tensor:
    """Tokens taken in `order` (None: as they are, already grouped); each run (slot, first, end) of that
    order gets (x @ a_slots[slot]^T) @ b_slots[slot]; added back to y's rows."""
    if order is None:
        for slot, start, end in runs:
            y[start:end].addmm_(x[start:end] @ a_slots[slot].t(), b_slots[slot])
        return y
    xs = x[order]
    delta = torch.zeros(x.shape[0], y.shape[1], dtype=y.dtype, device=y.device)
    for slot, start, end in runs:
        torch.mm(xs[start:end] @ a_slots[slot].t(), b_slots[slot], out=delta[start:end])
    return y.index_add_(0, order, delta)
