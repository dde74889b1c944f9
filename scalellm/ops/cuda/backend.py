"""CUDA backend: the kernels in cuda_kernels/*.cu, compiled at run time by CuPy (NVRTC) and launched
on torch's current stream. Imported only when a CUDA tensor reaches an op (or the kernels run on the
CPU through their host build, for tests), so machines without CUDA never import CuPy.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys

import numpy as np
import torch

def _kernel_dir() -> str:
    """cuda_kernels/ beside the package (a checkout, an editable install), else where a wheel put it."""
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    beside = os.path.join(root, "cuda_kernels")
    installed = os.path.join(sys.prefix, "share", "scalellm", "cuda_kernels")
    return beside if os.path.isdir(beside) or not os.path.isdir(installed) else installed


KERNEL_DIR = _kernel_dir()
CTYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
HEAD_DIMS = (64, 128)
_TYPES = tuple(CTYPES.values())
NAMES = {
    "rms_norm": [f"scalellm::{k}<{t}>" for k in ("rms_norm", "add_rms_norm") for t in _TYPES],
    "rotary": [f"scalellm::rotary<{t}>" for t in _TYPES],
    "activation": [f"scalellm::silu_mul<{t}>" for t in _TYPES],
    "kv_write": [f"scalellm::kv_write<{t}>" for t in _TYPES],
    "qkv_prep": [f"scalellm::qkv_prep<{t}, {d}>" for t in _TYPES for d in HEAD_DIMS],
    "paged_attention": [f"scalellm::paged_attention_decode<{t}, {d}, {g}>" for t in _TYPES for d in HEAD_DIMS
                        for g in range(1, 9)]  # the GQA group sizes 1..MAX_GROUP
    + [f"scalellm::paged_attention_reduce<{t}, {d}>" for t in _TYPES for d in HEAD_DIMS],
    "prefill_attention": [f"scalellm::prefill_attention<{t}, {d}, {g}>" for t in _TYPES for d in HEAD_DIMS
                          for g in range(1, 9)],  # the GQA group sizes 1..MAX_GROUP
    "sampling": ["scalellm::fused_sample"],
    "token_bitmask": [f"scalellm::apply_token_bitmask<{t}>" for t in _TYPES],
    "moe_routing": [f"scalellm::{k}<{t}>" for k in ("moe_route", "moe_gather", "moe_combine") for t in _TYPES]
    + ["scalellm::moe_offsets", "scalellm::moe_permute"],
    "quant_gemm": [f"scalellm::{k}<{f}, {t}>" for k in ("quant_gemm", "quant_dequant_rows") for f in range(3)
                   for t in _TYPES],
}
QUANT_CODES = {"q8_0": 0, "q4_0": 1, "q4_1": 2}  # the kernels' format template argument
QUANT_ROWS = 4  # matches kRows in quant_gemm.cu
# Decode attention's split (flash-decoding): tokens per block, kSplit in paged_attention.cu. 256 so that a small
# batch still fills a GPU: one sequence with 8 KV heads at a 4k context is 8 x 16 = 128 blocks, about one per
# SM of an H100/H200 (512 would leave half of them idle); a large batch has blocks to spare either way, and
# the price, per split and query head, is HEAD_DIM + 2 floats of workspace written and read back by the
# reduce, against the split's 256 rows of K and V.
PARTITION = 256
MAX_TOP_K = 8  # matches kMaxTopK in moe_routing.cu
MAX_GROUP = 8


_source_overrides: dict[str, str] = {}


def kernel_source(name: str) -> str:
    if name in _source_overrides:
        return _source_overrides[name]
    with open(os.path.join(KERNEL_DIR, f"{name}.cu")) as f:
        return f.read()


@contextlib.contextmanager
def patched_source(name: str, source: str):
    """Build `name`'s kernels from `source` inside the block (tests plant bugs with it)."""
    _source_overrides[name] = source
    clear_caches()
    try:
        yield
    finally:
        del _source_overrides[name]
        clear_caches()


