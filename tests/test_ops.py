"""CPU operations against float64 references."""
import pytest
import torch
import torch.nn.functional as F

from scalellm import ops
from scalellm.ops.cpu_attention import paged_decode_attention


def reference_attention(q, k_cache, v_cache, tables, starts, lens, scale):
    """Per sequence in float64: gather the context, softmax(q k^T) v with GQA."""
    bs = k_cache.shape[1]
    out = []
    for i in range(q.shape[0]):
        pos = torch.arange(int(starts[i]), int(lens[i]))
        slots = tables[i].long()[pos // bs] * bs + pos % bs
        k = k_cache.reshape(-1, *k_cache.shape[2:])[slots].double()  # [L, kvh, D]
        v = v_cache.reshape(-1, *v_cache.shape[2:])[slots].double()
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        w = torch.einsum("hd,lhd->hl", q[i].double(), k) * scale
        out.append(torch.einsum("hl,lhd->hd", w.softmax(-1), v))
    return torch.stack(out)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 32), (8, 2, 64), (9, 3, 64), (6, 1, 16)])
def test_decode_attention_matches_reference(dtype, tol, heads, kv_heads, head_dim):
    torch.manual_seed(heads * 100 + head_dim)
    bs, num_blocks = 16, 96
    lens = torch.tensor([1, 15, 16, 17, 100, 333], dtype=torch.int32)
    starts = torch.tensor([0, 0, 0, 3, 0, 300], dtype=torch.int32)  # some with a sliding window
    k_cache = torch.randn(num_blocks, bs, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(num_blocks, bs, kv_heads, head_dim).to(dtype)
    perm = torch.randperm(num_blocks).to(torch.int32)
    tables = torch.zeros(len(lens), 22, dtype=torch.int32)
    used = 0
    for i, n in enumerate(lens.tolist()):
        nb = -(-n // bs)
        tables[i, :nb] = perm[used:used + nb]
        used += nb
    q = torch.randn(len(lens), heads, head_dim).to(dtype)
    out = paged_decode_attention(q, k_cache, v_cache, tables, starts, lens, head_dim ** -0.5)
    ref = reference_attention(q, k_cache, v_cache, tables, starts, lens, head_dim ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_prefill_chunk_attends_to_cached_context():
    """A chunk of 5 queries at positions 20..24 over a 25-token paged context equals plain causal attention."""
    torch.manual_seed(0)
    bs, kvh, h, d = 4, 2, 4, 16
    k_cache = torch.full((16, bs, kvh, d), float("nan"))  # unwritten slots must never be read
    v_cache = torch.full((16, bs, kvh, d), float("nan"))
    table = [9, 3, 14, 0, 7, 12, 5]
    k_all, v_all, q_all = torch.randn(25, kvh, d), torch.randn(25, kvh, d), torch.randn(25, h, d)
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(25)])
    ops.write_kv(k_all, v_all, k_cache, v_cache, slots)
    meta = ops.build_attention_metadata(bs, slots[20:].tolist(), [], [], [(0, 5, 25, table)])
    out = ops.paged_attention(q_all[20:], k_cache, v_cache, meta, d ** -0.5)
    ref = F.scaled_dot_product_attention(q_all.transpose(0, 1)[None].double(), k_all.transpose(0, 1)[None].double(),
                                         v_all.transpose(0, 1)[None].double(), is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out.double(), ref[0].transpose(0, 1)[20:], atol=1e-5, rtol=1e-5)


def test_rms_norm_rotary_silu_against_float64():
    torch.manual_seed(1)
    x, r, w = torch.randn(7, 32), torch.randn(7, 32), torch.randn(32)
    normed, residual = ops.add_rms_norm(x, r, w, 1e-6)
    s = (x + r).double()
    torch.testing.assert_close(normed.double(), w.double() * s / (s.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt(),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(residual, x + r)
    g = torch.randn(5, 64)
    torch.testing.assert_close(ops.silu_mul(g).double(), F.silu(g[:, :32].double()) * g[:, 32:].double(),
                               atol=1e-6, rtol=1e-6)
    q = torch.randn(5, 3, 8)
    angle = torch.randn(5, 4).double()
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    out = ops.rotary(q, cos.float(), sin.float()).double()
    qd = q.double()
    x1, x2 = qd[..., :4], qd[..., 4:]
    c, s_ = angle.cos()[:, None], angle.sin()[:, None]
    torch.testing.assert_close(out, torch.cat([x1 * c - x2 * s_, x2 * c + x1 * s_], -1), atol=1e-6, rtol=1e-6)
