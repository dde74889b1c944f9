"""torch compositions of the ops: the reference the kernels are tested against, and the CPU engine's
path for SiLU-mul (faster than its numba twin) and prefill-chunk attention (SDPA over the gathered
context). Numerics follow transformers, so float32 runs match it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from scalellm.ops.attention_metadata import PrefillChunk


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """residual += x; return (rms_norm(residual), residual)."""
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, head_dim] (rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [tokens, kv_heads, head_dim]; caches: [num_blocks, block_size, kv_heads, head_dim]."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)


def rotary_inplace(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> None:
    c, s = cos[positions], sin[positions]
    q.copy_(rotary(q, c, s))
    k.copy_(rotary(k, c, s))


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
