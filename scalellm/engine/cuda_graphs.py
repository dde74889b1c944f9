"""Decode-only steps replayed from CUDA graphs: one launch for the whole forward instead of one per op.

A graph is captured for each padded batch size up to a bound, over static input buffers; a step copies
its inputs into them (device to device), pads the spare rows (slot -1: nothing is written; a context of
one token at block 0: read, never used) and replays the graph. Decode attention is captured with the
partition count of the longest allowed context, so one graph serves every context length.

Without a GPU (the CUDA kernels run through their host build, in tests) the same buffers and padding
run eagerly, so everything but the capture itself is exercised on every commit.
"""
from __future__ import annotations

import torch

from scalellm import ops


def batch_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    def __init__(self, model, kv_cache: torch.Tensor, max_batch: int, max_blocks: int, max_model_len: int,
                 sliding_window: int | None):
        dev = kv_cache.device
        self.model, self.kv_cache, self.max_batch = model, kv_cache, max_batch
        self.capture = dev.type == "cuda"
        self.sizes = batch_sizes(max_batch)
        i32, i64 = dict(dtype=torch.int32, device=dev), dict(dtype=torch.int64, device=dev)
        self.ids = torch.zeros(max_batch, **i64)
        self.positions = torch.zeros(max_batch, **i64)
        self.slots = torch.full((max_batch,), -1, **i64)
        self.tables = torch.zeros(max_batch, max_blocks, **i32)
        self.starts = torch.zeros(max_batch, **i32)
        self.lens = torch.ones(max_batch, **i32)
        self.max_context = max_model_len
        self.sliding_window = sliding_window
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def covers(self, num_decodes: int) -> bool:
        return num_decodes <= self.max_batch

    def _meta(self, bs: int) -> ops.AttentionMetadata:
        arrays = {"slot_mapping": self.slots[:bs], "decode_block_tables": self.tables[:bs],
                  "decode_context_starts": self.starts[:bs], "decode_context_lens": self.lens[:bs]}
        return ops.AttentionMetadata(slot_mapping=self.slots[:bs], num_decode_tokens=bs,
                                     sliding_window=self.sliding_window, max_decode_context=self.max_context,
                                     device=arrays)

    def _forward(self, bs: int) -> torch.Tensor:
        return self.model.forward(self.ids[:bs], self.positions[:bs], self.kv_cache, self._meta(bs))

    def _capture(self, bs: int) -> None:
        self._forward(bs)  # eager first: kernels compiled, workspaces sized
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self.outputs[bs] = self._forward(bs)
        self.pool = graph.pool()
        self.graphs[bs] = graph

    def capture_all(self) -> None:
        """Capture every batch size (warm-up, before serving); largest first so smaller ones share its pool."""
        if self.capture:
            for bs in reversed(self.sizes):
                self._capture(bs)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        """One decode step of n <= max_batch sequences -> the residual stream [n, hidden]."""
        n = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= n)
        width = arrays["decode_block_tables"].shape[1]
        self.ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(arrays["slot_mapping"])
        self.tables[:n, :width].copy_(arrays["decode_block_tables"])
        self.starts[:n].copy_(arrays["decode_context_starts"])
        self.lens[:n].copy_(arrays["decode_context_lens"])
        if n < bs:  # spare rows: write nothing, read one cached token
            self.slots[n:bs].fill_(-1)
            self.tables[n:bs].zero_()
            self.starts[n:bs].zero_()
            self.lens[n:bs].fill_(1)
        if not self.capture:
            return self._forward(bs)[:n]
        if bs not in self.graphs:
            self._capture(bs)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
