"""Owns the KV cache and turns a scheduled batch into one forward pass."""
from __future__ import annotations

import torch

from scalellm import ops
from scalellm.engine.sequence import Sequence
from scalellm.model.llama import LlamaModel


def kv_bytes_per_token(model: LlamaModel) -> int:
    c = model.config
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * model.dtype.itemsize


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int):
        c = model.config
        self.model = model
        self.block_size = block_size
        self.kv_cache = torch.zeros(c.num_layers, 2, num_blocks, block_size, c.num_kv_heads, c.head_dim,
                                    dtype=model.dtype)

    def warm_up(self) -> None:
        """One tiny prefill and decode, so kernels compile (or load from cache) before serving."""
        bs = self.block_size
        meta = ops.build_attention_metadata(bs, [0, 1], [], [], [(0, 2, 2, [0])])
        self.model.forward(torch.tensor([0, 0]), torch.tensor([0, 1]), self.kv_cache, meta)
        meta = ops.build_attention_metadata(bs, [2], [[0]], [3], [])
        self.model.logits(self.model.forward(torch.tensor([0]), torch.tensor([2]), self.kv_cache, meta))

    def run(self, items: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Compute the scheduled tokens; returns logits [sequences that completed their tokens, vocab].

        Decodes (one token) are laid out first, then prefill chunks; the logits rows follow the order
        of `items` restricted to sequences whose tokens are now all computed.
        """
        bs = self.block_size
        decodes = [(s, n) for s, n in items if n == 1]
        prefills = [(s, n) for s, n in items if n > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefill_specs = []
        row_of: dict[int, int] = {}
        for seq, n in decodes + prefills:
            start = seq.num_computed
            if n > 1:
                prefill_specs.append((len(input_ids), n, start + n, seq.block_table))
            input_ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if start + n == seq.num_tokens:
                row_of[seq.seq_id] = len(input_ids) - 1
        meta = ops.build_attention_metadata(
            bs, slots, [s.block_table for s, _ in decodes], [s.num_computed + 1 for s, _ in decodes],
            prefill_specs, self.model.config.sliding_window)
        hidden = self.model.forward(torch.tensor(input_ids), torch.tensor(positions), self.kv_cache, meta)
        rows = [row_of[s.seq_id] for s, _ in items if s.seq_id in row_of]
        return self.model.logits(hidden[rows])
