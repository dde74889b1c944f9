"""The engine end to end on the CUDA kernels, run through their host build: greedy output token-identical
with transformers (float32) on three architectures, with staggered arrivals, preemption and prefix
reuse: the same scenarios the CPU path passes (tests/test_correctness.py), threads resumed in random
order. The checkpoints use head_dim 64, a size the CUDA attention kernels are built for. Decode steps
take the CUDA-graph path's static buffers and padding (run eagerly without a GPU).

With a GPU and CuPy, the same scenarios run with --device cuda (weights, KV cache and kernels on the
GPU, decode steps replayed from captured CUDA graphs)."""
import pytest

from scalellm import ops
from scalellm.config import EngineConfig
from scalellm.engine.cuda_graphs import DecodeGraphs, batch_sizes
from scalellm.ops.cuda import host as cuda_host
from tests import test_correctness as scenarios
from tests.checkpoints import build_checkpoint
from tests.cuda_kernel_checks import HAS_GPU, engines_on_cuda, gpu, host
WIDE = {arch: dict(hidden_size=256, head_dim=64) for arch in ("llama", "qwen2", "qwen3")}
KERNELS = ["rms_norm", "qkv_prep", "silu_mul", "prefill_attention", "paged_attention_decode",
           "fused_sample"]
SCENARIOS = {"staggered_arrivals": scenarios.test_staggered_arrivals_match_transformers,
             "preemption": scenarios.test_preemption_keeps_output_identical,
             "prefix_reuse": scenarios.test_prefix_reuse_keeps_output_identical}


@pytest.fixture(scope="module", params=list(WIDE))
def wide_checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"ckpt-{request.param}-d64")
    return request.param, build_checkpoint(request.param, str(folder), seed=5, **WIDE[request.param])


@host
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_engine_on_host_built_cuda_kernels_matches_transformers(wide_checkpoint, scenario, monkeypatch):
    decode_batches = []
    replay = DecodeGraphs.run
    monkeypatch.setattr(DecodeGraphs, "run", lambda self, mode, arrays, *a: (
        decode_batches.append(arrays["ids"].shape[0]), replay(self, mode, arrays, *a))[1])
    before = cuda_host.launch_counts.copy()
    with ops.cuda_kernels_on_cpu(), cuda_host.thread_order("random", seed=len(scenario)):
        SCENARIOS[scenario](wide_checkpoint)
    launched = {name.split("::")[1].split("<")[0] for name in cuda_host.launch_counts - before}
    expected = set(KERNELS) - ({"fused_sample"} if scenario != "staggered_arrivals" else set())  # logprobs there
    assert expected <= launched, f"the engine did not run these kernels: {expected - launched}"
    assert any(n not in batch_sizes(64) for n in decode_batches), "no decode step took the padded graph path"


@host
def test_moe_engine_on_host_built_cuda_kernels_matches_transformers(tmp_path):
    """Qwen2-MoE (shared expert) with routing, permutation, gather and combine as CUDA kernels."""
    folder = build_checkpoint("qwen2_moe", str(tmp_path / "moe"), seed=5, hidden_size=256, head_dim=64)
    before = cuda_host.launch_counts.copy()
    with ops.cuda_kernels_on_cpu(), cuda_host.thread_order("random", seed=3):
        scenarios.test_preemption_keeps_output_identical(("qwen2_moe", folder))
    launched = {name.split("::")[1].split("<")[0] for name in cuda_host.launch_counts - before}
    assert {"moe_route", "moe_offsets", "moe_permute", "moe_gather", "moe_combine"} <= launched


@gpu
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_engine_on_gpu_matches_transformers(wide_checkpoint, scenario, monkeypatch):
    engines_on_cuda(monkeypatch)
    SCENARIOS[scenario](wide_checkpoint)


def test_device_cuda_without_a_gpu_says_what_is_missing():
    if HAS_GPU:
        pytest.skip("a GPU and CuPy are here")
    with pytest.raises(ValueError, match="torch.cuda.is_available|CuPy"):
        EngineConfig(device="cuda")
