"""Every operation against a float64 torch reference on fresh random inputs over many shapes.

Outputs are poisoned (NaN) before each run, so an element a kernel fails to write fails the test.
CPU kernels always run; the CUDA kernels run where CUDA is present and skip with the reason elsewhere.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scalellm import ops
from scalellm.ops.cpu import attention as cpu_attention
from scalellm.ops.cpu import kernels as cpu_kernels
from scalellm.ops.cpu.numba_util import as_numba
from scalellm.ops.cpu.attention import paged_decode_attention
from scalellm.ops import torch_ops as R

HAS_CUDA = torch.cuda.is_available()
try:
    import cupy  # noqa: F401
    HAS_CUPY = True
except ImportError:
    HAS_CUPY = False
cuda = pytest.mark.skipif(not (HAS_CUDA and HAS_CUPY), reason="needs a CUDA GPU and CuPy (pip install -e '.[cuda]')")
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]


def poisoned(shape, dtype) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel does not write fails the comparison."""
    return torch.full(shape, float("nan")).to(dtype)


def tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


# -- attention -----------------------------------------------------------------------------------
def paged_setup(lens, kv_heads, head_dim, dtype, bs=16, device="cpu", seed=0):
    """Random caches with each sequence's blocks scattered; returns caches and block tables."""
    g = torch.Generator().manual_seed(seed)
    need = sum(-(-n // bs) for n in lens)
    num_blocks = need + 7
    k_cache = torch.randn(num_blocks, bs, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, kv_heads, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    width = max(-(-n // bs) for n in lens)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(lens):
        nb = -(-n // bs)
        tables[i, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
    return k_cache.to(device), v_cache.to(device), tables


def reference_attention(q, k_cache, v_cache, tables, starts, lens, scale):
    """Per sequence, in float64: gather the context and softmax(q k^T) v with GQA."""
    bs = k_cache.shape[1]
    out = []
    for i in range(q.shape[0]):
        pos = torch.arange(int(starts[i]), int(lens[i]))
        slots = tables[i].long()[pos // bs] * bs + pos % bs
        k = k_cache.cpu().reshape(-1, *k_cache.shape[2:])[slots].double()
        v = v_cache.cpu().reshape(-1, *v_cache.shape[2:])[slots].double()
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        w = torch.einsum("hd,lhd->hl", q[i].cpu().double(), k) * scale
        out.append(torch.einsum("hl,lhd->hd", w.softmax(-1), v))
    return torch.stack(out)


DECODE_SHAPES = [(4, 4, 32), (8, 2, 64), (9, 3, 64), (6, 1, 16), (4, 2, 128), (32, 8, 128)]
LENS = [1, 15, 16, 17, 100, 333, 2049]


PRODUCTS = [False, pytest.param(True, marks=pytest.mark.skipif(
    not cpu_attention.HOST_BF16_DOT, reason="this CPU has no bfloat16 dot products (AVX512-BF16)"))]


@pytest.mark.parametrize("dtype, _", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", DECODE_SHAPES)
@pytest.mark.parametrize("dot", PRODUCTS)
def test_cpu_decode_attention(dtype, _, heads, kv_heads, head_dim, dot, monkeypatch):
    monkeypatch.setattr(cpu_attention, "USE_DOT", dot)
    lens = torch.tensor(LENS, dtype=torch.int32)
    starts = torch.tensor([0, 0, 0, 3, 0, 300, 1000], dtype=torch.int32)  # some under a sliding window
    q = torch.randn(len(LENS), heads, head_dim).to(dtype)
    # blocks of 16 and of 64 positions (several of the bfloat16 kernel's 16-position tiles)
    for bs in (16, 64):
        k_cache, v_cache, tables = paged_setup(LENS, kv_heads, head_dim, dtype, bs=bs, seed=heads)
        ref = reference_attention(q, k_cache, v_cache, tables, starts, lens, head_dim ** -0.5)
        for seqs in (len(LENS), 3):  # the parallel build and the serial one
            out = paged_decode_attention(q[:seqs], k_cache, v_cache, tables[:seqs], starts[:seqs], lens[:seqs],
                                         head_dim ** -0.5, out=poisoned(q[:seqs].shape, dtype))
            assert out.dtype == dtype and out.shape == q[:seqs].shape
            torch.testing.assert_close(out.double(), ref[:seqs], **tol(dtype))
        # the parallel build over other splits of the rows: more runs than threads, some of them empty
        for runs in (1, 5, 9):
            out = poisoned(q.shape, dtype)
            cpu_attention.decode_attention(as_numba(q), as_numba(k_cache), as_numba(v_cache), tables.numpy(),
                                           starts.numpy(), lens.numpy(), head_dim ** -0.5, as_numba(out),
                                           cpu_attention.balanced_parts(starts.numpy(), lens.numpy(), runs))
            torch.testing.assert_close(out.double(), ref, **tol(dtype))


@pytest.mark.parametrize("dot", PRODUCTS[1:])
def test_bf16_attention_error_against_float32(dot, monkeypatch):
    """The bfloat16 kernel's stated tolerance, on the served model's shape (9 heads over 3 KV heads of 64)
    at its batch and context: within 2e-2 of float64 everywhere, and on bfloat16 dot products (the values'
    weights rounded to bfloat16) a mean error at most 1.5x the float32 products' (both include the output's
    own rounding to bfloat16, about 2e-3 at these magnitudes)."""
    lens = [192] * 48 + [1, 7, 33, 129, 255, 256, 257, 300] * 2
    starts = torch.zeros(len(lens), dtype=torch.int32)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    k_cache, v_cache, tables = paged_setup(lens, 3, 64, torch.bfloat16, bs=128, seed=11)
    q = (torch.randn(len(lens), 9, 64, generator=torch.Generator().manual_seed(5)) * 2).to(torch.bfloat16)
    ref = reference_attention(q, k_cache, v_cache, tables, starts, lens_t, 64 ** -0.5)
    errors = {}
    for use_dot in (False, dot):
        monkeypatch.setattr(cpu_attention, "USE_DOT", use_dot)
        assert cpu_attention.uses_dot(64) == use_dot
        out = paged_decode_attention(q, k_cache, v_cache, tables, starts, lens_t, 64 ** -0.5,
                                     out=poisoned(q.shape, torch.bfloat16))
        torch.testing.assert_close(out.double(), ref, **tol(torch.bfloat16))
        errors[use_dot] = (out.double() - ref).abs().mean().item()
    assert errors[True] <= 1.5 * errors[False], errors


def test_cpu_decode_attention_scores_far_below_zero():
    """Every score near -100: the softmax's maximum must come from real positions only (the bfloat16
    kernel's tiles pad past a row's end with zeros, which would win a maximum and underflow every weight)."""
    lens = [15, 17, 40]
    k_cache, v_cache, tables = paged_setup(lens, 2, 32, torch.bfloat16, bs=16, seed=3)
    k_cache = k_cache.float().abs().add(0.5).to(torch.bfloat16)  # every key positive ...
    q = torch.full((len(lens), 4, 32), -16.0, dtype=torch.bfloat16)  # ... and every query negative
    q[:, :, :8] = -18.0  # scores differ by head
    starts, lens_t = torch.zeros(len(lens), dtype=torch.int32), torch.tensor(lens, dtype=torch.int32)
    ref = reference_attention(q, k_cache, v_cache, tables, starts, lens_t, 32 ** -0.5)
    scores = torch.einsum("hd,ld->hl", q[0, :2].double(), k_cache[tables[0, 0], :15, 0].double()) * 32 ** -0.5
    assert scores.max() < -90 and scores.max() - scores.min() > 5  # far below zero, and not all alike
    out = paged_decode_attention(q, k_cache, v_cache, tables, starts, lens_t, 32 ** -0.5,
                                 out=poisoned(q.shape, torch.bfloat16))
    torch.testing.assert_close(out.double(), ref, **tol(torch.bfloat16))


@pytest.mark.parametrize("runs", [1, 2, 3, 8])
def test_balanced_parts(runs):
    """The threads' runs of rows cover every row once, in order, each with about its share of the work."""
    rng = np.random.default_rng(runs)
    for rows in (1, 4, 7, 64, 130):
        lens = rng.integers(1, 3000, rows).astype(np.int32)
        starts = np.where(rng.random(rows) < 0.3, lens // 2, 0).astype(np.int32)
        bounds = cpu_attention.balanced_parts(starts, lens, runs)
        assert len(bounds) == runs + 1 and bounds[0] == 0 and bounds[-1] == rows
        assert (np.diff(bounds) >= 0).all()
        cost = lens - starts + cpu_attention.ROW_COST
        work = [cost[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]
        assert max(work) <= cost.sum() / runs + cost.max()


@pytest.mark.parametrize("dtype, _", DTYPES)
@pytest.mark.parametrize("query_len, context_len, window", [(5, 25, 0), (25, 25, 0), (1, 40, 0), (17, 64, 8)])
def test_prefill_chunk_attention(dtype, _, query_len, context_len, window):
    """A chunk attends causally to everything cached before it (numba kernel and SDPA path)."""
    torch.manual_seed(context_len)
    bs, kvh, h, d = 4, 2, 4, 32
    k_cache = torch.full((32, bs, kvh, d), float("nan")).to(dtype)  # unwritten slots must never be read
    v_cache = torch.full((32, bs, kvh, d), float("nan")).to(dtype)
    table = torch.randperm(32)[:-(-context_len // bs)].tolist()
    k_all = torch.randn(context_len, kvh, d).to(dtype)
    v_all = torch.randn(context_len, kvh, d).to(dtype)
    q_all = torch.randn(context_len, h, d).to(dtype)
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(context_len)])
    ops.write_kv(k_all, v_all, k_cache, v_cache, slots)
    first = context_len - query_len
    meta = ops.build_attention_metadata(bs, slots[first:].tolist(), [], [], [(0, query_len, context_len, table)],
                                        window or None)
    qd, kd, vd = (t.transpose(0, 1)[None].double() for t in (q_all, k_all, v_all))
    mask = torch.ones(context_len, context_len, dtype=torch.bool).tril()
    if window:
        mask &= ~torch.ones(context_len, context_len, dtype=torch.bool).tril(-window)
    ref = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)[first:]
    via_ops = ops.paged_attention(q_all[first:], k_cache, v_cache, meta, d ** -0.5)
    torch.testing.assert_close(via_ops.double(), ref, **tol(dtype))
    out = torch.full((query_len, h, d), float("nan")).to(dtype)
    cpu_kernels.prefill_attention(out, q_all[first:], k_cache, v_cache, meta.prefills[0].key_slots, 0, query_len,
                                  context_len, window, d ** -0.5)
    torch.testing.assert_close(out.double(), ref, **tol(dtype))


@pytest.mark.parametrize("dtype, _", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 2, 32), (4, 4, 24)])
@pytest.mark.parametrize("window", [0, 20])
@pytest.mark.parametrize("ir_prefill", [True, False])
def test_paged_attention_mixed_step(dtype, _, heads, kv_heads, head_dim, window, ir_prefill, monkeypatch):
    """One step of decodes and prefill chunks (a whole prompt, a chunk continuing a cached context, a
    one-token chunk) through ops.paged_attention, with bfloat16 prefill on the decode kernel and on SDPA
    (head_dim 24 never takes the IR kernel), against a float64 reference per token."""
    from scalellm.ops.cpu import attention as cpu_attention

    monkeypatch.setattr(cpu_attention, "IR_PREFILL", ir_prefill)
    decode_lens, chunks = [7, 40, 130], [(50, 50), (33, 90), (1, 17)]  # decodes; (query_len, context_len)
    lens = decode_lens + [c for _, c in chunks]
    k_cache, v_cache, tables = paged_setup(lens, kv_heads, head_dim, dtype, seed=heads + window)
    bs = k_cache.shape[1]
    nd = len(decode_lens)
    row_tables, row_starts, row_lens, specs, slots = [], [], [], [], []
    for i, n in enumerate(decode_lens):
        row_tables.append(tables[i])
        row_lens.append(n)
        slots.append(int(tables[i][(n - 1) // bs]) * bs + (n - 1) % bs)
    offset = nd
    for j, (q_len, ctx) in enumerate(chunks):
        table = tables[nd + j]
        specs.append((offset, q_len, ctx, table[:-(-ctx // bs)].tolist()))
        offset += q_len
        for p in range(ctx - q_len, ctx):
            row_tables.append(table)
            row_lens.append(p + 1)
            slots.append(int(table[p // bs]) * bs + p % bs)
    row_lens = torch.tensor(row_lens, dtype=torch.int32)
    row_starts = (row_lens - window).clamp(min=0) if window else torch.zeros_like(row_lens)
    meta = ops.build_attention_metadata(bs, slots, tables[:nd], row_lens[:nd].tolist(), specs, window or None)
    q = torch.randn(offset, heads, head_dim).to(dtype)
    ref = reference_attention(q, k_cache, v_cache, torch.stack(row_tables), row_starts, row_lens, head_dim ** -0.5)
    out = ops.paged_attention(q, k_cache, v_cache, meta, head_dim ** -0.5)
    torch.testing.assert_close(out.double(), ref, **tol(dtype))


# -- elementwise ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, _", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 64), (7, 576), (33, 1000), (3, 4096)])
def test_rms_norm_and_residual(dtype, _, rows, hidden):
    x, r, w = (torch.randn(rows, hidden).to(dtype), torch.randn(rows, hidden).to(dtype),
               torch.randn(hidden).to(dtype))
    normed = cpu_kernels.rms_norm(x, w, 1e-6, out=poisoned(x.shape, dtype))
    torch.testing.assert_close(normed, R.rms_norm(x, w, 1e-6), **tol(dtype))
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), normed, **tol(dtype))
    out, res = cpu_kernels.add_rms_norm(x, r, w, 1e-6, out=poisoned(x.shape, dtype))
    ref_out, ref_res = R.add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(res, ref_res, **tol(dtype))
    torch.testing.assert_close(out, ref_out, **tol(dtype))
    s = (x.double() + r.double())
    f64 = w.double() * s / (s.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(out.double(), f64, **tol(dtype))


@pytest.mark.parametrize("dtype, _", DTYPES)
@pytest.mark.parametrize("tokens, heads, kv_heads, dim", [(1, 4, 4, 8), (9, 9, 3, 64), (30, 8, 2, 128)])
def test_rotary_in_place(dtype, _, tokens, heads, kv_heads, dim):
    positions = torch.randint(0, 500, (tokens,))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.arange(512).float()[:, None] * inv_freq[None]
    cos, sin = torch.cat([freqs.cos()] * 2, -1).to(dtype), torch.cat([freqs.sin()] * 2, -1).to(dtype)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)  # q and k as strided views, as in the model
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    q, k = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
    q0 = q.double().clone()
    ref_q, ref_k = R.rotary(q, cos[positions], sin[positions]), R.rotary(k, cos[positions], sin[positions])
    q2, k2 = q.clone(), k.clone()
    cpu_kernels.rotary_inplace(q2, k2, positions, cos, sin)
    ops.rotary(q, k, positions, cos, sin)
    torch.testing.assert_close(q, ref_q, **tol(dtype))
    torch.testing.assert_close(k, ref_k, **tol(dtype))
    torch.testing.assert_close(q2, ref_q, **tol(dtype))
    torch.testing.assert_close(k2, ref_k, **tol(dtype))
    c, s = freqs[positions].double().cos()[:, None], freqs[positions].double().sin()[:, None]
    x1, x2 = q0[..., :dim // 2], q0[..., dim // 2:]
    torch.testing.assert_close(q.double(), torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1), **tol(dtype))


@pytest.mark.parametrize("dtype, _", DTYPES)
@pytest.mark.parametrize("tokens, n", [(1, 8), (13, 1536), (64, 688)])
def test_silu_mul(dtype, _, tokens, n):
    x = torch.randn(tokens, 2 * n).to(dtype)
    out = cpu_kernels.silu_mul(x, out=poisoned((tokens, n), dtype))
    torch.testing.assert_close(ops.silu_mul(x), out, **tol(dtype))
    torch.testing.assert_close(out, R.silu_mul(x), **tol(dtype))
    f64 = F.silu(x[:, :n].double()) * x[:, n:].double()
    torch.testing.assert_close(out.double(), f64, **tol(dtype))


@pytest.mark.parametrize("dtype, _", DTYPES)
def test_write_kv_touches_only_its_slots(dtype, _):
    bs, kvh, d = 16, 3, 64
    k_cache = torch.full((10, bs, kvh, d), float("nan")).to(dtype)
    v_cache = torch.full((10, bs, kvh, d), float("nan")).to(dtype)
    k, v = torch.randn(21, kvh, d).to(dtype), torch.randn(21, kvh, d).to(dtype)
    slots = torch.randperm(10 * bs)[:21]
    k2, v2 = k_cache.clone(), v_cache.clone()
    cpu_kernels.write_kv(k, v, k2, v2, slots)
    ops.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k2.isnan(), k_cache.isnan()) and torch.equal(k2.nan_to_num(), k_cache.nan_to_num())
    flat_k, flat_v = k_cache.view(-1, kvh, d), v_cache.view(-1, kvh, d)
    assert torch.equal(flat_k[slots], k) and torch.equal(flat_v[slots], v)
    others = torch.ones(10 * bs, dtype=torch.bool)
    others[slots] = False
    assert flat_k[others].isnan().all() and flat_v[others].isnan().all()


# -- CUDA (run where a GPU is present) -------------------------------------------------------------
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(8, 2, 64), (32, 8, 128), (12, 12, 64)])
def test_cuda_decode_attention(dtype, heads, kv_heads, head_dim):
    from scalellm.ops.cuda import backend as cuda_backend

    lens = torch.tensor(LENS + [4000], dtype=torch.int32)
    starts = torch.zeros_like(lens)
    k_cache, v_cache, tables = paged_setup(lens.tolist(), kv_heads, head_dim, dtype, device="cuda")
    q = torch.randn(len(lens), heads, head_dim, device="cuda").to(dtype)
    out = cuda_backend.paged_decode_attention(q, k_cache, v_cache, tables.cuda(), starts.cuda(), lens.cuda(),
                                              head_dim ** -0.5)
    ref = reference_attention(q, k_cache, v_cache, tables, starts, lens, head_dim ** -0.5)
    t = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.cpu().double(), ref, atol=t, rtol=t)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_elementwise_ops(dtype):
    from scalellm.ops.cuda import backend as cuda_backend

    x, r, w = (torch.randn(33, 1000, device="cuda").to(dtype), torch.randn(33, 1000, device="cuda").to(dtype),
               torch.randn(1000, device="cuda").to(dtype))
    t = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(cuda_backend.rms_norm(x, w, 1e-6).cpu(), R.rms_norm(x.cpu(), w.cpu(), 1e-6), **t)
    out, res = cuda_backend.add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_res = R.add_rms_norm(x.cpu(), r.cpu(), w.cpu(), 1e-6)
    torch.testing.assert_close(res.cpu(), ref_res, **t)
    torch.testing.assert_close(out.cpu(), ref_out, **t)
    g = torch.randn(17, 2 * 688, device="cuda").to(dtype)
    torch.testing.assert_close(cuda_backend.silu_mul(g).cpu(), R.silu_mul(g.cpu()), **t)
