"""The CPU engine's fused operations against compositions of the reference ops, and packed GEMMs
against torch's plain linear. Outputs and cache slots start poisoned (NaN), so anything a kernel
fails to write fails the comparison."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scalellm import ops
from scalellm.ops.cpu import kernels as cpu_kernels
from scalellm.ops import torch_ops as R
from scalellm.ops.linear import Linear
from scalellm.ops.cpu.numba_util import as_numba

DTYPES = [(torch.float32, dict(atol=1e-5, rtol=1e-5)), (torch.bfloat16, dict(atol=2e-2, rtol=2e-2))]


def rotary_tables(dim, dtype, positions=512):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.arange(positions).float()[:, None] * inv_freq[None]
    return torch.cat([freqs.cos()] * 2, -1).to(dtype), torch.cat([freqs.sin()] * 2, -1).to(dtype)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("tokens, heads, kv_heads, dim, qk_norm", [
    (1, 4, 2, 32, False), (5, 9, 3, 64, False), (70, 8, 4, 32, True), (3, 16, 2, 128, True)])
def test_attention_inputs_match_norm_rotary_and_cache_write(dtype, tol, tokens, heads, kv_heads, dim, qk_norm):
    torch.manual_seed(tokens * 31 + dim)
    bs, blocks = 16, 12
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)
    positions = torch.randint(0, 500, (tokens,))
    cos, sin = rotary_tables(dim, dtype)
    q_norm = (1 + 0.3 * torch.randn(dim)).to(dtype) if qk_norm else None
    k_norm = (1 + 0.3 * torch.randn(dim)).to(dtype) if qk_norm else None
    slots = torch.randperm(blocks * bs)[:tokens]
    slots[0] = -1  # padding: written nowhere
    k_cache = torch.full((blocks, bs, kv_heads, dim), float("nan")).to(dtype)
    v_cache = k_cache.clone()

    q = ops.attention_inputs(qkv, positions, cos, sin, q_norm, k_norm, 1e-6, heads, kv_heads, k_cache, v_cache,
                             slots.numpy())

    rq, rk, rv = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    rq, rk, rv = rq.reshape(tokens, heads, dim), rk.reshape(tokens, kv_heads, dim), rv.reshape(tokens, kv_heads, dim)
    if qk_norm:
        rq, rk = R.rms_norm(rq, q_norm, 1e-6), R.rms_norm(rk, k_norm, 1e-6)
    rq, rk = R.rotary(rq, cos[positions], sin[positions]), R.rotary(rk, cos[positions], sin[positions])
    torch.testing.assert_close(q, rq, **tol)
    flat_k, flat_v = k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim)
    written = slots[1:]
    torch.testing.assert_close(flat_k[written], rk[1:], **tol)
    assert torch.equal(flat_v[written], rv[1:])
    others = torch.ones(blocks * bs, dtype=torch.bool)
    others[written] = False
    assert flat_k[others].isnan().all() and flat_v[others].isnan().all()


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 64, 200])
def test_serial_and_parallel_builds_agree(dtype, tol, rows):
    """Each kernel is built serial and parallel; both must give the same result (up to the order of a
    vectorized sum: a float32 ulp, or one bfloat16 rounding step)."""
    x, w = torch.randn(rows, 96).to(dtype), (1 + 0.3 * torch.randn(96)).to(dtype)
    a, b = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    for build, out in ((cpu_kernels.rms_norm_kernel.serial, a), (cpu_kernels.rms_norm_kernel.parallel, b)):
        build(as_numba(out), as_numba(x), as_numba(w), np.float32(1e-6))
    close = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(a, b, **close)
    torch.testing.assert_close(a, R.rms_norm(x, w, 1e-6), **tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, dict(atol=1e-4, rtol=1e-4)),
                                        (torch.bfloat16, dict(atol=6e-2, rtol=2e-2))])
@pytest.mark.parametrize("rows", [1, 2, 3, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_features", [192, 700])  # below and above the parallel small-batch size
def test_linear_paths_agree(dtype, tol, rows, bias, out_features):
    """numba small-batch kernel, oneDNN packed weights and torch's plain linear give the same result."""
    torch.manual_seed(rows)
    weight = (torch.randn(out_features, 160) / 12).to(dtype)
    b = torch.randn(out_features).to(dtype) if bias else None
    x, residual = torch.randn(rows, 160).to(dtype), torch.randn(rows, out_features).to(dtype)
    paths = {"small": Linear(weight.clone(), b), "packed": Linear(weight.clone(), b, small_batch=False),
             "plain": Linear(weight.clone(), b, pack=False, small_batch=False)}
    assert paths["plain"].packed is None and paths["packed"]._plain is None and paths["packed"]._panels is None
    if paths["packed"].packed is None:
        pytest.skip("this torch build has no oneDNN packed linear; the plain path serves")
    ref = F.linear(x.double(), weight.double(), None if b is None else b.double())
    for name, lin in paths.items():
        torch.testing.assert_close(lin(x).double(), ref, **tol, msg=name)
        torch.testing.assert_close(lin(x, residual).double(), ref + residual.double(), **tol, msg=name)
    torch.testing.assert_close(paths["small"](x), paths["plain"](x), **tol)
