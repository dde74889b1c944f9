"""Per-step attention inputs, built once per step on the host and shared by every layer.

Index arrays are numpy arrays: the CPU kernels read them as they are. The CUDA kernels take them as
device tensors, shipped once per step in one copy (`kernel_arrays` lists them; the model runner packs
them with its other inputs and sets `device`); without that, each op copies what it needs (`tensor`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class PrefillChunk:
    """A run of query tokens of one sequence that attends to its cached context (causal)."""
    query_start: int  # offset in the flat token batch
    query_len: int
    context_len: int  # tokens in the cache after this step's write, including the chunk
    block_table: list[int]
    block_size: int
    sliding_window: int | None = None

    @functools.cached_property
    def key_slots(self) -> torch.Tensor:
        """[context_len] cache slot of each context position (built on first use: the CPU paths read it)."""
        pos = torch.arange(self.context_len)
        table = torch.tensor(self.block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    @functools.cached_property
    def mask(self) -> torch.Tensor | None:
        """[query_len, context_len] bool, None when plain causal (built on first use)."""
        if self.query_len == self.context_len and self.sliding_window is None:
            return None
        pos = torch.arange(self.context_len)
        q_pos = torch.arange(self.context_len - self.query_len, self.context_len)
        mask = pos[None, :] <= q_pos[:, None]
        if self.sliding_window is not None:
            mask &= pos[None, :] > (q_pos[:, None] - self.sliding_window)
        return mask


@dataclass
class AttentionMetadata:
    slot_mapping: np.ndarray  # int64 [num_tokens] cache slot each new token's K/V is written to
    num_decode_tokens: int  # decode tokens come first in the batch, one per sequence
    decode_block_tables: np.ndarray | None = None  # int32 [num_decodes, max_blocks]
    decode_context_starts: np.ndarray | None = None  # int32 [num_decodes], >0 only in a sliding window
    decode_context_lens: np.ndarray | None = None  # int32 [num_decodes], including the new token
    prefills: list[PrefillChunk] = field(default_factory=list)
    sliding_window: int | None = None
    max_decode_context: int = 0  # longest decode context (after the window), known on the host
    device: dict[str, torch.Tensor] | None = None  # kernel_arrays() as device tensors, when shipped
    prefill_rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # prefill_as_decode(), once built
    cpu_decode_rows: tuple | None = None  # the CPU decode kernel's rows for the step (ops.paged_attention)


def prefill_as_decode(meta: AttentionMetadata) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every prefill token as a decode row: (block tables int32 [tokens, max_blocks], context starts,
    context lengths int32 [tokens]). A token at position p of a chunk attends to the cached positions
    [start, p] of its sequence, exactly as a decode of a sequence of length p + 1 would; built once per
    step, on first use."""
    if meta.prefill_rows is None:
        chunks = meta.prefills
        tables = np.zeros((len(chunks), max(len(c.block_table) for c in chunks)), np.int32)
        for i, c in enumerate(chunks):
            tables[i, :len(c.block_table)] = c.block_table
        counts = [c.query_len for c in chunks]
        lens = np.concatenate([np.arange(c.context_len - c.query_len + 1, c.context_len + 1, dtype=np.int32)
                               for c in chunks])
        starts = np.zeros_like(lens)
        if meta.sliding_window is not None:
            starts = np.maximum(lens - meta.sliding_window, 0).astype(np.int32)
        meta.prefill_rows = (np.repeat(tables, counts, axis=0), starts, lens)
    return meta.prefill_rows


PREFILL_TILE = 16  # query tokens per tile of prefill attention: kTileQ in cuda_kernels/prefill_attention.cu


def prefill_tiles(meta: AttentionMetadata) -> np.ndarray:
    """Prefill attention's tiles, int32 [tiles, 4]: (chunk, first token among the step's prefill tokens,
    tokens in the tile (1..PREFILL_TILE), position of the first token); each chunk in PREFILL_TILE tokens
    from its start, the last tile of a chunk possibly shorter. The prefill tokens are the chunks' queries,
    chunk after chunk."""
    q_lens = np.array([c.query_len for c in meta.prefills], np.int64)
    ctx_lens = np.array([c.context_len for c in meta.prefills], np.int64)
    counts = -(-q_lens // PREFILL_TILE)
    chunk = np.repeat(np.arange(len(q_lens)), counts)
    offset = (np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)) * PREFILL_TILE
    starts = np.cumsum(q_lens) - q_lens
    return np.stack([chunk, starts[chunk] + offset, np.minimum(PREFILL_TILE, q_lens[chunk] - offset),
                     ctx_lens[chunk] - q_lens[chunk] + offset], axis=1).astype(np.int32)


def kernel_arrays(meta: AttentionMetadata) -> dict[str, np.ndarray]:
    """What the CUDA kernels read, as host arrays: cache slots; decode tables, starts and lengths; and for
    all prefill chunks at once (one attention launch), the tiles of query tokens (prefill_tiles) and the
    chunks' block tables."""
    out = {"slot_mapping": meta.slot_mapping}
    if meta.num_decode_tokens:
        out.update(decode_block_tables=meta.decode_block_tables, decode_context_starts=meta.decode_context_starts,
                   decode_context_lens=meta.decode_context_lens)
    if meta.prefills:
        tables = np.zeros((len(meta.prefills), max(len(c.block_table) for c in meta.prefills)), np.int32)
        for i, c in enumerate(meta.prefills):
            tables[i, :len(c.block_table)] = c.block_table
        out.update(prefill_tiles=prefill_tiles(meta), prefill_block_tables=tables)
    return out


def tensor(x, device=None) -> torch.Tensor:
    """A metadata array as a torch tensor (on `device` when given)."""
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    return t if device is None else t.to(device)


def build_attention_metadata(
    block_size: int,
    slot_mapping,
    decode_tables,
    decode_context_lens,
    prefill_specs: list[tuple[int, int, int, list[int]]],
    sliding_window: int | None = None,
) -> AttentionMetadata:
    """slot_mapping: one slot per token; decode_tables: a list of block lists or an int32 array
    [num_decodes, max_blocks]; prefill_specs: (query_start, query_len, context_len, block_table) per chunk."""
    meta = AttentionMetadata(slot_mapping=np.asarray(slot_mapping, dtype=np.int64),
                             num_decode_tokens=len(decode_tables), sliding_window=sliding_window)
    if len(decode_tables):
        if isinstance(decode_tables, np.ndarray):
            tables = decode_tables
        else:
            tables = np.zeros((len(decode_tables), max(len(t) for t in decode_tables)), dtype=np.int32)
            for i, table in enumerate(decode_tables):
                tables[i, :len(table)] = table
        lens = np.asarray(decode_context_lens, dtype=np.int32)
        starts = np.zeros_like(lens)
        if sliding_window is not None:
            starts = np.maximum(lens - sliding_window, 0).astype(np.int32)
        meta.decode_block_tables = tables
        meta.decode_context_starts = starts
        meta.decode_context_lens = lens
        meta.max_decode_context = int((lens - starts).max())
    for query_start, query_len, context_len, table in prefill_specs:
        meta.prefills.append(PrefillChunk(query_start, query_len, context_len, table, block_size, sliding_window))
    return meta
