"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) over a paged KV cache.

Weights are held fused (qkv, gate_up) so each layer runs four GEMMs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scalellm import ops
from scalellm.model.config import ModelConfig


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


class LlamaModel:
    def __init__(self, config: ModelConfig, embed: torch.Tensor, layers: list[LayerWeights],
                 final_norm: torch.Tensor, lm_head: torch.Tensor, max_positions: int):
        self.config = config
        self.embed = embed
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.dtype = embed.dtype
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim ** -0.5
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * config.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scaling = config.rope_attention_scaling
        self.cos = (emb.cos() * scaling).to(self.dtype)
        self.sin = (emb.sin() * scaling).to(self.dtype)

    @property
    def num_parameters(self) -> int:
        tensors = [self.embed, self.final_norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        tensors += [t for w in self.layers for t in vars(w).values() if t is not None]
        return sum(t.numel() for t in tensors)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: ops.AttentionMetadata) -> torch.Tensor:
        """Returns final hidden states [tokens, hidden]; kv_cache: [layers, 2, blocks, block, kvh, hd]."""
        cfg = self.config
        hidden = F.embedding(input_ids, self.embed)
        residual = None
        for i, w in enumerate(self.layers):
            if residual is None:
                residual = hidden
                x = ops.rms_norm(hidden, w.input_norm, cfg.rms_norm_eps)
            else:
                x, residual = ops.add_rms_norm(hidden, residual, w.input_norm, cfg.rms_norm_eps)
            qkv = F.linear(x, w.qkv, w.qkv_bias)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(-1, cfg.num_heads, cfg.head_dim)
            k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)
            v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
            if w.q_norm is not None:
                q = ops.rms_norm(q, w.q_norm, cfg.rms_norm_eps)
                k = ops.rms_norm(k, w.k_norm, cfg.rms_norm_eps)
            ops.rotary(q, k, positions, self.cos, self.sin)
            ops.write_kv(k, v, kv_cache[i, 0], kv_cache[i, 1], meta.slot_mapping)
            attn = ops.paged_attention(q, kv_cache[i, 0], kv_cache[i, 1], meta, self.scale)
            hidden = F.linear(attn.reshape(-1, self.q_size), w.o_proj)
            x, residual = ops.add_rms_norm(hidden, residual, w.post_norm, cfg.rms_norm_eps)
            hidden = F.linear(ops.silu_mul(F.linear(x, w.gate_up)), w.down)
        out, _ = ops.add_rms_norm(hidden, residual, self.final_norm, cfg.rms_norm_eps)
        return out

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()
