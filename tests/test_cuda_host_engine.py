"""The engine end to end on the CUDA kernels, run through their host build: greedy output token-identical
with transformers (float32) on three architectures, with staggered arrivals, preemption and prefix
reuse: the same scenarios the CPU path passes (tests/test_correctness.py), threads resumed in random
order. The checkpoints use head_dim 64, a size the CUDA attention kernels are built for."""
import pytest

from scalellm import ops
from scalellm.ops import cuda_host
from tests import test_correctness as scenarios
from tests.checkpoints import build_checkpoint

HOST = cuda_host.available()
pytestmark = pytest.mark.skipif(HOST is not None, reason=HOST or "")
WIDE = {arch: dict(hidden_size=256, head_dim=64) for arch in ("llama", "qwen2", "qwen3")}
KERNELS = ["rms_norm", "rotary", "kv_write", "silu_mul", "prefill_attention",
           "paged_attention_decode", "fused_sample"]


@pytest.fixture(scope="module", params=list(WIDE))
def wide_checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"ckpt-{request.param}-d64")
    return request.param, build_checkpoint(request.param, str(folder), seed=5, **WIDE[request.param])


@pytest.mark.parametrize("scenario", ["staggered_arrivals", "preemption", "prefix_reuse"])
def test_engine_on_host_built_cuda_kernels_matches_transformers(wide_checkpoint, scenario):
    test = {"staggered_arrivals": scenarios.test_staggered_arrivals_match_transformers,
            "preemption": scenarios.test_preemption_keeps_output_identical,
            "prefix_reuse": scenarios.test_prefix_reuse_keeps_output_identical}[scenario]
    before = cuda_host.launch_counts.copy()
    with ops.cuda_kernels_on_cpu(), cuda_host.thread_order("random", seed=len(scenario)):
        test(wide_checkpoint)
    launched = {name.split("::")[1].split("<")[0] for name in cuda_host.launch_counts - before}
    expected = set(KERNELS) - ({"fused_sample"} if scenario != "staggered_arrivals" else set())  # logprobs there
    assert expected <= launched, f"the engine did not run these kernels: {expected - launched}"
