"""A step's sampling parameters as flat arrays, the input of the fused sampling kernels (CPU and CUDA).

Penalties travel as CSR lists of (token, output count) per row (count 0: seen only in the prompt,
which only the repetition penalty uses); tokens masked under min_tokens as another CSR list.
Random numbers come from counter-based streams keyed by (request seed, sample index, output position),
so a seeded row draws the same numbers whatever its batch mates, on either backend.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB),
        np.uint64(0xD6E8FEB86659FD93))


def stream_keys(seeds: np.ndarray, indices: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """uint64 key per row: one independent random stream per (seed, sample index, output position)."""
    with np.errstate(over="ignore"):
        x = (seeds.astype(np.uint64) * _MIX[0] + indices.astype(np.uint64) * _MIX[1]
             + positions.astype(np.uint64) * _MIX[2])
        x ^= x >> np.uint64(31)
        return x * _MIX[3]


def stream_key(seed: int, index: int, position: int) -> int:
    return int(stream_keys(np.array([seed % (1 << 64)], np.uint64), np.array([index]), np.array([position]))[0])


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # float32 [rows], 0 = greedy
    top_k: torch.Tensor  # int32, 0 = off
    top_p: torch.Tensor  # float32, 1 = off
    min_p: torch.Tensor  # float32, 0 = off
    presence: torch.Tensor
    frequency: torch.Tensor
    repetition: torch.Tensor  # float32, 1 = off
    pen_offsets: torch.Tensor  # int32 [rows + 1]
    pen_tokens: torch.Tensor  # int32
    pen_counts: torch.Tensor  # int32
    ban_offsets: torch.Tensor  # int32 [rows + 1]
    ban_tokens: torch.Tensor  # int32
    seeds: torch.Tensor  # uint64 request seeds stored in an int64 tensor
    indices: torch.Tensor  # int64 sample index; with seeds and positions, the kernel keys the row's stream
    positions: torch.Tensor  # int64 output position of the token drawn
    num_top: torch.Tensor  # int32, -1 = no logprobs

    def to(self, device) -> "SamplingBatch":
        return SamplingBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})
