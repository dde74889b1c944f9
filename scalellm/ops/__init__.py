"""The operations model code calls; one interface, and the backend follows the tensors' device.

CPU tensors: numba kernels (ops/cpu/: kernels.py, attention.py, sampling.py, bitmask.py) for norms, attention inputs, decode attention (and bfloat16 prefill attention, each token
as a decode over its causal context), small-batch GEMMs, sampling and grammar masks; torch for larger
GEMMs (oneDNN with weights packed at load, ops/linear.py), SiLU-mul in float32 and float32
prefill attention (SDPA over the gathered context, ops/torch_ops.py).
CUDA tensors: the CuPy kernels (ops/cuda/backend.py, imported only then), GEMMs through torch.
Inside `cuda_kernels_on_cpu()`, CPU tensors take the CUDA kernels too, run through their host build
(ops/cuda/host/): how the engine is tested end to end on the CUDA kernels without a GPU.
Block-quantized weights (GGUF) live in ops/quant/. Backend-neutral pieces stay here: attention
metadata, projections, LoRA, MoE, sampling batches and the torch reference compositions.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from scalellm.ops import jit
from scalellm.ops.cpu.openmp import share_torch_openmp

jit.install()  # before any kernel is defined: the compile cache's folder, and the compile record
share_torch_openmp()  # before any numba kernel starts a thread pool

from scalellm.ops import torch_ops  # noqa: E402
from scalellm.ops.cpu import attention as cpu_attention  # noqa: E402
from scalellm.ops.cpu import bitmask as cpu_bitmask  # noqa: E402
from scalellm.ops.cpu import kernels as cpu_kernels  # noqa: E402
from scalellm.ops.cpu import sampling as cpu_sampling  # noqa: E402
from scalellm.ops.attention_metadata import (AttentionMetadata, PrefillChunk, build_attention_metadata,  # noqa: E402
                                             kernel_arrays, prefill_as_decode, tensor)
from scalellm.ops.cpu.attention import decode_attention as _cpu_decode_attention  # noqa: E402
from scalellm.ops.linear import Linear  # noqa: E402
from scalellm.ops.lora import add_lora, add_lora_bgmv, add_lora_grouped  # noqa: E402
from scalellm.ops.moe import MoEWeights, fused_moe_cuda_kernels  # noqa: E402
from scalellm.ops.moe import fused_moe as _cpu_fused_moe  # noqa: E402
from scalellm.ops.cpu.numba_util import as_numba, keep_numba_view, new_tensor  # noqa: E402
from scalellm.ops.quant.linear import QuantizedLinear, embedding  # noqa: E402
from scalellm.ops.quant.tensor import QuantizedTensor  # noqa: E402


_kernels_on_cpu = False


@contextlib.contextmanager
def cuda_kernels_on_cpu(enabled: bool = True):
    """Run the CUDA kernels' host build for CPU tensors inside the block (a test-only backend)."""
    global _kernels_on_cpu
    previous, _kernels_on_cpu = _kernels_on_cpu, enabled
    try:
        yield
    finally:
        _kernels_on_cpu = previous


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits [rows, vocab] and a target token per row -> each target's log-probability and rank
    (1: the most likely), on the host."""
    if logits.device.type == "cpu":
        return cpu_sampling.token_logprobs(logits, targets.cpu())
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, targets[:, None])
    return chosen[:, 0].cpu(), ((logprobs > chosen).sum(1, dtype=torch.int32) + 1).cpu()


def uses_cuda_kernels(x: torch.Tensor) -> bool:
    """Whether ops on tensors like x run the CUDA kernels (on the GPU, or through their host build)."""
    return x.is_cuda or _kernels_on_cpu


def _cuda():
    from scalellm.ops.cuda import backend as cuda_backend

    return cuda_backend


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return (_cuda() if uses_cuda_kernels(x) else cpu_kernels).rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """residual + x -> (rms_norm(residual + x) * weight, residual + x)."""
    return (_cuda() if uses_cuda_kernels(x) else cpu_kernels).add_rms_norm(x, residual, weight, eps)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q [tokens, heads, dim] and k [tokens, kv_heads, dim] in place (rotate-half layout);
    cos/sin: [max_positions, dim] caches indexed by positions."""
    (_cuda() if uses_cuda_kernels(q) else cpu_kernels).rotary_inplace(q, k, positions, cos, sin)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """[tokens, 2n] (gate | up) -> silu(gate) * up. On the CPU, bfloat16 in one numba pass; float32 through
    torch, whose exp the float32 token-identity results are pinned to (the numba kernel's exp differs in
    the last bits, which is enough to change the bundled Q4_1 model's greedy answer)."""
    if uses_cuda_kernels(x):
        return _cuda().silu_mul(x)
    return (cpu_kernels if x.dtype == torch.bfloat16 else torch_ops).silu_mul(x)


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    if uses_cuda_kernels(k):
        _cuda().write_kv(k, v, k_cache, v_cache, tensor(slot_mapping, k.device))
    else:
        cpu_kernels.write_kv(k, v, k_cache, v_cache, tensor(slot_mapping))


