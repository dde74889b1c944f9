"""Per-step attention inputs, built once per step on the host and shared by every layer."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class PrefillChunk:
    """A run of query tokens of one sequence that attends to its cached context (causal)."""
    query_start: int  # offset in the flat token batch
    query_len: int
    context_len: int  # tokens in the cache after this step's write, including the chunk
    key_slots: torch.Tensor  # [context_len] cache slot of each context position
    mask: torch.Tensor | None  # [query_len, context_len] bool, None when plain causal
    block_table: list[int]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] cache slot each new token's K/V is written to
    num_decode_tokens: int  # decode tokens come first in the batch, one per sequence
    decode_block_tables: torch.Tensor | None = None  # [num_decodes, max_blocks] int32
    decode_context_starts: torch.Tensor | None = None  # [num_decodes] int32, >0 only in a sliding window
    decode_context_lens: torch.Tensor | None = None  # [num_decodes] int32, including the new token
    prefills: list[PrefillChunk] = field(default_factory=list)
    sliding_window: int | None = None


def build_attention_metadata(
    block_size: int,
    slot_mapping: list[int],
    decode_tables: list[list[int]],
    decode_context_lens: list[int],
    prefill_specs: list[tuple[int, int, int, list[int]]],
    sliding_window: int | None = None,
) -> AttentionMetadata:
    """prefill_specs: (query_start, query_len, context_len, block_table) per chunk."""
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long),
        num_decode_tokens=len(decode_tables),
        sliding_window=sliding_window,
    )
    if decode_tables:
        max_blocks = max(len(t) for t in decode_tables)
        tables = np.zeros((len(decode_tables), max_blocks), dtype=np.int32)
        for i, table in enumerate(decode_tables):
            tables[i, :len(table)] = table
        lens = torch.tensor(decode_context_lens, dtype=torch.int32)
        starts = torch.zeros_like(lens)
        if sliding_window is not None:
            starts = (lens - sliding_window).clamp(min=0)
        meta.decode_block_tables = torch.from_numpy(tables)
        meta.decode_context_starts = starts
        meta.decode_context_lens = lens
    for query_start, query_len, context_len, table in prefill_specs:
        pos = torch.arange(context_len)
        table_t = torch.tensor(table, dtype=torch.long)
        key_slots = table_t[pos // block_size] * block_size + pos % block_size
        mask = None
        if query_len != context_len or sliding_window is not None:
            q_pos = torch.arange(context_len - query_len, context_len)
            mask = pos[None, :] <= q_pos[:, None]
            if sliding_window is not None:
                mask &= pos[None, :] > (q_pos[:, None] - sliding_window)
        meta.prefills.append(PrefillChunk(query_start, query_len, context_len, key_slots, mask, table))
    return meta
