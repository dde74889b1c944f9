"""A step's sampling parameters as flat arrays, the input of the fused sampling kernels (CPU and CUDA).

Penalties travel as CSR lists of (token, output count) per row (count 0: seen only in the prompt,
which only the repetition penalty uses); tokens masked under min_tokens as another CSR list.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, fields

import numpy as np
import torch

from scalellm.engine.sequence import Sequence

_MASK64 = (1 << 64) - 1


def stream_key(seed: int, index: int, position: int) -> int:
    """Counter-based key: one independent random stream per (request seed, sample, output position)."""
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + position * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return (x * 0xD6E8FEB86659FD93) & _MASK64


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
    streams: torch.Tensor  # uint64 keys stored in an int64 tensor
    num_top: torch.Tensor  # int32, -1 = no logprobs

    def to(self, device) -> "SamplingBatch":
        return SamplingBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def build_sampling_batch(seqs: list[Sequence], eos_token_ids: list[int], vocab: int) -> SamplingBatch:
    rows = len(seqs)
    temperature = np.empty(rows, np.float32)
    top_k = np.empty(rows, np.int32)
    top_p, min_p = np.empty(rows, np.float32), np.empty(rows, np.float32)
    presence, frequency, repetition = np.empty(rows, np.float32), np.empty(rows, np.float32), np.empty(rows, np.float32)
    streams = np.empty(rows, np.uint64)
    num_top = np.empty(rows, np.int32)
    pen_offsets, ban_offsets = [0], [0]
    pen_tokens: list[int] = []
    pen_counts: list[int] = []
    ban_tokens: list[int] = []
    for i, s in enumerate(seqs):
        p = s.params
        temperature[i], top_k[i], top_p[i], min_p[i] = p.temperature, p.top_k, p.top_p, p.min_p
        presence[i], frequency[i], repetition[i] = p.presence_penalty, p.frequency_penalty, p.repetition_penalty
        seed = p.seed if p.seed is not None else random.getrandbits(64)
        streams[i] = stream_key(seed, s.index, s.num_output_tokens)
        num_top[i] = -1 if p.logprobs is None else p.logprobs
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            counts = Counter(s.token_ids[s.prompt_len:])
            if p.repetition_penalty != 1.0:
                for t in set(s.token_ids[:s.prompt_len]):
                    counts.setdefault(t, 0)
            for t, c in counts.items():
                if t < vocab:
                    pen_tokens.append(t)
                    pen_counts.append(c)
        pen_offsets.append(len(pen_tokens))
        if s.num_output_tokens < p.min_tokens:
            ban_tokens += [t for t in p.stop_token_ids if t < vocab]
            if not p.ignore_eos:
                ban_tokens += [t for t in eos_token_ids if t < vocab]
        ban_offsets.append(len(ban_tokens))

    def i32(x):
        return torch.from_numpy(np.asarray(x, dtype=np.int32))
    return SamplingBatch(
        torch.from_numpy(temperature), torch.from_numpy(top_k), torch.from_numpy(top_p), torch.from_numpy(min_p),
        torch.from_numpy(presence), torch.from_numpy(frequency), torch.from_numpy(repetition),
        i32(pen_offsets), i32(pen_tokens), i32(pen_counts), i32(ban_offsets), i32(ban_tokens),
        torch.from_numpy(streams.view(np.int64)), torch.from_numpy(num_top))