def compile_options() -> tuple[str, ...]:
    """C++17, the kernels' folder, and CUDA's headers where they can be found (NVRTC needs cuda_fp16.h and
    cuda_bf16.h on its include path; CuPy adds a toolkit's but not the pip wheels')."""
    from scalellm.ops.cuda.host import HostBuildUnavailable, cuda_include_dir

    try:
        return ("-std=c++17", f"-I{KERNEL_DIR}", f"-I{cuda_include_dir()}")
    except HostBuildUnavailable:
        return ("-std=c++17", f"-I{KERNEL_DIR}")


@functools.cache
def _module(name: str, on_host: bool):
    """The compiled kernels of cuda_kernels/{name}.cu: by CuPy (NVRTC) for the GPU, or by g++ through the
    host build (scalellm/ops/cuda/host) for CPU tensors."""
    options = compile_options()
    if on_host:
        from scalellm.ops.cuda.host import HostModule

        return HostModule(code=kernel_source(name), options=options, name_expressions=NAMES[name])
    import cupy as cp

    return cp.RawModule(code=kernel_source(name), options=options, name_expressions=NAMES[name])


def _on_host(t: torch.Tensor) -> bool:
    """Whether a launch over tensors like t runs through the host build (CPU tensors) rather than CuPy."""
    return not t.is_cuda


def _stream_handle() -> int:
    """torch's current CUDA stream, as the integer handle CuPy wraps."""
    return torch.cuda.current_stream().cuda_stream


@functools.cache
def _kernel(module: str, name: str, on_host: bool):
    """Kernel `name` of `module`, looked up once (a CuPy Function, or the host build's HostKernel)."""
    return _module(module, on_host).get_function(name)


_streams: dict = {}  # torch stream handle -> the cupy ExternalStream over it, built once per handle


def _stream(handle: int):
    stream = _streams.get(handle)
    if stream is None:
        import cupy as cp

        stream = _streams[handle] = cp.cuda.ExternalStream(handle)
    return stream


def clear_caches() -> None:
    """Forget the compiled modules, kernel handles and stream objects (a patched source, a test's fake CuPy)."""
    _module.cache_clear()
    _kernel.cache_clear()
    _streams.clear()


