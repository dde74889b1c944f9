"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) and its mixture-of-experts members (Mixtral,
Qwen2-MoE, Qwen3-MoE) over a paged KV cache.

Weights are held fused (qkv, gate_up) so each dense layer runs four GEMMs; the residual adds ride in
the GEMMs after attention and the MLP, and the GEMMs take the RMSNorm before them and the SiLU-and-multiply
(small-batch kernels do it on their way in). A sparse layer's MLP is the fused MoE layer (ops/moe.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scalellm import ops
from scalellm.model.config import ModelConfig


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: ops.Linear  # q, k and v projections fused (with Qwen2's bias)
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: ops.Linear
    post_norm: torch.Tensor
    gate_up: ops.Linear | None  # gate and up projections fused (None in a sparse layer)
    down: ops.Linear | None
    moe: ops.MoEWeights | None = None  # the experts of a sparse layer


class LlamaModel:
    def __init__(self, config: ModelConfig, embed: torch.Tensor | ops.QuantizedTensor, layers: list[LayerWeights],
                 final_norm: torch.Tensor, lm_head: ops.Linear | ops.QuantizedLinear, max_positions: int):
        self.config = config
        self.embed = embed  # dense, or block-quantized (rows dequantized at lookup)
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.dtype = final_norm.dtype
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim ** -0.5
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * config.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scaling = config.rope_attention_scaling
        self.cos = (emb.cos() * scaling).to(device=embed.device, dtype=self.dtype)
        self.sin = (emb.sin() * scaling).to(device=embed.device, dtype=self.dtype)
        for t in [self.cos, self.sin, final_norm] + [x for w in layers for x in
                                                     (w.input_norm, w.post_norm, w.q_norm, w.k_norm) if x is not None]:
            ops.keep_numba_view(t)
        self._cache_views: tuple[int, list] = (0, [])

    def _projections(self) -> list:
        out = [self.lm_head] if not self.config.tie_word_embeddings else []
        for w in self.layers:
            out += [lin for lin in (w.qkv, w.o_proj, w.gate_up, w.down) if lin is not None]
            out += w.moe.linears if w.moe is not None else []
        return out

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights held (both copies where a projection keeps two, the packed and the plain)."""
        embed = self.embed.nbytes if isinstance(self.embed, ops.QuantizedTensor) else \
            self.embed.numel() * self.embed.element_size()
        norms = [self.final_norm] + [x for w in self.layers for x in (w.input_norm, w.post_norm, w.q_norm, w.k_norm)
                                     if x is not None]
        head = 0
        if self.config.tie_word_embeddings:  # the head may share the embedding and add a packed copy
            head = self.lm_head.nbytes - (embed if self.lm_head.weight is self.embed else 0)
        return embed + head + sum(t.numel() * t.element_size() for t in norms) + \
            sum(p.nbytes for p in self._projections())

    @property
    def weight_formats(self) -> dict[str, int]:
        """How many weight matrices are held in each format (q8_0, q4_0, q4_1, or the dense dtype)."""
        counts: dict[str, int] = {}
        mats = [self.embed] + [getattr(p, "weight", None) if isinstance(p, ops.QuantizedLinear) else p
                               for p in self._projections()]
        for m in mats:
            name = m.format if isinstance(m, ops.QuantizedTensor) else str(m.dtype).replace("torch.", "")
            counts[name] = counts.get(name, 0) + 1
        return counts

    def layer_caches(self, kv_cache: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (k, v) views of the cache [layers, 2, blocks, block, kv_heads, head_dim], made once."""
        key, views = self._cache_views
        if key != kv_cache.data_ptr() or len(views) != kv_cache.shape[0]:
            views = [(ops.keep_numba_view(kv_cache[i, 0]), ops.keep_numba_view(kv_cache[i, 1]))
                     for i in range(kv_cache.shape[0])]
            self._cache_views = (kv_cache.data_ptr(), views)
        return views

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: ops.AttentionMetadata, lora=None) -> torch.Tensor:
        """Returns the residual stream after the last layer [tokens, hidden] (logits() applies the final
        norm to the rows it needs); kv_cache: [layers, 2, blocks, block, kv_heads, head_dim]. lora: the
        step's adapters (engine/lora_manager.LoRABatch: add(layer, projection, input, output)).
        The pieces below are what CUDA graphs capture piecewise (engine/piecewise_graphs.py)."""
        caches = self.layer_caches(kv_cache)
        h = self.embed_tokens(input_ids)
        for i, w in enumerate(self.layers):
            q = self.attention_in(i, h, positions, caches[i], meta.slot_mapping, lora)
            attn = self.attention(q, caches[i], meta)
            h = self.attention_out(i, attn, h, lora)
            if w.moe is not None:
                h = self.sparse_mlp(i, h)
        return h

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return ops.embedding(input_ids, self.embed, self.dtype)

    def attention_in(self, i: int, h: torch.Tensor, positions: torch.Tensor, cache, slot_mapping, lora=None
                     ) -> torch.Tensor:
        """Layer i's normed qkv projection, q/k norms and rotary, k and v written to the cache -> q."""
        cfg, w = self.config, self.layers[i]
        eps = cfg.rms_norm_eps
        if lora is None:
            qkv = w.qkv(h, norm=w.input_norm, eps=eps)
        else:  # the adapters read the normed input: the norm runs as its own op
            x = ops.rms_norm(h, w.input_norm, eps)
            qkv = lora.add(i, "qkv", x, w.qkv(x))
        return ops.attention_inputs(qkv, positions, self.cos, self.sin, w.q_norm, w.k_norm, eps, cfg.num_heads,
                                    cfg.num_kv_heads, cache[0], cache[1], slot_mapping)

    def attention(self, q: torch.Tensor, cache, meta: ops.AttentionMetadata, out=None) -> torch.Tensor:
        """out: on the CUDA kernels, a [tokens, q_size] buffer the kernels write into (piecewise graphs')."""
        view = None if out is None else out.view(q.shape)
        return ops.paged_attention(q, cache[0], cache[1], meta, self.scale, view).view(q.shape[0], self.q_size)

    def attention_out(self, i: int, attn: torch.Tensor, h: torch.Tensor, lora=None) -> torch.Tensor:
        """Layer i's output projection onto the residual, then its dense MLP (a sparse one: sparse_mlp)."""
        w, eps = self.layers[i], self.config.rms_norm_eps
        h = w.o_proj(attn, residual=h) if lora is None else lora.add(i, "o_proj", attn, w.o_proj(attn, residual=h))
        if w.moe is not None:
            return h
        if lora is None:
            return w.down(w.gate_up(h, norm=w.post_norm, eps=eps), residual=h, silu_mul=True)
        x = ops.rms_norm(h, w.post_norm, eps)
        act = ops.silu_mul(lora.add(i, "gate_up", x, w.gate_up(x)))
        return lora.add(i, "down", act, w.down(act, residual=h))

    def sparse_mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        w = self.layers[i]
        return ops.fused_moe(ops.rms_norm(h, w.post_norm, self.config.rms_norm_eps), w.moe, residual=h)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """Final norm and LM head over the given rows of forward()'s output -> logits, in float32 or (float32
        False) in the model's dtype, as the head computed them."""
        out = self.lm_head(hidden, norm=self.final_norm, eps=self.config.rms_norm_eps)
        return out.float() if float32 else out
