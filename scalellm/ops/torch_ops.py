"""Prefill-chunk attention on the CPU through torch SDPA over the chunk's gathered context."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from scalellm.ops.attention_metadata import PrefillChunk


def prefill_chunk_attention(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            chunk: PrefillChunk, scale: float) -> None:
    """Writes out[chunk rows]: the chunk's queries attend causally to the cached context."""
    kv_heads, head_dim = k_cache.shape[-2:]
    s, n = chunk.query_start, chunk.query_len
    keys = k_cache.view(-1, kv_heads, head_dim)[chunk.key_slots].transpose(0, 1)[None]  # [1, kvh, ctx, D]
    values = v_cache.view(-1, kv_heads, head_dim)[chunk.key_slots].transpose(0, 1)[None]
    qs = q[s:s + n].transpose(0, 1)[None]
    o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=chunk.mask, is_causal=chunk.mask is None,
                                       scale=scale, enable_gqa=True)
    out[s:s + n] = o[0].transpose(0, 1)
