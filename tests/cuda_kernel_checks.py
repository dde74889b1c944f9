"""Checks of every CUDA kernel, through the wrappers the engine calls (scalellm.ops with CUDA kernels
on), against float64 torch references. Each check raises AssertionError on a wrong result; the kernel
tests run them in three thread orders, and the planted-bug test runs them on broken kernel sources.

On the CPU the kernels run through their host build; the same checks run on a GPU when given
device="cuda". Outputs and unwritten cache slots start as NaN, so an element a kernel fails to write,
or a slot it reads that nothing wrote, fails the comparison.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scalellm import ops
from scalellm.ops.cuda import backend as cuda_backend
from scalellm.ops.cuda import host as cuda_host
from scalellm.sampling_params import SamplingParams
from tests.sampling_reference import run_sampler

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_HOST_MISSING = cuda_host.available()
host = pytest.mark.skipif(_HOST_MISSING is not None, reason=_HOST_MISSING or "")  # g++ and CUDA's headers
try:
    import cupy  # noqa: F401
    HAS_CUPY = True
except ImportError:
    HAS_CUPY = False
HAS_GPU = torch.cuda.is_available() and HAS_CUPY
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and CuPy")
NAN = float("nan")


def tol(dtype) -> dict:
    return {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
            torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}[dtype]


def randn(*shape, dtype, seed, device="cpu", scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def close(actual: torch.Tensor, expected: torch.Tensor, dtype, slack: float = 1.0) -> None:
    """slack: a chain of several ops rounds to dtype at each step (float32 stays exact)."""
    t = {k: v * (slack if dtype != torch.float32 else 1.0) for k, v in tol(dtype).items()}
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), **t)


# -- elementwise -----------------------------------------------------------------------------------
def check_rms_norm(dtype, device="cpu"):
    for rows, hidden in [(1, 64), (5, 576), (3, 1000)]:
        x, r = randn(rows, hidden, dtype=dtype, seed=hidden, device=device), randn(rows, hidden, dtype=dtype, seed=1)
        r, w = r.to(device), randn(hidden, dtype=dtype, seed=2, device=device)
        f64 = lambda s: w.double().cpu() * s / (s.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()  # noqa: E731
        close(ops.rms_norm(x, w, 1e-6), f64(x.double().cpu()), dtype)
        out, res = ops.add_rms_norm(x, r, w, 1e-6)
        total = x.double().cpu() + r.double().cpu()
        close(res, total, dtype)
        close(out, f64(total), dtype)


def rotary_tables(dim, dtype, positions=512):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.arange(positions).float()[:, None] * inv_freq[None]
    return torch.cat([freqs.cos()] * 2, -1).to(dtype), torch.cat([freqs.sin()] * 2, -1).to(dtype), freqs


def check_rotary(dtype, device="cpu"):
    for tokens, heads, kv_heads, dim in [(1, 4, 4, 64), (9, 6, 3, 64), (5, 8, 2, 128)]:
        cos, sin, freqs = rotary_tables(dim, dtype)
        positions = torch.randint(0, 500, (tokens,), generator=torch.Generator().manual_seed(tokens))
        qkv = randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype, seed=dim + tokens, device=device)
        q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)  # strided views, as in the model
        q, k = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
        q0, k0 = q.double().cpu(), k.double().cpu()
        ops.rotary(q, k, positions.to(device), cos.to(device), sin.to(device))
        c, s = freqs[positions].double().cos()[:, None], freqs[positions].double().sin()[:, None]
        for got, x in ((q, q0), (k, k0)):
            x1, x2 = x[..., :dim // 2], x[..., dim // 2:]
            close(got, torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1), dtype)


def check_silu_mul(dtype, device="cpu"):
    for tokens, n in [(1, 8), (13, 688), (3, 1536)]:
        x = randn(tokens, 2 * n, dtype=dtype, seed=n, device=device)
        xd = x.double().cpu()
        close(ops.silu_mul(x), F.silu(xd[:, :n]) * xd[:, n:], dtype)


def check_write_kv(dtype, device="cpu"):
    bs, kvh, d, blocks = 16, 3, 64, 10
    k_cache = torch.full((blocks, bs, kvh, d), NAN).to(dtype).to(device)
    v_cache = k_cache.clone()
    k, v = randn(21, kvh, d, dtype=dtype, seed=1, device=device), randn(21, kvh, d, dtype=dtype, seed=2, device=device)
    slots = torch.randperm(blocks * bs, generator=torch.Generator().manual_seed(0))[:21]
    slots[4] = -1  # not cached: written nowhere
    ops.write_kv(k, v, k_cache, v_cache, slots.numpy())
    flat_k, flat_v = k_cache.view(-1, kvh, d).cpu(), v_cache.view(-1, kvh, d).cpu()
    keep = slots >= 0
    assert torch.equal(flat_k[slots[keep]], k.cpu()[keep]) and torch.equal(flat_v[slots[keep]], v.cpu()[keep])
    others = torch.ones(blocks * bs, dtype=torch.bool)
    others[slots[keep]] = False
    assert flat_k[others].isnan().all() and flat_v[others].isnan().all()


QKV_CASES = [  # (tokens, heads, kv_heads, head_dim, per-head q/k norm, qkv rows padded: a strided view)
    (2, 4, 4, 64, False, False), (9, 6, 2, 64, True, False), (7, 8, 2, 128, False, True), (5, 4, 1, 128, True, True)]


def check_qkv_prep(dtype, device="cpu"):
    """The attention inputs in one launch (qkv_prep.cu, through ops.attention_inputs) against float64 of the
    unfused ops: per-head RMSNorm (when given), rotary, q out, k and v to the cache; GQA; rows with slot -1
    (padded CUDA-graph rows) write nothing; qkv itself is left as it was."""
    bs, blocks, eps = 4, 6, 1e-6
    for tokens, heads, kv_heads, dim, norm, padded in QKV_CASES:
        cos, sin, freqs = rotary_tables(dim, dtype)
        width = (heads + 2 * kv_heads) * dim
        qkv = randn(tokens, width + (3 * dim if padded else 0), dtype=dtype, seed=tokens + dim, device=device)
        qkv = qkv[:, :width]
        q_norm = k_norm = None
        if norm:
            q_norm = (randn(dim, dtype=torch.float32, seed=5) * 0.5 + 1).to(dtype).to(device)
            k_norm = (randn(dim, dtype=torch.float32, seed=6) * 0.5 + 1).to(dtype).to(device)
        positions = torch.randint(0, 500, (tokens,), generator=torch.Generator().manual_seed(dim))
        slots = torch.randperm(blocks * bs, generator=torch.Generator().manual_seed(tokens))[:tokens]
        slots[tokens // 2] = -1  # a padded row: its k and v go nowhere
        k_cache = torch.full((blocks, bs, kv_heads, dim), NAN).to(dtype).to(device)
        v_cache = k_cache.clone()
        qkv0 = qkv.clone()
        launches = dict(cuda_host.launch_counts)
        q = ops.attention_inputs(qkv, positions.to(device), cos.to(device), sin.to(device), q_norm, k_norm, eps,
                                 heads, kv_heads, k_cache, v_cache, slots.numpy())
        if device == "cpu":  # one launch of the fused kernel, nothing else
            new = {n: c - launches.get(n, 0) for n, c in cuda_host.launch_counts.items() if c != launches.get(n, 0)}
            assert new == {f"scalellm::qkv_prep<{cuda_backend.CTYPES[dtype]}, {dim}>": 1}, new
        assert torch.equal(qkv, qkv0)
        x = qkv0.cpu().double()
        q0, k0, _ = x.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
        q0, k0 = q0.view(tokens, heads, dim), k0.view(tokens, kv_heads, dim)
        if norm:
            def rms(t, w):
                return w.cpu().double() * t / (t.pow(2).mean(-1, keepdim=True) + eps).sqrt()
            q0, k0 = rms(q0, q_norm), rms(k0, k_norm)
        c, s = freqs[positions].double().cos()[:, None], freqs[positions].double().sin()[:, None]

        def rotate(t):
            t1, t2 = t[..., :dim // 2], t[..., dim // 2:]
            return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], -1)
        slack = 2.0 if norm else 1.0  # the norm rounds twice before rotary rounds
        assert q.shape == (tokens, heads, dim)
        close(q, rotate(q0), dtype, slack)
        keep = slots >= 0
        flat_k, flat_v = k_cache.view(-1, kv_heads, dim).cpu(), v_cache.view(-1, kv_heads, dim).cpu()
        close(flat_k[slots[keep]], rotate(k0)[keep], dtype, slack)
        v_in = qkv0.cpu()[:, (heads + kv_heads) * dim:].view(tokens, kv_heads, dim)
        assert torch.equal(flat_v[slots[keep]], v_in[keep])  # v: copied bit for bit
        others = torch.ones(blocks * bs, dtype=torch.bool)
        others[slots[keep]] = False
        assert flat_k[others].isnan().all() and flat_v[others].isnan().all()


# -- attention --------------------------------------------------------------------------------------
def scattered_tables(lens, bs, seed, spare=5):
    """Each sequence's blocks at shuffled places in the cache; returns (tables [seqs, width], num_blocks)."""
    need = [-(-n // bs) for n in lens]
    num_blocks = sum(need) + spare
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32)
    used = 0
    for i, nb in enumerate(need):
        tables[i, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
    return tables, num_blocks


def reference_attention(q, k_cache, v_cache, table, first, last, positions, scale):
    """Per query i: softmax over cached positions [first[i], positions[i]] of the sequence, float64, GQA."""
    bs = k_cache.shape[1]
    k_all = k_cache.cpu().reshape(-1, *k_cache.shape[2:]).double()
    v_all = v_cache.cpu().reshape(-1, *v_cache.shape[2:]).double()
    out = []
    for i in range(q.shape[0]):
        pos = torch.arange(int(first[i]), int(positions[i]) + 1)
        slots = table[i].long()[pos // bs] * bs + pos % bs
        group = q.shape[1] // k_all.shape[1]
        k, v = k_all[slots].repeat_interleave(group, 1), v_all[slots].repeat_interleave(group, 1)
        w = torch.einsum("hd,lhd->hl", q[i].cpu().double(), k) * scale
        out.append(torch.einsum("hl,lhd->hd", w.softmax(-1), v))
    return torch.stack(out)


DECODE_CASES = [  # (heads, kv_heads, head_dim, block_size): every GQA group size 1..MAX_GROUP, both head dims
    (2, 2, 64, 16), (2, 1, 128, 32), (6, 2, 64, 8), (4, 1, 128, 16), (5, 1, 64, 16), (12, 2, 128, 16),
    (7, 1, 64, 32), (8, 1, 128, 16), (16, 2, 64, 16)]


def check_decode_attention(dtype, device="cpu"):
    """Contexts from 1 token to several splits (cuda_backend.PARTITION tokens each; the last one partial),
    some under a sliding window, one whose window leaves its later splits empty; every other case launched
    the way a CUDA graph launches it, with the splits of a longer context than any in the batch (empty
    splits the reduction must skip)."""
    split = cuda_backend.PARTITION
    lens = [1, 17, 200, 300 + 3 * split + 32, 16, 600 + split // 2]
    starts = [0, 0, 40, 300, 3, 600]
    for i, (heads, kv_heads, dim, bs) in enumerate(DECODE_CASES):
        tables, num_blocks = scattered_tables(lens, bs, seed=heads)
        k_cache = randn(num_blocks, bs, kv_heads, dim, dtype=dtype, seed=1, device=device)
        v_cache = randn(num_blocks, bs, kv_heads, dim, dtype=dtype, seed=2, device=device)
        q = randn(len(lens), heads, dim, dtype=dtype, seed=3 + i, device=device, scale=2.0)  # peaked softmaxes
        for n in (len(lens), 3):  # the whole batch; its first three rows, which fit in one split (no reduction)
            meta = ops.AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.int64).numpy(),
                                         num_decode_tokens=n, decode_block_tables=tables[:n].numpy(),
                                         decode_context_starts=torch.tensor(starts[:n], dtype=torch.int32).numpy(),
                                         decode_context_lens=torch.tensor(lens[:n], dtype=torch.int32).numpy(),
                                         max_decode_context=6 * split if i % 2 and n > 3 else 0)
            out = ops.paged_attention(q[:n], k_cache, v_cache, meta, dim ** -0.5)
            ref = reference_attention(q[:n], k_cache, v_cache, tables[:n], starts[:n], None,
                                      [x - 1 for x in lens[:n]], dim ** -0.5)
            close(out, ref, dtype)


PREFILL_CASES = [  # (heads, kv_heads, head_dim, window, decodes, [(cached before, chunk length) per sequence])
    # the first `decodes` sequences are decodes; chunk lengths around the tile (ops PREFILL_TILE = 16 tokens):
    # shorter, longer, not multiples of it, exactly one and two tiles, a 1-token chunk with a cached prefix;
    # contexts over several passes of the kernel's 32 keys
    (8, 2, 64, None, 2, [(30, 1), (5, 1), (0, 21), (40, 9), (15, 34)]),
    (8, 2, 128, None, 2, [(30, 1), (5, 1), (0, 21), (40, 9), (15, 34)]),
    (8, 2, 64, 20, 2, [(30, 1), (5, 1), (0, 21), (40, 9), (15, 34)]),
    (2, 2, 128, None, 0, [(0, 16), (3, 1), (20, 17), (0, 33)]),  # GQA group 1
    (8, 1, 64, 7, 1, [(7, 1), (50, 40), (0, 5), (9, 1)]),  # group 8, a window shorter than a tile
    (6, 2, 128, 33, 0, [(0, 1), (70, 16), (2, 31)]),  # group 3, a window a pass wide
    (7, 1, 64, None, 1, [(4, 1), (33, 48), (1, 2)]),  # group 7
]


def check_prefill_attention(dtype, device="cpu"):
    """Chunks of several sequences in one batch (after decodes), each attending to its cached prefix and
    itself; chunks crossing block boundaries, tiles crossing chunk ends; with and without a sliding window;
    GQA groups 1, 3, 4, 7, 8."""
    bs = 16
    for heads, kv_heads, dim, window, decodes, seqs in PREFILL_CASES:
        totals = [c + n for c, n in seqs]
        tables, num_blocks = scattered_tables(totals, bs, seed=dim + heads)
        k_cache = torch.full((num_blocks, bs, kv_heads, dim), NAN).to(dtype).to(device)
        v_cache = k_cache.clone()
        n_tok = sum(n for _, n in seqs)
        qkv = randn(n_tok, (heads + 2 * kv_heads) * dim, dtype=dtype, seed=dim + heads, device=device)
        # the cached prefixes, written by the kv_write kernel
        for i, (cached, _) in enumerate(seqs):
            if cached:
                pos = torch.arange(cached)
                slots = (tables[i].long()[pos // bs] * bs + pos % bs).numpy()
                kv = randn(cached, 2, kv_heads, dim, dtype=dtype, seed=100 + i, device=device)
                ops.write_kv(kv[:, 0].contiguous(), kv[:, 1].contiguous(), k_cache, v_cache, slots)
        positions, slots, decode_tables, decode_lens, specs = [], [], [], [], []
        for i, (cached, n) in enumerate(seqs):
            pos = torch.arange(cached, cached + n)
            positions.append(pos)
            slots.append(tables[i].long()[pos // bs] * bs + pos % bs)
            if i < decodes:
                decode_tables.append(tables[i].tolist())
                decode_lens.append(cached + n)
            else:
                blocks = tables[i, :-(-(cached + n) // bs)].tolist()
                specs.append((int(sum(s[1] for s in seqs[:i])), n, cached + n, blocks))
        positions, slots = torch.cat(positions), torch.cat(slots)
        meta = ops.build_attention_metadata(bs, slots.numpy(), decode_tables, decode_lens, specs, window)
        q = ops.attention_inputs(qkv, positions.to(device), *rotary_tables(dim, dtype)[:2], None, None, 1e-6,
                                 heads, kv_heads, k_cache, v_cache, meta.slot_mapping)
        out = ops.paged_attention(q, k_cache, v_cache, meta, dim ** -0.5)
        row_seq = torch.cat([torch.full((n,), i) for i, (_, n) in enumerate(seqs)])
        first = (positions - window + 1).clamp(min=0) if window else torch.zeros_like(positions)
        ref = reference_attention(q, k_cache, v_cache, tables[row_seq], first, None, positions, dim ** -0.5)
        close(out, ref, dtype)


# -- mixture of experts -------------------------------------------------------------------------------
def reference_moe(x, w, logits) -> torch.Tensor:
    """float64 on the CPU, token by token: softmax, top-k (ties to the lower expert), optional renormalization."""
    def w64(lin) -> torch.Tensor:
        return lin.weight.double().cpu()

    xd, out = x.double(), torch.zeros(x.shape, dtype=torch.float64)
    probs = logits.double().softmax(-1)
    for t in range(x.shape[0]):
        chosen = torch.argsort(-probs[t], stable=True)[:w.top_k]
        p = probs[t, chosen]
        p = p / p.sum() if w.renormalize else p
        for e, pe in zip(chosen.tolist(), p.tolist()):
            gate, up = (xd[t] @ w64(w.gate_up[e]).T).chunk(2)
            out[t] += pe * (F.silu(gate) * up) @ w64(w.down[e]).T
        if w.shared_gate_up is not None:
            gate, up = (xd[t] @ w64(w.shared_gate_up).T).chunk(2)
            shared = (F.silu(gate) * up) @ w64(w.shared_down).T
            out[t] += torch.sigmoid(xd[t] @ w64(w.shared_gate).T) * shared
    return out


def check_moe(dtype, device="cpu"):
    """Routing (softmax, top-k, with and without renormalization), permutation, gather, one GEMM pair per
    expert and the weighted combine, with and without a shared expert; 37 tokens, so some experts get
    none and others many."""
    from scalellm.ops.linear import Linear
    from scalellm.ops.moe import MoEWeights

    hidden, inter, experts = 64, 32, 8
    for top_k, renormalize, shared in [(2, True, False), (3, False, True), (1, False, False)]:
        g = torch.Generator().manual_seed(top_k)

        def lin(*shape):
            return Linear((torch.randn(*shape, generator=g) * 0.3).to(dtype).to(device), pack=False)
        w = MoEWeights(router=lin(experts, hidden), gate_up=[lin(2 * inter, hidden) for _ in range(experts)],
                       down=[lin(hidden, inter) for _ in range(experts)], top_k=top_k, renormalize=renormalize)
        if shared:
            w.shared_gate_up, w.shared_down, w.shared_gate = lin(2 * inter, hidden), lin(hidden, inter), lin(1, hidden)
        x = randn(37, hidden, dtype=dtype, seed=top_k + 10, device=device)
        residual = randn(37, hidden, dtype=dtype, seed=top_k + 20, device=device)
        out = ops.fused_moe(x, w, residual=residual)
        expected = residual.double().cpu() + reference_moe(x.cpu(), w, w.router(x).cpu())
        close(out, expected, dtype, slack=4.0)  # router, gate-up, SiLU-mul, down and combine each round


# -- sampling ---------------------------------------------------------------------------------------
SAMPLING_ROWS = [
    dict(temperature=0.0, logprobs=3),
    dict(temperature=0.8, top_k=5, logprobs=2),
    dict(temperature=1.0, top_p=0.7),
    dict(temperature=1.3, min_p=0.05, logprobs=0),
    dict(temperature=0.7, top_k=40, top_p=0.9, min_p=0.02),
    dict(temperature=1.0, repetition_penalty=1.5, presence_penalty=0.4, frequency_penalty=0.3, logprobs=4),
    dict(temperature=0.0, repetition_penalty=1.8, presence_penalty=1.0),
    dict(temperature=1.0, min_tokens=5, stop_token_ids=[7]),
    dict(temperature=1.0),
]


def check_sampling(device="cpu", vocab=600, repeats=3):
    """Every filter and penalty, seeded: the CUDA kernel's tokens equal the CPU path's token for token,
    and the logprobs agree."""
    rows = [SamplingParams(seed=100 * r + i, **kw) for r in range(repeats) for i, kw in enumerate(SAMPLING_ROWS)]
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(vocab)) * 3
    history = ([3, 4, 5, 3, 7, 9, 9, 12], 4)
    logits[:, 7] += 12.0  # the stop token (and an output token) would win unless min_tokens or a penalty stops it
    logits[:, 9] += 10.0  # an output token seen twice: penalties push it down
    with ops.cuda_kernels_on_cpu(False):  # the CPU path: the numba twin
        expected = run_sampler(logits, rows, [history] * len(rows), eos_token_ids=(2,))
    with ops.cuda_kernels_on_cpu(device == "cpu"):
        got = run_sampler(logits.to(device), rows, [history] * len(rows), eos_token_ids=(2,))
    assert got.token_ids == expected.token_ids
    for a, b in zip(got.logprobs, expected.logprobs):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a.top, b.top))
    assert 7 not in [got.token_ids[i] for i, p in enumerate(rows) if p.min_tokens]


def check_quant_gemm(dtype, device="cpu"):
    """Block-quantized projections (Q8_0, Q4_0, Q4_1): the small-batch kernel and, from DENSE_ROWS rows,
    the weight's rows dequantized for a dense GEMM; both against float64 over the dequantized weight."""
    from scalellm.ops import QuantizedLinear, QuantizedTensor
    from scalellm.ops.quant import linear as quant_linear

    for i, fmt in enumerate(("q8_0", "q4_0", "q4_1")):
        w = QuantizedTensor.quantize(randn(40, 96, dtype=torch.float32, seed=i, scale=0.1), fmt)
        bias = randn(40, dtype=dtype, seed=9, device=device)
        lin = QuantizedLinear(w.to(device), bias, dtype)
        w64 = w.dequantize().double()
        for rows in (1, 6, quant_linear.DENSE_ROWS):
            x = randn(rows, 96, dtype=dtype, seed=rows, device=device)
            residual = randn(rows, 40, dtype=dtype, seed=rows + 1, device=device)
            expected = x.double().cpu() @ w64.T + bias.double().cpu() + residual.double().cpu()
            close(lin(x, residual=residual), expected, dtype, slack=2.0)
        ids = torch.tensor([39, 0, 7]).to(device)
        close(ops.embedding(ids, w.to(device), dtype), w64[ids.cpu()].to(dtype), dtype)


KERNEL_CHECKS = {"rms_norm": check_rms_norm, "rotary": check_rotary, "silu_mul": check_silu_mul,
                 "write_kv": check_write_kv, "qkv_prep": check_qkv_prep, "decode_attention": check_decode_attention,
                 "prefill_attention": check_prefill_attention, "moe": check_moe, "quant_gemm": check_quant_gemm}
SOURCES = {"rms_norm": "rms_norm", "rotary": "rotary", "silu_mul": "activation", "write_kv": "kv_write",
           "qkv_prep": "qkv_prep",
           "decode_attention": "paged_attention", "prefill_attention": "prefill_attention", "sampling": "sampling",
           "moe": "moe_routing", "quant_gemm": "quant_gemm"}


def run_check(name: str, dtype=torch.float32) -> None:
    """One check on the host build (CUDA kernels for CPU tensors)."""
    assert cuda_backend  # imported: the wrappers under test
    if name == "sampling":
        check_sampling()
        return
    with ops.cuda_kernels_on_cpu():
        KERNEL_CHECKS[name](dtype)


def engines_on_cuda(monkeypatch) -> None:
    """Every EngineConfig made from here on runs with --device cuda."""
    from scalellm.config import EngineConfig

    init = EngineConfig.__post_init__

    def on_cuda(self):
        self.device = "cuda"
        init(self)
    monkeypatch.setattr(EngineConfig, "__post_init__", on_cuda)
