"""The CUDA kernel tests must be able to fail: each case plants one bug in a kernel's source (a
barrier removed, an off-by-one in a block-table index, a wrong shuffle lane, ...), builds it through
the host build, and asserts that the kernel's checks catch it in at least one thread order."""
import pytest
import torch

from scalellm.ops.cuda import backend as cuda_backend
from scalellm.ops.cuda import host as cuda_host
from tests.cuda_kernel_checks import host, run_check

pytestmark = host

with open(f"{cuda_backend.KERNEL_DIR}/common.cuh") as f:
    INLINED_COMMON = f.read()  # a bug planted in the shared helpers goes in with them, inlined

# (id, kernel source, text in it, its replacement, the checks that must catch it)
PLANTED = [
    ("decode: barrier after staging q and the split's cache slots removed", "paged_attention",
     "    slot_s[r] = table[pos / block_size] * block_size + pos % block_size;\n  }\n  __syncthreads();\n",
     "    slot_s[r] = table[pos / block_size] * block_size + pos % block_size;\n  }\n", ["decode_attention"]),
    ("decode: barrier before merging the warps removed", "paged_attention",
     "  __syncthreads();\n\n  // merge the warps", "\n  // merge the warps", ["decode_attention"]),
    ("decode: wrong shuffle lane in the dot product", "paged_attention",
     "s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], o, kRowThreads);",
     "s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], o ^ 1, kRowThreads);", ["decode_attention"]),
    ("decode: split one token short", "paged_attention",
     "const int n = min(context_lens[seq], begin + kSplit) - begin;",
     "const int n = min(context_lens[seq], begin + kSplit - 1) - begin;", ["decode_attention"]),
    ("decode: online softmax does not rescale the accumulator", "paged_attention",
     "float a = acc[g][j] * c;", "float a = acc[g][j];", ["decode_attention"]),
    ("decode: row groups merged without rescaling to the common max", "paged_attention",
     "const float a = rescale(m[g], m_new), b = rescale(m_o, m_new);", "const float a = 1.f, b = 1.f;",
     ["decode_attention"]),
    ("decode: reduction ignores the splits' sums", "paged_attention",
     "if (ps[p] > 0.f) o += part_out[(sh * splits + p) * HEAD_DIM + d] * ps[p] * __expf(pm[p] - m);",
     "if (ps[p] > 0.f) o += part_out[(sh * splits + p) * HEAD_DIM + d] * __expf(pm[p] - m);",
     ["decode_attention"]),
    ("prefill: off-by-one block-table index", "prefill_attention",
     "(int64_t)table[t / block_size] * block_size", "(int64_t)table[(t + 1) / block_size] * block_size",
     ["prefill_attention"]),
    ("prefill: sliding window one token wide", "prefill_attention",
     "max(0, pos - window + 1)", "max(0, pos - window)", ["prefill_attention"]),
    ("prefill: a tile's context starts one key late under the window", "prefill_attention",
     "max(0, pos0 - window + 1)", "max(0, pos0 - window + 2)", ["prefill_attention"]),
    ("prefill: no causal mask within a tile (a query sees the tile's later tokens)", "prefill_attention",
     "valid[u] = t >= first && t <= pos;", "valid[u] = t >= first && t < end;", ["prefill_attention"]),
    ("prefill: barrier after loading a pass's K/V removed", "prefill_attention",
     "      }\n    }\n    __syncthreads();\n", "      }\n    }\n", ["prefill_attention"]),
    ("prefill: barrier before the next pass overwrites K/V removed", "prefill_attention",
     "    __syncthreads();  // every warp is done", "    // every warp is done", ["prefill_attention"]),
    ("prefill: online softmax does not rescale the output", "prefill_attention",
     "acc[c * kVec + e] *= corr;", "acc[c * kVec + e] *= 1.f;", ["prefill_attention"]),
    ("sampling: barrier after copying the logits removed", "sampling",
     "  for (int i = threadIdx.x; i < vocab; i += blockDim.x) w[i] = x[i];\n  __syncthreads();\n",
     "  for (int i = threadIdx.x; i < vocab; i += blockDim.x) w[i] = x[i];\n", ["sampling"]),
    ("sampling: block max reads the wrong shuffle lane (common.cuh)", "sampling",
     '#include "common.cuh"', INLINED_COMMON.replace("x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));",
                                                    "x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o >> 1));"),
     ["sampling"]),
    ("rms_norm: residual written before it is read", "rms_norm",
     "      T sum = from_float<T>(v + to_float(rr[i]));", "      T sum = from_float<T>(v + v);", ["rms_norm"]),
    ("rotary: pairs split at the wrong place", "rotary",
     "const float x1 = to_float(base[d]), x2 = to_float(base[d + half]);",
     "const float x1 = to_float(base[d]), x2 = to_float(base[d + half - 1]);", ["rotary"]),
    ("moe: renormalization ignored", "moe_routing",
     "weights[(int64_t)t * top_k + j] = renormalize ? p[j] / total : p[j];",
     "weights[(int64_t)t * top_k + j] = p[j];", ["moe"]),
    ("moe: every expert's row read from the token's first slot", "moe_routing",
     "to_float(rows[(int64_t)slot_of_pair[pair] * hidden + h])",
     "to_float(rows[(int64_t)slot_of_pair[t * top_k] * hidden + h])", ["moe"]),
    ("quant: Q4 nibbles read high before low", "quant_gemm",
     "const int q = j < 16 ? (byte & 15) : (byte >> 4);", "const int q = j < 16 ? (byte >> 4) : (byte & 15);",
     ["quant_gemm"]),
    ("quant: the last block of each row skipped", "quant_gemm",
     "for (int b = 0; b < nb; ++b) {", "for (int b = 0; b < nb - 1; ++b) {", ["quant_gemm"]),
    ("kv_write: the last vector of each row skipped", "kv_write",
     "const int vecs = row_elems / N;", "const int vecs = row_elems / N - 1;", ["write_kv"]),
    ("qkv_prep: q's norm weights used for k too", "qkv_prep",
     "const T* w = is_q ? q_norm : k_norm;", "const T* w = q_norm;", ["qkv_prep"]),
    ("qkv_prep: the last head of each token skipped (the last v head)", "qkv_prep",
     "if (unit >= num_heads + 2 * num_kv_heads) return;", "if (unit >= num_heads + 2 * num_kv_heads - 1) return;",
     ["qkv_prep"]),
    ("qkv_prep: rotary's second half rotated the wrong way", "qkv_prep",
     "dst[d + kHalf] = from_float<T>(x2[j] * c2 + x1[j] * s2);",
     "dst[d + kHalf] = from_float<T>(x2[j] * c2 - x1[j] * s2);", ["qkv_prep"]),
]


def caught(checks: list[str]) -> list[str]:
    """Which (check, order) runs failed."""
    failures = []
    for name in checks:
        for order in cuda_host.ORDERS:
            for dtype in (torch.float32, torch.bfloat16) if name != "sampling" else (torch.float32,):
                try:
                    with cuda_host.thread_order(order, seed=7):
                        run_check(name, dtype)
                except (AssertionError, cuda_host.KernelError) as e:
                    failures.append(f"{name} {order} {dtype}: {(str(e) or type(e).__name__).splitlines()[0][:80]}")
    return failures


@pytest.mark.parametrize("label, source, old, new, checks", PLANTED, ids=[p[0] for p in PLANTED])
def test_planted_bug_is_caught(label, source, old, new, checks):
    original = cuda_backend.kernel_source(source)
    assert original.count(old) == 1, f"the planted bug's anchor is not (uniquely) in {source}.cu"
    with cuda_backend.patched_source(source, original.replace(old, new)):
        failures = caught(checks)
    assert failures, f"planted bug not caught: {label}"
