"""The CUDA kernel tests must be able to fail: each case plants one bug in a kernel's source (a
barrier removed, an off-by-one in a block-table index, a wrong shuffle lane, ...), builds it through
the host build, and asserts that the kernel's checks catch it in at least one thread order."""
import pytest
import torch

from scalellm.ops import cuda_backend, cuda_host
from tests.cuda_kernel_checks import host, run_check

pytestmark = host

with open(f"{cuda_backend.KERNEL_DIR}/common.cuh") as f:
    INLINED_COMMON = f.read()  # a bug planted in the shared helpers goes in with them, inlined

# (id, kernel source, text in it, its replacement, the checks that must catch it)
PLANTED = [
    ("decode: barrier after loading q removed", "paged_attention",
     "    q_s[g][d] = to_float(q[((int64_t)seq * num_heads + kv_head * group + g) * HEAD_DIM + d]) * scale;\n"
     "  }\n  __syncthreads();\n",
     "    q_s[g][d] = to_float(q[((int64_t)seq * num_heads + kv_head * group + g) * HEAD_DIM + d]) * scale;\n"
     "  }\n", ["decode_attention"]),
    ("decode: barrier before summing the partial outputs removed", "paged_attention",
     "    for (int j = 0; j < kVec; ++j) red[row][lane * kVec + j] = acc[g][j];\n    __syncthreads();\n",
     "    for (int j = 0; j < kVec; ++j) red[row][lane * kVec + j] = acc[g][j];\n", ["decode_attention"]),
    ("decode: wrong shuffle lane in the dot product", "paged_attention",
     "s += __shfl_xor_sync(0xffffffffu, s, o, kRowThreads);",
     "s += __shfl_xor_sync(0xffffffffu, s, o ^ 1, kRowThreads);", ["decode_attention"]),
    ("decode: partition one token short", "paged_attention",
     "const int end = min(context_lens[seq], begin + kPartition);",
     "const int end = min(context_lens[seq], begin + kPartition - 1);", ["decode_attention"]),
    ("prefill: off-by-one block-table index", "prefill_attention",
     "(int64_t)table[t / block_size] * block_size", "(int64_t)table[(t + 1) / block_size] * block_size",
     ["prefill_attention"]),
    ("prefill: sliding window one token wide", "prefill_attention",
     "max(0, pos - window + 1)", "max(0, pos - window)", ["prefill_attention"]),
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
