"""Decode steps replayed from CUDA graphs: the whole step (input ids, forward, LM head and sampling) in
one replay, its inputs in one host-to-device copy.

Every input lives at a fixed place of one device buffer (ops/transfer.StaticInputs): token ids and their
sources, positions, cache slots, block tables, context bounds, and the sampling rows (temperature,
top-k/p, min-p, penalties as CSR lists of bounded size, seeds, sample indices and output positions, from
which the sampling kernel keys each row's random stream on the device). A step writes them into
page-locked host memory and copies them over once; the graph reads them in place.

A decode row whose newest token is still being sampled by the step before (one step ahead) names that
token's row in `sampled` (src >= 0): the graph reads it there, on the device, before the forward pass.
Every step writes its sampled ids to `sampled`, so the next step finds them.

A graph is captured per padded batch size and mode: "greedy" (argmax), "sample" (the fused sampling
kernel), each "-masked" when the batch's token bitmask (grammar masks, allowed tokens, bad words; written
by the host, copied with the rest) is applied to the logits first, or "forward" (the forward pass alone,
for steps whose sampling needs the host: logit biases, logprobs, penalty lists beyond the buffers). Spare rows write nothing (slot -1) and read one
cached token. Decode attention is captured with the partition count of the longest allowed context, so
one graph serves every context length.

Without a GPU (the CUDA kernels run through their host build, in tests) the same buffers, copies and
padding run eagerly, so everything but the capture itself is exercised on every commit.
"""
from __future__ import annotations

import numpy as np
import torch

from scalellm import ops
from scalellm.ops.sampling_batch import SamplingBatch
from scalellm.ops.cuda.transfer import StaticInputs

MODES = ("greedy", "sample", "greedy-masked", "sample-masked", "forward")
PENALTY_ENTRIES = 4096  # (token, count) pairs a graphed step's rows may carry in all; more: sampled eagerly
BANNED_ENTRIES = 1024  # tokens masked under min_tokens, in all
SAMPLED_ROWS = 8192  # rows of the sampled-ids buffer (a step's rows, at most)


def batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 to 128 and every 32 beyond (a padded row costs little in a decode step)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, min(max_batch, 129), 16))
    sizes += list(range(160, max_batch, 32))
    return sorted(set(sizes + [max_batch]))


