"""The operations model code calls; one interface, and the backend follows the tensors' device.

CPU tensors: numba kernels for decode attention and fused sampling (scalellm/ops/cpu_*.py); torch
for the elementwise ops and prefill attention (scalellm/ops/torch_ops.py), which measured faster than
their numba twins (scalellm/ops/cpu_kernels.py, kept and tested as the CPU twins of the CUDA kernels).
CUDA tensors: the CuPy kernels (scalellm/ops/cuda_backend.py, imported only then). GEMMs go through
torch on both.
"""
from __future__ import annotations

import torch

from scalellm.ops import cpu_sampling, torch_ops
from scalellm.ops.attention_metadata import AttentionMetadata, PrefillChunk, build_attention_metadata
from scalellm.ops.cpu_attention import paged_decode_attention as _cpu_decode_attention


def _cuda():
    from scalellm.ops import cuda_backend

    return cuda_backend


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return (_cuda() if x.is_cuda else torch_ops).rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """residual + x -> (rms_norm(residual + x) * weight, residual + x)."""
    return (_cuda() if x.is_cuda else torch_ops).add_rms_norm(x, residual, weight, eps)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q [tokens, heads, dim] and k [tokens, kv_heads, dim] in place (rotate-half layout);
    cos/sin: [max_positions, dim] caches indexed by positions."""
    (_cuda() if q.is_cuda else torch_ops).rotary_inplace(q, k, positions, cos, sin)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    return (_cuda() if x.is_cuda else torch_ops).silu_mul(x)


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    (_cuda() if k.is_cuda else torch_ops).write_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """q: [tokens, heads, dim], decode tokens first -> attention output of the same shape."""
    if q.is_cuda:
        return _cuda_paged_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if nd:
        out[:nd] = _cpu_decode_attention(q[:nd], k_cache, v_cache, meta.decode_block_tables,
                                         meta.decode_context_starts, meta.decode_context_lens, scale)
    for chunk in meta.prefills:
        torch_ops.prefill_chunk_attention(out, q, k_cache, v_cache, chunk, scale)
    return out


def _cuda_paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    cb, dev = _cuda(), q.device
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if nd:
        out[:nd] = cb.paged_decode_attention(q[:nd], k_cache, v_cache, meta.decode_block_tables.to(dev),
                                             meta.decode_context_starts.to(dev), meta.decode_context_lens.to(dev),
                                             scale)
    for chunk in meta.prefills:
        s, n = chunk.query_start, chunk.query_len
        positions = torch.arange(chunk.context_len - n, chunk.context_len, device=dev)
        table = torch.tensor([chunk.block_table], dtype=torch.int32, device=dev)
        out[s:s + n] = cb.prefill_attention(q[s:s + n], k_cache, v_cache, torch.zeros(n, dtype=torch.int32, device=dev),
                                            positions, table, scale, meta.sliding_window or 0)
    return out


def fused_sample(logits: torch.Tensor, batch):
    return (_cuda() if logits.is_cuda else cpu_sampling).fused_sample(logits, batch)


__all__ = ["AttentionMetadata", "PrefillChunk", "build_attention_metadata", "add_rms_norm", "fused_sample",
           "paged_attention", "rms_norm", "rotary", "silu_mul", "write_kv"]
