"""Steps of any shape from CUDA graphs, piecewise: everything but attention and sparse MLPs captured.

Mixed prefill/decode steps, prefill chunks, decode batches above the decode graphs and mixture-of-experts
steps cannot be one graph: attention's launches depend on the step's layout of chunks, and a sparse MLP
reads its rows per expert back to size its GEMMs. Here the forward pass is cut at those points. The pieces
between (embedding, norms, GEMMs, the fused qkv/rotary/KV-write kernel, SiLU-mul, residuals) are captured
once per padded token count; attention and sparse MLPs run eagerly between replays, on the real tokens.

Pieces pass the residual stream, q and attention's output through fixed buffers (a copy into them ends
each piece; the attention kernels write into theirs), so no piece's output has to outlive its replay. Padded tokens write no cache slot (-1) and
are dropped at the end. In-flight token ids (one step ahead) are read from the shared sampled-ids
buffer, as the decode graphs do. Without a GPU the pieces run eagerly over the same buffers.
"""
from __future__ import annotations

import torch

PIECE_TOKENS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


def token_buckets(max_tokens: int) -> list[int]:
    return sorted({t for t in PIECE_TOKENS if t < max_tokens} | {max_tokens})


class PiecewiseGraphs:
    def __init__(self, model, kv_cache: torch.Tensor, max_tokens: int, sampled: torch.Tensor):
        dev, c = kv_cache.device, model.config
        self.model, self.kv_cache, self.sampled = model, kv_cache, sampled
        self.capture = dev.type == "cuda"
        self.buckets = token_buckets(max_tokens)
        self.max_tokens = max_tokens
        t, i64 = max_tokens, dict(dtype=torch.int64, device=dev)
        self.ids, self.src, self.positions = torch.zeros(t, **i64), torch.full((t,), -1, **i64), torch.zeros(t, **i64)
        self.slots = torch.full((t,), -1, **i64)
        self.h = torch.zeros(t, c.hidden_size, dtype=model.dtype, device=dev)
        self.q = torch.zeros(t, c.num_heads, c.head_dim, dtype=model.dtype, device=dev)
        self.attn = torch.zeros(t, c.num_heads * c.head_dim, dtype=model.dtype, device=dev)
        self.pieces = self._pieces()
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = None

    def covers(self, num_tokens: int) -> bool:
        return num_tokens <= self.max_tokens

    def _pieces(self) -> list[tuple]:
        """The forward pass as (piece, eager part) pairs: a piece is a function of the padded token count,
        reading and writing the buffers; the eager part after it is ("attention", layer), ("sparse",
        layer) or None (the end)."""
        model, n_layers = self.model, len(self.model.layers)
        caches = model.layer_caches(self.kv_cache)

        def start(t):
            src = self.src[:t]
            ids = torch.where(src >= 0, self.sampled[src.clamp(min=0)], self.ids[:t])
            h = model.embed_tokens(ids)
            self.h[:t].copy_(h)
            self.q[:t].copy_(model.attention_in(0, h, self.positions[:t], caches[0], self.slots[:t]))

        def after_attention(i):
            def piece(t):
                h = model.attention_out(i, self.attn[:t], self.h[:t])
                self.h[:t].copy_(h)
                if model.layers[i].moe is None and i + 1 < n_layers:
                    self.q[:t].copy_(model.attention_in(i + 1, h, self.positions[:t], caches[i + 1], self.slots[:t]))
            return piece

        def attention_in(i):
            def piece(t):
                self.q[:t].copy_(model.attention_in(i, self.h[:t], self.positions[:t], caches[i], self.slots[:t]))
            return piece

        out = [(start, ("attention", 0))]
        for i, w in enumerate(model.layers):
            if w.moe is None:
                out.append((after_attention(i), ("attention", i + 1) if i + 1 < n_layers else None))
            else:
                out.append((after_attention(i), ("sparse", i)))
                if i + 1 < n_layers:
                    out.append((attention_in(i + 1), ("attention", i + 1)))
        return out

    def _replay(self, k: int, t: int) -> None:
        piece = self.pieces[k][0]
        if not self.capture:
            piece(t)
            return
        graph = self.graphs.get((k, t))
        if graph is None:
            piece(t)  # eager first: kernels compiled, workspaces sized
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                piece(t)
            self.pool = graph.pool()
            self.graphs[k, t] = graph
            return
        graph.replay()

    def capture_all(self) -> None:
        """Capture every piece at every token count (warm-up, before serving), writing no cache slot."""
        if self.capture:
            self.slots.fill_(-1)
            self.src.fill_(-1)
            for t in reversed(self.buckets):
                for k in range(len(self.pieces)):
                    self._replay(k, t)

    def bucket(self, num_tokens: int) -> int:
        return next(b for b in self.buckets if b >= num_tokens)

    def run(self, arrays: dict[str, torch.Tensor], n: int, meta, prev_tokens: torch.Tensor | None
            ) -> torch.Tensor:
        """The residual stream [n, hidden] after the last layer. arrays: the step's device arrays from its
        one copy, padded by the host to the bucket's token count (padding: token 0 at position 0, src -1,
        slot -1: it writes no cache slot): ids, src, positions, slots; meta: attention's, for the eager parts;
        prev_tokens: the previous step's sampled ids when tokens are in flight."""
        t = arrays["ids"].shape[0]
        for name in ("ids", "src", "positions", "slots"):
            getattr(self, name)[:t].copy_(arrays[name])
        if prev_tokens is not None and prev_tokens.data_ptr() != self.sampled.data_ptr():
            self.sampled[:prev_tokens.shape[0]].copy_(prev_tokens)
        model, caches = self.model, self.model.layer_caches(self.kv_cache)
        for k, (_, eager) in enumerate(self.pieces):
            self._replay(k, t)
            if eager is None:
                break
            kind, i = eager
            if kind == "attention":
                model.attention(self.q[:n], caches[i], meta, out=self.attn[:n])  # written in place
            else:
                self.h[:n].copy_(model.sparse_mlp(i, self.h[:n]))
        return self.h[:n]