def attention_inputs(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float, num_heads: int,
                     num_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: np.ndarray) -> torch.Tensor:
    """From the fused qkv projection [tokens, (heads + 2 kv_heads) * head_dim]: per-head q/k RMSNorm (when
    the model has it), rotary on q and k, k and v written to the cache; returns q [tokens, heads, head_dim]."""
    if uses_cuda_kernels(qkv):
        return _cuda_attention_inputs(qkv, positions, cos, sin, q_norm, k_norm, eps, num_heads, num_kv_heads,
                                      k_cache, v_cache, slot_mapping)
    return cpu_kernels.attention_inputs(qkv, positions, cos, sin, q_norm, k_norm, eps, num_heads, num_kv_heads,
                                        k_cache, v_cache, tensor(slot_mapping))


def _cuda_attention_inputs(qkv, positions, cos, sin, q_norm, k_norm, eps, num_heads, num_kv_heads, k_cache,
                           v_cache, slot_mapping):
    """One launch (qkv_prep.cu) for head dims it is built for; else norms, rotary and kv_write (up to 4)."""
    cb, dim = _cuda(), k_cache.shape[-1]
    if cb.takes_qkv_prep(qkv, k_cache, v_cache):
        return cb.qkv_prep(qkv, positions, cos, sin, q_norm, k_norm, eps, num_heads, num_kv_heads, k_cache, v_cache,
                           tensor(slot_mapping, qkv.device))
    q, k, v = qkv.split([num_heads * dim, num_kv_heads * dim, num_kv_heads * dim], dim=-1)
    q, k, v = q.view(-1, num_heads, dim), k.view(-1, num_kv_heads, dim), v.view(-1, num_kv_heads, dim)
    if q_norm is not None:
        q, k = cb.rms_norm(q, q_norm, eps), cb.rms_norm(k, k_norm, eps)
    cb.rotary_inplace(q, k, positions, cos, sin)  # in place, on the views into qkv when there is no norm
    cb.write_kv(k, v, k_cache, v_cache, tensor(slot_mapping, qkv.device))
    return q


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [tokens, heads, dim], decode tokens first -> attention output of the same shape. out: on the CUDA
    kernels, where the kernels write it (contiguous, q's shape; e.g. a graph's fixed buffer)."""
    if uses_cuda_kernels(q):
        return _cuda_paged_attention(q, k_cache, v_cache, meta, scale, out)
    if out is not None:
        raise ValueError("paged_attention writes into out on the CUDA kernels only")
    out = new_tensor(q.shape, q.dtype)
    q_np, k_np, v_np, out_np = as_numba(q), as_numba(k_cache), as_numba(v_cache), as_numba(out)
    with_prefills = bool(meta.prefills) and cpu_attention.IR_PREFILL and cpu_attention.takes_ir(q.shape[1], k_np, v_np)
    rows = _cpu_decode_rows(meta, with_prefills)
    if rows is not None:
        n = len(rows[2])
        _cpu_decode_attention(q_np[:n], k_np, v_np, *rows[:3], scale, out_np[:n], rows[3])
    if not with_prefills:
        for chunk in meta.prefills:
            torch_ops.prefill_chunk_attention(out, q, k_cache, v_cache, chunk, scale)
    return out


def _cpu_decode_rows(meta: AttentionMetadata, with_prefills: bool):
    """The rows the CPU decode kernel takes in one call, built once per step (every layer reads them): the
    decode rows, then each prefill token as a decode row when with_prefills; (block tables, context starts,
    context lengths, the threads' runs of rows), or None when there are none."""
    cached = meta.cpu_decode_rows
    if cached is None or cached[0] != with_prefills:
        groups = []
        if meta.num_decode_tokens:
            groups.append((meta.decode_block_tables, meta.decode_context_starts, meta.decode_context_lens))
        if with_prefills:
            groups.append(prefill_as_decode(meta))
        if not groups:
            return None
        tables, starts, lens = groups[0] if len(groups) == 1 else _stack_rows(*groups)
        cached = (with_prefills, (tables, starts, lens, cpu_attention.row_parts(starts, lens)))
        meta.cpu_decode_rows = cached
    return cached[1]


def _stack_rows(first, second):
    """Two sets of decode rows (block tables, starts, lengths) as one; the tables padded to one width."""
    (t1, s1, l1), (t2, s2, l2) = first, second
    tables = np.zeros((len(l1) + len(l2), max(t1.shape[1], t2.shape[1])), np.int32)
    tables[:len(l1), :t1.shape[1]] = t1
    tables[len(l1):, :t2.shape[1]] = t2
    return tables, np.concatenate((s1, s2)), np.concatenate((l1, l2))


def _cuda_paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out=None) -> torch.Tensor:
    """Decodes in one launch, then every prefill chunk in one more, each writing its rows of out; the index
    arrays come from the step's single copy (meta.device) when the runner made one."""
    cb, dev = _cuda(), q.device
    arrays = meta.device or {k: tensor(a, dev) for k, a in kernel_arrays(meta).items()}
    nd = meta.num_decode_tokens
    out = torch.empty_like(q) if out is None else out
    if nd:
        cb.paged_decode_attention(q[:nd], k_cache, v_cache, arrays["decode_block_tables"],
                                  arrays["decode_context_starts"], arrays["decode_context_lens"], scale,
                                  meta.max_decode_context, out=out[:nd])
    if meta.prefills:
        cb.prefill_attention(q[nd:], k_cache, v_cache, arrays["prefill_tiles"], arrays["prefill_block_tables"], scale,
                             meta.sliding_window or 0, out=out[nd:])
    return out