def _launch(module: str, name: str, grid, block, args, shared_mem: int = 0) -> None:
    """Run kernel `name` of `module` over `args`: on the GPU on torch's current stream, or through the host
    build when the tensors are on the CPU. On the GPU a launch builds no CuPy objects: the kernel handle and
    the stream object are cached, and each tensor goes in as its raw device pointer (8 bytes, where the
    kernel takes a T*)."""
    on_host = _on_host(next(a for a in args if isinstance(a, torch.Tensor)))
    kernel = _kernel(module, name, on_host)
    if on_host:
        kernel(grid, (block,), args, shared_mem=shared_mem)
        return
    converted = tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)
    kernel(grid, (block,), converted, shared_mem=shared_mem, stream=_stream(_stream_handle()))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    _launch("rms_norm", f"scalellm::rms_norm<{CTYPES[x.dtype]}>", (rows,), 256,
            (out, x, weight, np.int32(hidden), np.float32(eps)))
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    residual = residual.contiguous().clone()
    out = torch.empty_like(residual)
    hidden = x.shape[-1]
    _launch("rms_norm", f"scalellm::add_rms_norm<{CTYPES[x.dtype]}>", (residual.numel() // hidden,), 256,
            (out, residual, x.contiguous(), weight, np.int32(hidden), np.float32(eps)))
    return out, residual


def rotary_inplace(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> None:
    """q: [tokens, heads, D], k: [tokens, kv_heads, D], rotated in place; each token's heads contiguous
    (views into the fused qkv projection are fine)."""
    tokens, heads, dim = q.shape
    for t in (q, k):
        if t.stride(2) != 1 or t.stride(1) != dim:
            raise ValueError("rotary needs each token's heads contiguous")
    _launch("rotary", f"scalellm::rotary<{CTYPES[q.dtype]}>", (tokens,), 128,
            (q, k, positions.to(torch.int64), cos, sin, np.int32(heads), np.int32(k.shape[1]), np.int32(dim),
             np.int64(q.stride(0)), np.int64(k.stride(0))))


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    n = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    tokens = x.numel() // (2 * n)
    blocks = min(65535, (tokens * n + 255) // 256)
    _launch("activation", f"scalellm::silu_mul<{CTYPES[x.dtype]}>", (max(blocks, 1),), 256,
            (out, x, np.int64(tokens), np.int32(n)))
    return out


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    row = k.shape[1] * k.shape[2]
    _launch("kv_write", f"scalellm::kv_write<{CTYPES[k.dtype]}>", (k.shape[0],), 128,
            (k.contiguous(), v.contiguous(), k_cache, v_cache, slot_mapping.to(torch.int64), np.int32(row)))


QKV_WARPS = 4  # warps per block of qkv_prep: one head each


def takes_qkv_prep(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether qkv_prep can make these attention inputs (else: the norm, rotary and kv_write kernels)."""
    return (k_cache.shape[-1] in HEAD_DIMS and qkv.dim() == 2 and qkv.stride(1) == 1 and k_cache.is_contiguous()
            and v_cache.is_contiguous())


def qkv_prep(qkv, positions, cos, sin, q_norm, k_norm, eps: float, num_heads: int, num_kv_heads: int, k_cache,
             v_cache, slot_mapping) -> torch.Tensor:
    """The attention inputs in one launch: per-head q/k RMSNorm when q_norm is given, rotary, k and v to the
    cache at slot_mapping (int64, -1: not written); returns q [tokens, heads, head_dim] (qkv is not changed).
    qkv: [tokens, (heads + 2 kv_heads) * head_dim] with contiguous rows; caches contiguous."""
    tokens, dim = qkv.shape[0], k_cache.shape[-1]
    if not takes_qkv_prep(qkv, k_cache, v_cache):
        raise ValueError(f"qkv_prep supports head_dim {HEAD_DIMS}, qkv rows with unit stride, contiguous caches")
    q = torch.empty(tokens, num_heads, dim, dtype=qkv.dtype, device=qkv.device)
    if tokens == 0:
        return q
    use_norm = q_norm is not None
    units = num_heads + 2 * num_kv_heads
    _launch("qkv_prep", f"scalellm::qkv_prep<{CTYPES[qkv.dtype]}, {dim}>",
            (tokens, (units + QKV_WARPS - 1) // QKV_WARPS), 32 * QKV_WARPS,
            (q, k_cache, v_cache, qkv, positions.to(torch.int64), cos, sin, q_norm if use_norm else cos,
             k_norm if use_norm else cos, slot_mapping.to(torch.int64), np.int32(num_heads), np.int32(num_kv_heads),
             np.int64(qkv.stride(0)), np.int32(use_norm), np.float32(eps)))
    return q


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_starts, context_lens, scale: float,
                           max_context: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """out: where to write (contiguous, q's shape and dtype); a new tensor when None."""
    seqs, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    if dim not in HEAD_DIMS or not 1 <= group <= MAX_GROUP or heads != group * kv_heads:
        raise ValueError(f"cuda decode attention supports head_dim {HEAD_DIMS} and GQA groups up to {MAX_GROUP}")
    # the grid comes from max_context alone (a CUDA graph passes the longest allowed context, so one graph
    # serves every length); splits past a sequence's context exit at once
    max_context = max_context or int((context_lens - context_starts).max())
    parts = max(1, -(-max_context // PARTITION))
    out = torch.empty_like(q) if out is None else out
    f32 = dict(dtype=torch.float32, device=q.device)
    part_out = torch.empty(seqs, heads, parts, dim, **f32) if parts > 1 else out
    part_max = torch.empty(seqs, heads, parts, **f32) if parts > 1 else out
    part_sum = torch.empty(seqs, heads, parts, **f32) if parts > 1 else out
    ctype = CTYPES[q.dtype]
    _launch("paged_attention", f"scalellm::paged_attention_decode<{ctype}, {dim}, {group}>",
            (seqs, kv_heads, parts), 128,
            (out, part_out, part_max, part_sum, q.contiguous(), k_cache, v_cache, block_tables.to(torch.int32),
             context_starts.to(torch.int32), context_lens.to(torch.int32), np.int32(block_tables.shape[1]),
             np.int32(k_cache.shape[1]), np.int32(kv_heads), np.float32(scale)))
    if parts > 1:
        _launch("paged_attention", f"scalellm::paged_attention_reduce<{ctype}, {dim}>", (seqs, heads), dim,
                (out, part_out, part_max, part_sum, np.int32(parts)))
    return out


def prefill_attention(q, k_cache, v_cache, tiles, block_tables, scale: float, window: int = 0,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """q: the step's prefill tokens [tokens, heads, dim], chunk after chunk; tiles: int32 [tiles, 4] (chunk,
    first token, tokens, position of the first token), kernel_arrays' "prefill_tiles"; block_tables: int32
    [chunks, max_blocks]. One block per (tile, KV head), 32 threads per query head of the group. out: where
    to write (contiguous, q's shape and dtype); a new tensor when None."""
    tokens, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    if dim not in HEAD_DIMS or not 1 <= group <= MAX_GROUP or heads != group * kv_heads:
        raise ValueError(f"cuda prefill attention supports head_dim {HEAD_DIMS} and GQA groups up to {MAX_GROUP}")
    out = torch.empty_like(q) if out is None else out
    if tiles.shape[0] == 0:
        return out
    _launch("prefill_attention", f"scalellm::prefill_attention<{CTYPES[q.dtype]}, {dim}, {group}>",
            (tiles.shape[0], kv_heads), 32 * group,
            (out, q.contiguous(), k_cache, v_cache, tiles.to(torch.int32).contiguous(), block_tables.to(torch.int32),
             np.int32(block_tables.shape[1]), np.int32(k_cache.shape[1]), np.int32(kv_heads), np.int32(window),
             np.float32(scale)))
    return out


def fused_sample(logits: torch.Tensor, batch, max_top: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits: [rows, vocab] float32; batch: a SamplingBatch (scalellm/ops/sampling_batch.py) on the GPU;
    max_top: the most top-N logprobs a row wants."""
    rows, vocab = logits.shape
    max_top = max(1, max_top)
    dev = logits.device
    tokens = torch.empty(rows, dtype=torch.int64, device=dev)
    chosen = torch.empty(rows, dtype=torch.float32, device=dev)
    top_ids = torch.empty(rows, max_top, dtype=torch.int64, device=dev)
    top_lp = torch.empty(rows, max_top, dtype=torch.float32, device=dev)
    work = torch.empty_like(logits)
    _launch("sampling", "scalellm::fused_sample", (rows,), 1024,
            (tokens, chosen, top_ids, top_lp, work, logits.contiguous(), batch.temperature, batch.top_k, batch.top_p,
             batch.min_p, batch.presence, batch.frequency, batch.repetition, batch.pen_offsets, batch.pen_tokens,
             batch.pen_counts, batch.ban_offsets, batch.ban_tokens, batch.seeds, batch.indices, batch.positions, batch.num_top, np.int32(vocab),
             np.int32(max_top)))
    return tokens, chosen, top_ids, top_lp


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: logits[rows[i], t] = -inf wherever bit t % 32 of bitmask[i, t // 32] is 0. logits: [R, V]
    with contiguous rows; rows: int32 [M]; bitmask: int32 [M, W >= ceil(V / 32)]; nothing waits for the device."""
    count, vocab = rows.shape[0], logits.shape[1]
    if count == 0 or vocab == 0:
        return
    _launch("token_bitmask", f"scalellm::apply_token_bitmask<{CTYPES[logits.dtype]}>", (count,), 1024,
            (logits, rows.contiguous(), bitmask.contiguous(), np.int32(vocab), np.int32(bitmask.shape[1]),
             np.int64(logits.stride(0))))


def moe_route(logits: torch.Tensor, top_k: int, renormalize: bool):
    """Router logits [tokens, experts] -> (weights [tokens, k] float32, expert ids [tokens, k] int32,
    pairs per expert [experts] int32)."""
    tokens, experts = logits.shape
    if top_k > MAX_TOP_K:
        raise ValueError(f"cuda MoE routing supports up to {MAX_TOP_K} experts per token")
    dev = logits.device
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=dev)
    counts = torch.zeros(experts, dtype=torch.int32, device=dev)
    _launch("moe_routing", f"scalellm::moe_route<{CTYPES[logits.dtype]}>", ((tokens + 127) // 128,), 128,
            (weights, ids, counts, logits.contiguous(), np.int32(tokens), np.int32(experts), np.int32(top_k),
             np.int32(renormalize)))
    return weights, ids, counts


def moe_permute(ids: torch.Tensor, counts: torch.Tensor):
    """-> (offsets [experts + 1]: each expert's first row, slot of each pair [pairs], token of each slot)."""
    experts, pairs = counts.shape[0], ids.numel()
    dev = ids.device
    offsets = torch.empty(experts + 1, dtype=torch.int32, device=dev)
    cursor = torch.empty(experts, dtype=torch.int32, device=dev)
    _launch("moe_routing", "scalellm::moe_offsets", (1,), 1, (offsets, cursor, counts, np.int32(experts)))
    slot_of_pair = torch.empty(pairs, dtype=torch.int32, device=dev)
    token_of_slot = torch.empty(pairs, dtype=torch.int32, device=dev)
    _launch("moe_routing", "scalellm::moe_permute", ((pairs + 127) // 128,), 128,
            (slot_of_pair, token_of_slot, cursor, ids, np.int32(pairs), np.int32(ids.shape[1])))
    return offsets, slot_of_pair, token_of_slot


def moe_gather(x: torch.Tensor, token_of_slot: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    rows = torch.empty(token_of_slot.numel(), x.shape[1], dtype=x.dtype, device=x.device)
    _launch("moe_routing", f"scalellm::moe_gather<{CTYPES[x.dtype]}>", (rows.shape[0],), 128,
            (rows, x, token_of_slot, np.int32(x.shape[1])))
    return rows


def moe_combine(rows: torch.Tensor, slot_of_pair: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                weights_in_dtype: bool = True) -> torch.Tensor:
    """weights_in_dtype: round each routing weight to the rows' dtype first (Qwen; Mixtral keeps float32)."""
    tokens, top_k = ids.shape
    out = torch.empty(tokens, rows.shape[1], dtype=rows.dtype, device=rows.device)
    _launch("moe_routing", f"scalellm::moe_combine<{CTYPES[rows.dtype]}>", (tokens,), 128,
            (out, rows.contiguous(), slot_of_pair, ids, weights, np.int32(top_k), np.int32(rows.shape[1]),
             np.int32(weights_in_dtype)))
    return out


def quant_gemm(fmt: str, x: torch.Tensor, qs, d, m, bias, residual, out: torch.Tensor, col0: int = 0) -> None:
    """out[:, col0:col0 + N] = x @ W^T (+ bias) (+ residual) over a block-quantized W (qs/d/m: its fields,
    m None except for Q4_1); residual is read at the same places of a tensor shaped like out."""
    rows, k = x.shape
    n_out = qs.shape[0]
    warps = 4
    grid = ((n_out + warps - 1) // warps, (rows + QUANT_ROWS - 1) // QUANT_ROWS)
    _launch("quant_gemm", f"scalellm::quant_gemm<{QUANT_CODES[fmt]}, {CTYPES[x.dtype]}>", grid, 32 * warps,
            (out, x.contiguous(), qs, d, d if m is None else m, x if bias is None else bias,
             out if residual is None else residual, np.int32(bias is not None), np.int32(residual is not None),
             np.int32(rows), np.int32(n_out), np.int32(k), np.int64(out.stride(0)), np.int32(col0)))


def dequant_rows(fmt: str, qs, d, m, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ids of a block-quantized weight, dequantized to dtype."""
    k = d.shape[1] * 32
    out = torch.empty(ids.shape[0], k, dtype=dtype, device=qs.device)
    blocks = max(1, min(65535, (out.numel() + 255) // 256))
    _launch("quant_gemm", f"scalellm::quant_dequant_rows<{QUANT_CODES[fmt]}, {CTYPES[dtype]}>", (blocks,), 256,
            (out, qs, d, d if m is None else m, ids.to(torch.int64), np.int32(ids.shape[0]), np.int32(k)))
    return out
