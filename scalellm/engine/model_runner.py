"""Owns the KV cache and turns a scheduled batch into one forward pass.

The block tables of running sequences live in one persistent int32 matrix, a row per sequence, kept
in step with each sequence's block list incrementally (a row is rewritten only when the sequence gets
a new block or a new table): a decode batch's tables, positions and cache slots are then a few numpy
operations per step, not a Python loop over tokens.

On the CUDA kernels the step's host arrays (token ids, positions and every attention index) reach the
device in one copy (ops/cuda/transfer.py), and decode-only steps replay CUDA graphs (cuda_graphs.py).
"""
from __future__ import annotations

import mmap

import numpy as np
import torch

from scalellm import ops
from scalellm.engine.cuda_graphs import SAMPLED_ROWS, DecodeGraphs
from scalellm.engine.piecewise_graphs import PiecewiseGraphs
from scalellm.engine.prompt_outputs import wanted_rows
from scalellm.engine.sequence import Sequence
from scalellm.model.llama import LlamaModel
from scalellm.ops.cuda.transfer import Transfer


def zeroed_cache(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled KV cache. On the CPU an anonymous mapping the OS zeroes page by page on first write, so
    a cache sized for the worst case costs resident memory only for the blocks written, and engines
    waiting for the garbage collector hold no more than they touched. (numpy's zeros would do the same but
    ask for huge pages, whose first-touch faults are far slower on virtual machines.)"""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=torch.uint8)[:nbytes].view(dtype).view(shape)


def kv_bytes_per_token(model: LlamaModel) -> int:
    c = model.config
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * model.dtype.itemsize


class BlockTables:
    """Rows of block ids for running sequences; a sequence keeps its row until released."""

    def __init__(self, max_blocks_per_seq: int, rows: int = 64):
        self.table = np.zeros((rows, max_blocks_per_seq), np.int32)
        self.free_rows = list(range(rows - 1, -1, -1))
        self.row_of: dict[int, int] = {}
        self.synced: dict[int, tuple[list[int], int]] = {}  # seq_id -> (the list synced, entries synced)

    def row(self, seq: Sequence) -> int:
        """The sequence's row, brought up to date with its block list."""
        row = self.row_of.get(seq.seq_id)
        if row is None:
            if not self.free_rows:
                self._grow()
            row = self.row_of[seq.seq_id] = self.free_rows.pop()
        blocks = seq.block_table
        synced_list, count = self.synced.get(seq.seq_id, (None, 0))
        if synced_list is not blocks:
            count = 0
        if count != len(blocks):
            self.table[row, count:len(blocks)] = blocks[count:]
            self.synced[seq.seq_id] = (blocks, len(blocks))
        return row

    def release(self, seq: Sequence) -> None:
        row = self.row_of.pop(seq.seq_id, None)
        if row is not None:
            self.free_rows.append(row)
            self.synced.pop(seq.seq_id, None)

    def _grow(self) -> None:
        rows = self.table.shape[0]
        self.table = np.concatenate([self.table, np.zeros_like(self.table)])
        self.free_rows.extend(range(2 * rows - 1, rows - 1, -1))


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, max_model_len: int,
                 graph_max_batch: int = 0, lora=None, max_step_tokens: int = 0):
        c = model.config
        self.model = model
        self.block_size = block_size
        self.device = model.embed.device
        self.kv_cache = zeroed_cache((c.num_layers, 2, num_blocks, block_size, c.num_kv_heads, c.head_dim),
                                     model.dtype, self.device)
        self.tables = BlockTables(-(-max_model_len // block_size) + 1)
        self.sliding_window = c.sliding_window
        self.lora = lora  # engine/lora_manager.LoRAManager, with LoRA on
        self.cuda_kernels = ops.uses_cuda_kernels(self.kv_cache)
        self.transfer = Transfer(self.device) if self.cuda_kernels else None
        self.graphs = self.pieces = None
        self.prev_tokens: torch.Tensor | None = None  # the last step's sampled ids, on the device
        if self.cuda_kernels and graph_max_batch > 0:
            # MoE layers read their rows per expert back to the host (to size the GEMMs): such steps are
            # graphed piecewise only, with the sparse MLPs between the pieces
            if not any(w.moe is not None for w in model.layers):
                self.graphs = DecodeGraphs(model, self.kv_cache, graph_max_batch, self.tables.table.shape[1],
                                           max_model_len, c.sliding_window)
            sampled = self.graphs.sampled if self.graphs is not None else torch.zeros(
                SAMPLED_ROWS, dtype=torch.int64, device=self.device)
            if max_step_tokens > 0:
                self.pieces = PiecewiseGraphs(model, self.kv_cache, max_step_tokens, sampled)

    def warm_up(self) -> None:
        """A prefill and decodes at both kernel sizes (serial and parallel builds), so every kernel is
        compiled (or loaded from numba's cache) before serving, the sampler's greedy and grammar-mask
        kernels with them; the cache is zeroed afterwards."""
        bs = self.block_size
        n = max(1, min(96, bs * self.kv_cache.shape[2] - 1))  # prefill rows past the parallel threshold
        blocks = list(range(-(-(n + 1) // bs)))
        dev = self.device
        meta = ops.build_attention_metadata(bs, list(range(n)), [], [], [(0, n, n, blocks)])
        self.model.forward(torch.zeros(n, dtype=torch.long, device=dev), torch.arange(n, device=dev), self.kv_cache,
                           meta)
        for rows in (1, 32):
            meta = ops.build_attention_metadata(bs, [n] * rows, [blocks] * rows, [n + 1] * rows, [])
            hidden = self.model.forward(torch.zeros(rows, dtype=torch.long, device=dev),
                                        torch.full((rows,), n, device=dev), self.kv_cache, meta)
            logits = self.model.logits(hidden, float32=False)
            ops.greedy_tokens(logits)  # the greedy kernel's builds too
            _warm_up_token_bitmask(logits)
        if self.graphs is not None:
            self.graphs.capture_all()
        if self.pieces is not None:
            self.pieces.capture_all()
        self.reset_cache()

    def reset_cache(self) -> None:
        """All zeros again. Without graphs (which hold the cache) a fresh one: its pages return to the OS and
        only blocks written from now on become resident (zeroed_cache)."""
        if self.graphs is None and self.pieces is None and self.device.type == "cpu":
            self.kv_cache = zeroed_cache(tuple(self.kv_cache.shape), self.kv_cache.dtype, self.device)
        else:
            self.kv_cache.zero_()

    def release(self, seq: Sequence) -> None:
        self.tables.release(seq)

    def _decode_arrays(self, decodes: list[Sequence]) -> dict[str, np.ndarray]:
        """A decode batch's host arrays: ids (-1 where the newest token is in flight; src names its row in
        the previous step's sampled ids, else -1), positions, cache slots, block tables and context bounds."""
        bs, nd = self.block_size, len(decodes)
        rows = np.fromiter([self.tables.row(s) for s in decodes], np.int64, nd)
        pos = np.fromiter([s.num_computed for s in decodes], np.int64, nd)
        ids = np.fromiter([s.token_ids[-1] if not s.num_in_flight else -1 for s in decodes], np.int64, nd)
        src = np.fromiter([s.sampled_row if s.num_in_flight else -1 for s in decodes], np.int64, nd)
        tables = self.tables.table[rows, :int(pos.max()) // bs + 1]
        lens = (pos + 1).astype(np.int32)
        starts = np.zeros_like(lens) if self.sliding_window is None else np.maximum(lens - self.sliding_window, 0)
        return dict(ids=ids, src=src, positions=pos, slots=tables[np.arange(nd), pos // bs].astype(np.int64) * bs
                    + pos % bs, tables=tables, starts=starts.astype(np.int32), lens=lens)

    def graph_mode(self, decodes: list[Sequence], sampling_rows) -> str | None:
        """How a decode-only batch runs from CUDA graphs: sampling_rows(decodes) (the sampler's choice: a
        whole-step mode with its arrays, or "forward"), or None (piecewise or eagerly: no decode graphs, too
        many rows, an adapter in the step)."""
        if (self.graphs is None or not self.graphs.covers(len(decodes)) or not self._prev_fits()
                or any(s.params.lora_name for s in decodes)):
            return None
        return sampling_rows(decodes)

    def decode_step(self, decodes: list[Sequence], mode: str, sampling: dict[str, np.ndarray] | None
                    ) -> torch.Tensor:
        """A decode batch from its graph: the sampled ids on the device (mode "greedy"/"sample"), or the
        logits (mode "forward")."""
        out = self.graphs.run(mode, self._decode_arrays(decodes), sampling, self._prev_for(decodes))
        return out if mode != "forward" else self.model.logits(out, float32=False)

    def _prev_fits(self) -> bool:
        """The last step's sampled ids fit the graphs' buffer of them (else this step runs eagerly)."""
        return self.prev_tokens is None or self.prev_tokens.shape[0] <= SAMPLED_ROWS

    def _prev_for(self, seqs) -> torch.Tensor | None:
        return self.prev_tokens if any(s.num_in_flight for s in seqs) else None

    def run(self, decodes: list[Sequence], prefills: list[tuple[Sequence, int]]
            ) -> tuple[torch.Tensor, list[Sequence], list[tuple[Sequence, int, torch.Tensor]]]:
        """One forward pass: every decode sequence's next token, then each chunk (sequence, tokens): a
        prompt's next tokens, or a sequence's newest token and its drafts (seq.draft) to verify.
        Returns the logits (in the model's dtype) of the sequences whose tokens are now all computed, and
        those sequences: one row each, in order, except that a sequence verifying k drafts has k + 1 rows
        (the target's logits after its newest token and after each draft); a prompt that samples nothing
        (scoring, embedding) has none. Third, the prompt rows sequences asked for (prompt_outputs.py):
        (sequence, first position, float32 logits or, for an embedding, final-normed hidden states).
        A token still in flight (one step ahead) is read from prev_tokens on the device."""
        bs = self.block_size
        nd = len(decodes)
        ids_parts, src_parts, pos_parts, slot_parts = [], [], [], []
        tables = lens = None
        if nd:
            d = self._decode_arrays(decodes)
            ids_parts.append(d["ids"])
            src_parts.append(d["src"])
            pos_parts.append(d["positions"])
            slot_parts.append(d["slots"])
            tables, lens = d["tables"], d["lens"]
        specs, extras, extra_rows = [], [], []
        ready = list(decodes)
        rows_out = list(range(nd))
        offset = nd
        for seq, n in prefills:
            start = seq.num_computed
            pos = np.arange(start, start + n, dtype=np.int64)
            table = np.asarray(seq.block_table, dtype=np.int64)
            ids = seq.token_ids[start:start + n] if not seq.draft else seq.token_ids[start:] + seq.draft
            src = np.full(n, -1, np.int64)
            if len(ids) < n:  # a forked sample's first token, in flight
                src[len(ids):] = seq.sampled_row
                ids = ids + [-1] * (n - len(ids))
            ids_parts.append(np.asarray(ids, dtype=np.int64))
            src_parts.append(src)
            pos_parts.append(pos)
            slot_parts.append(table[pos // bs] * bs + pos % bs)
            specs.append((offset, n, start + n, seq.block_table))
            wanted = wanted_rows(seq, start, n) if start < seq.prompt_len else None
            if wanted is not None:
                lo, hi = wanted
                extras.append((seq, start + lo, hi - lo))
                extra_rows.extend(range(offset + lo, offset + hi))
            offset += n
            if seq.draft:
                ready.append(seq)
                rows_out.extend(range(offset - n, offset))
            elif start + n == seq.num_tokens + seq.num_in_flight and not seq.params.prompt_only:
                ready.append(seq)
                rows_out.append(offset - 1)
        meta = ops.build_attention_metadata(bs, _cat(slot_parts), tables if nd else [], lens if nd else [], specs,
                                            self.sliding_window)
        rows = rows_out + extra_rows
        gather = np.asarray(rows, np.int64) if len(rows) != offset or extra_rows else None  # rows we need
        src = _cat(src_parts)
        src = src if (src >= 0).any() else None
        lora = None
        if self.lora is not None:
            lora = self.lora.batch([s.params.lora_name for s in decodes] + [s.params.lora_name for s, _ in prefills],
                                   [1] * nd + [n for _, n in prefills])
        if self.cuda_kernels:
            hidden = self._forward_on_cuda_kernels(_cat(ids_parts), src, _cat(pos_parts), meta, gather, lora)
        else:
            ids = torch.from_numpy(_cat(ids_parts))
            if src is not None:
                ids = in_flight_ids(ids, torch.from_numpy(src), self.prev_tokens)
            hidden = self.model.forward(ids, torch.from_numpy(_cat(pos_parts)), self.kv_cache, meta, lora)
            if gather is not None:
                hidden = hidden[torch.from_numpy(gather)]
        if extras:
            hidden, extras = hidden[:len(rows_out)], self._prompt_rows(hidden[len(rows_out):], extras)
        return self.model.logits(hidden, float32=False), ready, extras  # the sampler widens them where it must

    def _prompt_rows(self, hidden: torch.Tensor, extras: list) -> list[tuple[Sequence, int, torch.Tensor]]:
        """Each sequence's prompt rows: logits in float32 for scoring, final-normed states for a pool."""
        out, at = [], 0
        model = self.model
        for seq, first, count in extras:
            h = hidden[at:at + count]
            at += count
            if seq.pool is not None:
                out.append((seq, first, ops.rms_norm(h.contiguous(), model.final_norm, model.config.rms_norm_eps)))
            else:
                out.append((seq, first, model.logits(h.contiguous(), float32=True)))
        return out

    def _forward_on_cuda_kernels(self, input_ids: np.ndarray, src: np.ndarray | None, positions: np.ndarray,
                                 meta: ops.AttentionMetadata, gather: np.ndarray | None, lora=None) -> torch.Tensor:
        """Everything the step reads goes to the device in one copy; nothing here waits for the device.
        Without LoRA, the forward pass replays piecewise graphs (piecewise_graphs.py)."""
        n, in_flight = input_ids.shape[0], src is not None
        pieces = self.pieces if (self.pieces is not None and lora is None and self.pieces.covers(n)
                                  and self._prev_fits()) else None
        host = {"input_ids": input_ids, "positions": positions, **ops.kernel_arrays(meta)}
        if pieces is not None:  # padded to the pieces' token count
            t = pieces.bucket(n)
            host.update(input_ids=_pad(input_ids, t, 0), positions=_pad(positions, t, 0),
                        src=_pad(src if src is not None else np.empty(0, np.int64), t, -1),
                        piece_slots=_pad(meta.slot_mapping, t, -1))
        elif src is not None:
            host["src"] = src
        if gather is not None:
            host["gather"] = gather
        arrays = self.transfer(host)
        ids, pos, rows = arrays.pop("input_ids"), arrays.pop("positions"), arrays.pop("gather", None)
        src, slots = arrays.pop("src", None), arrays.pop("piece_slots", None)
        meta.device = arrays
        meta.slot_mapping = arrays["slot_mapping"]
        if pieces is not None:
            hidden = pieces.run({"ids": ids, "src": src, "positions": pos, "slots": slots}, n, meta,
                                self.prev_tokens if in_flight else None)
        else:
            if src is not None:
                ids = in_flight_ids(ids, src, self.prev_tokens)
            hidden = self.model.forward(ids, pos, self.kv_cache, meta, lora)
        return hidden if rows is None else hidden[rows]


def in_flight_ids(ids: torch.Tensor, src: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
    """Token ids with those still in flight (src >= 0: their row in the previous step's sampled ids) read
    on the device."""
    return torch.where(src >= 0, prev_tokens[src.clamp(min=0)], ids)


def split_batch(items: list[tuple[Sequence, int]]) -> tuple[list[Sequence], list[tuple[Sequence, int]]]:
    """A step's (sequence, tokens) into run()'s decodes and chunks: a decode is a sequence's one last
    token; a one-token chunk of a longer prompt, and a prompt nothing is sampled after, are chunks."""
    decodes, chunks = [], []
    for seq, n in items:
        if n == 1 and seq.num_computed + 1 == seq.num_tokens + seq.num_in_flight and not seq.params.prompt_only:
            decodes.append(seq)
        else:
            chunks.append((seq, n))
    return decodes, chunks


def _warm_up_token_bitmask(logits: torch.Tensor) -> None:
    """Builds the grammar-mask kernel for these logits' rows (one row: the serial build; 32: the parallel
    one), on the logits in the model's dtype and in float32, with a mask that allows every token."""
    rows = torch.arange(logits.shape[0], dtype=torch.int32, device=logits.device)
    allow_all = torch.full((logits.shape[0], -(-logits.shape[1] // 32)), -1, dtype=torch.int32, device=logits.device)
    for x in (logits, logits.float()):
        ops.apply_token_bitmask(x, rows, allow_all)


def _pad(a: np.ndarray, length: int, value: int) -> np.ndarray:
    out = np.full(length, value, np.int64)
    out[:len(a)] = a
    return out


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