def input_fields(max_batch: int, max_blocks: int, vocab: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    b, i32, i64, f32 = max_batch, torch.int32, torch.int64, torch.float32
    fields = dict(ids=(i64, (b,)), src=(i64, (b,)), positions=(i64, (b,)), slots=(i64, (b,)),
                  starts=(i32, (b,)), lens=(i32, (b,)),
                  temperature=(f32, (b,)), top_k=(i32, (b,)), top_p=(f32, (b,)), min_p=(f32, (b,)),
                  presence=(f32, (b,)), frequency=(f32, (b,)), repetition=(f32, (b,)),
                  pen_offsets=(i32, (b + 1,)), ban_offsets=(i32, (b + 1,)), seeds=(i64, (b,)),
                  indices=(i64, (b,)), out_positions=(i64, (b,)), num_top=(i32, (b,)),
                  pen_tokens=(i32, (PENALTY_ENTRIES,)), pen_counts=(i32, (PENALTY_ENTRIES,)),
                  ban_tokens=(i32, (BANNED_ENTRIES,)))
    fields["tables"] = (i32, (b, max_blocks))  # a step copies the prefix of the buffer it wrote: tables last,
    fields["bitmask"] = (i32, (b, -(-vocab // 32)))  # but for a masked step, which copies its masks too
    return fields


def graphable_sampling(arrays: dict[str, np.ndarray]) -> bool:
    return len(arrays["pen_tokens"]) <= PENALTY_ENTRIES and len(arrays["ban_tokens"]) <= BANNED_ENTRIES


class DecodeGraphs:
    def __init__(self, model, kv_cache: torch.Tensor, max_batch: int, max_blocks: int, max_model_len: int,
                 sliding_window: int | None):
        dev = kv_cache.device
        self.model, self.kv_cache, self.max_batch = model, kv_cache, max_batch
        self.capture = dev.type == "cuda"
        self.sizes = batch_sizes(max_batch)
        self.inputs = StaticInputs(input_fields(max_batch, max_blocks, model.config.vocab_size), dev)
        self.mask_rows = torch.arange(max_batch, dtype=torch.int32, device=dev)
        self.v = self.inputs.device_views
        self.sampled = torch.zeros(SAMPLED_ROWS, dtype=torch.int64, device=dev)
        self.max_context = max_model_len
        self.sliding_window = sliding_window
        self.graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, str], torch.Tensor] = {}
        self.pool = None

    def covers(self, num_decodes: int) -> bool:
        return num_decodes <= self.max_batch

    def _meta(self, bs: int) -> ops.AttentionMetadata:
        v = self.v
        arrays = {"slot_mapping": v["slots"][:bs], "decode_block_tables": v["tables"][:bs],
                  "decode_context_starts": v["starts"][:bs], "decode_context_lens": v["lens"][:bs]}
        return ops.AttentionMetadata(slot_mapping=v["slots"][:bs], num_decode_tokens=bs,
                                     sliding_window=self.sliding_window, max_decode_context=self.max_context,
                                     device=arrays)

    def _batch(self, bs: int) -> SamplingBatch:
        v = self.v
        rows = {k: v[k][:bs] for k in ("temperature", "top_k", "top_p", "min_p", "presence", "frequency",
                                        "repetition", "seeds", "indices", "num_top")}
        return SamplingBatch(**rows, positions=v["out_positions"][:bs], pen_offsets=v["pen_offsets"][:bs + 1],
                             pen_tokens=v["pen_tokens"], pen_counts=v["pen_counts"],
                             ban_offsets=v["ban_offsets"][:bs + 1], ban_tokens=v["ban_tokens"])

    def _step(self, bs: int, mode: str) -> torch.Tensor:
        """What a graph holds: ids (in-flight ones read from `sampled`), forward, and for the sampling modes
        the LM head and the draw, whose ids land in `sampled`."""
        v = self.v
        src = v["src"][:bs]
        ids = torch.where(src >= 0, self.sampled[src.clamp(min=0)], v["ids"][:bs])
        hidden = self.model.forward(ids, v["positions"][:bs], self.kv_cache, self._meta(bs))
        if mode == "forward":
            return hidden
        logits = self.model.logits(hidden, float32=False)
        if mode.endswith("-masked"):
            ops.apply_token_bitmask(logits, self.mask_rows[:bs], v["bitmask"][:bs])
        if mode.startswith("greedy"):
            tokens = ops.greedy_tokens(logits)
        else:
            tokens = ops.fused_sample(logits.float(), self._batch(bs), 1)[0]
        self.sampled[:bs].copy_(tokens)
        return self.sampled[:bs]

    def _capture(self, bs: int, mode: str) -> None:
        self._step(bs, mode)  # eager first: kernels compiled, workspaces sized
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self.outputs[bs, mode] = self._step(bs, mode)
        self.pool = graph.pool()
        self.graphs[bs, mode] = graph

    def capture_all(self) -> None:
        """Capture every batch size in the sampling modes (warm-up, before serving; "forward" graphs on
        first use); largest first so smaller ones share its pool. The inputs are a valid padded batch."""
        if self.capture:
            for bs in reversed(self.sizes):
                self._write_padding(self.inputs.host(), 0, bs)
                self.inputs.copy()
                for mode in ("greedy", "sample"):
                    self._capture(bs, mode)

    @staticmethod
    def _write_padding(h: dict[str, np.ndarray], n: int, bs: int) -> None:
        """Spare rows [n, bs): write nothing, read one cached token, sample greedily, no lists."""
        h["ids"][n:bs] = 0
        h["src"][n:bs] = -1
        h["positions"][n:bs] = 0
        h["slots"][n:bs] = -1
        h["tables"][n:bs] = 0
        h["starts"][n:bs] = 0
        h["lens"][n:bs] = 1
        h["temperature"][n:bs] = 0
        h["top_k"][n:bs] = 0
        h["top_p"][n:bs] = 1
        h["min_p"][n:bs] = 0
        h["presence"][n:bs] = h["frequency"][n:bs] = 0
        h["repetition"][n:bs] = 1
        h["seeds"][n:bs] = h["indices"][n:bs] = h["out_positions"][n:bs] = 0
        h["num_top"][n:bs] = -1
        h["pen_offsets"][n + 1:bs + 1] = h["pen_offsets"][n] if n else 0
        h["ban_offsets"][n + 1:bs + 1] = h["ban_offsets"][n] if n else 0
        if n == 0:
            h["pen_offsets"][0] = h["ban_offsets"][0] = 0

    def run(self, mode: str, arrays: dict[str, np.ndarray], sampling: dict[str, np.ndarray] | None,
            prev_tokens: torch.Tensor | None) -> torch.Tensor:
        """One decode step of n <= max_batch sequences in one copy and one replay: the sampled ids [n] on
        the device, or for mode "forward" the residual stream [n, hidden]. arrays: the step's host arrays
        (ids, src, positions, slots, tables, starts, lens); sampling: sampler.sampling_arrays' output;
        prev_tokens: the previous step's sampled ids, when rows read from them and they are not in
        `sampled` already (an eager step's)."""
        n = arrays["ids"].shape[0]
        bs = next(s for s in self.sizes if s >= n)
        h = self.inputs.host()
        for k in ("ids", "src", "positions", "slots", "starts", "lens"):
            h[k][:n] = arrays[k]
        width = arrays["tables"].shape[1]
        h["tables"][:n, :width] = arrays["tables"]
        if sampling is not None and "bitmask" in sampling:
            h["bitmask"][:n] = sampling["bitmask"]
            h["bitmask"][n:bs] = -1
        if sampling is not None and "temperature" in sampling:
            for k in ("temperature", "top_k", "top_p", "min_p", "presence", "frequency", "repetition", "seeds",
                      "indices", "num_top", "pen_offsets", "ban_offsets"):
                h[k][:len(sampling[k])] = sampling[k]
            h["out_positions"][:n] = sampling["positions"]
            h["pen_tokens"][:len(sampling["pen_tokens"])] = sampling["pen_tokens"]
            h["pen_counts"][:len(sampling["pen_counts"])] = sampling["pen_counts"]
            h["ban_tokens"][:len(sampling["ban_tokens"])] = sampling["ban_tokens"]
        self._write_padding(h, n, bs)
        last = "bitmask" if mode.endswith("-masked") else "tables"
        self.inputs.copy(self.inputs.offsets[last][0] + bs * h[last].shape[1] * 4)
        if prev_tokens is not None and prev_tokens.data_ptr() != self.sampled.data_ptr():
            self.sampled[:prev_tokens.shape[0]].copy_(prev_tokens)
        if not self.capture:
            out = self._step(bs, mode)
        else:
            if (bs, mode) not in self.graphs:
                self._capture(bs, mode)
            self.graphs[bs, mode].replay()
            out = self.outputs[bs, mode]
        return out[:n]