def fused_moe(x: torch.Tensor, w: MoEWeights, residual: torch.Tensor | None = None) -> torch.Tensor:
    """A sparse layer's MLP (ops/moe.py): route, group by expert, one GEMM pair per expert, combine."""
    return (fused_moe_cuda_kernels if uses_cuda_kernels(x) else _cpu_fused_moe)(x, w, residual)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (int64), the first index among equals; logits in any float dtype. On the CUDA
    kernels (the host build too) torch's argmax, as on a GPU; else the CPU's numba kernel."""
    return logits.argmax(-1) if uses_cuda_kernels(logits) else cpu_sampling.greedy_tokens(logits)


def fused_sample(logits: torch.Tensor, batch, max_top: int = 1):
    """max_top: the most top-N logprobs any row wants (known on the host: the CUDA path must not ask the
    device)."""
    return (_cuda() if uses_cuda_kernels(logits) else cpu_sampling).fused_sample(logits, batch, max_top)


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place, for grammar-constrained sampling: logits[rows[i], t] = -inf wherever bit t % 32 of
    bitmask[i, t // 32] is 0 (bit order: least significant first, as llguidance writes it).
    logits: [R, V] float32, bfloat16 or float16 (contiguous rows); rows: int32 [M] (distinct row
    indices into logits); bitmask: int32 [M, W] with W >= ceil(V / 32) (bits at or past V ignored).
    For CUDA tensors, rows and bitmask are on the same device; nothing waits for the device."""
    if logits.dim() != 2 or (logits.shape[1] > 1 and logits.stride(1) != 1) \
            or (logits.shape[0] > 1 and logits.stride(0) < logits.shape[1]):
        raise ValueError("apply_token_bitmask needs logits [rows, vocab] with contiguous rows")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"apply_token_bitmask takes float32, bfloat16 or float16 logits, not {logits.dtype}")
    if rows.dtype != torch.int32 or bitmask.dtype != torch.int32:
        raise TypeError("apply_token_bitmask takes int32 rows and bitmask")
    if rows.device != logits.device or bitmask.device != logits.device:
        raise ValueError("apply_token_bitmask: logits, rows and bitmask must be on one device")
    if rows.dim() != 1 or bitmask.dim() != 2 or bitmask.shape[0] != rows.shape[0] \
            or bitmask.shape[1] * 32 < logits.shape[1]:
        raise ValueError(f"apply_token_bitmask: rows {tuple(rows.shape)} and bitmask {tuple(bitmask.shape)} do not "
                         f"fit logits {tuple(logits.shape)} (bitmask [len(rows), >= ceil(vocab / 32)])")
    (_cuda() if uses_cuda_kernels(logits) else cpu_bitmask).apply_token_bitmask(logits, rows, bitmask)


__all__ = ["token_logprobs", "add_lora", "add_lora_bgmv", "add_lora_grouped", "add_rms_norm", "apply_token_bitmask", "attention_inputs", "AttentionMetadata", "build_attention_metadata",
           "cuda_kernels_on_cpu", "embedding", "fused_moe", "fused_sample", "greedy_tokens", "keep_numba_view",
           "kernel_arrays", "Linear", "MoEWeights", "paged_attention", "PrefillChunk", "QuantizedLinear",
           "QuantizedTensor", "rms_norm", "rotary", "silu_mul", "tensor", "uses_cuda_kernels", "write_kv"]
