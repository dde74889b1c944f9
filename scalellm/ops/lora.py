"""LoRA's added term on a projection's output, y += (x A^T) B^T per token with that token's adapter,
for a batch mixing adapters (and the base model, whose tokens get nothing) in one step. Two ways:

- batched: every slot's A and B stacked ([slots * R, in] and [out, slots * R]); one GEMM gives each
  token its product with every slot's A, a mask keeps its own slot's columns, and a second GEMM
  applies B. Two GEMMs whatever the mix (a dense form of Punica's BGMV, cheap while slots * R is small).
- grouped: one pair of GEMMs per run of consecutive tokens with the same adapter.
"""
from __future__ import annotations

import torch


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """y += ((x @ a^T) * mask) @ b^T, in place; a [R, in], b [out, R], mask [tokens, R] or None."""
    xa = x @ a.t()
    if mask is not None:
        xa.mul_(mask)
    return y.addmm_(xa, b.t())


def add_lora_grouped(y: torch.Tensor, x: torch.Tensor, a_slots: torch.Tensor, b_slots: torch.Tensor,
                     runs: list[tuple[int, int, int]]) -> torch.Tensor:
    """For each run (slot, first row, end row): y[rows] += (x[rows] @ a_slots[slot]^T) @ b_slots[slot]^T.
    a_slots [slots, R, in], b_slots [out, slots, R]."""
    for slot, start, end in runs:
        y[start:end].addmm_(x[start:end] @ a_slots[slot].t(), b_slots[:, slot].t())
    return y
