"""Speculative decoding on the CUDA kernels: verification chunks through the CUDA prefill attention and
sampling kernels, with steps overlapped (the default there). Run through the kernels' host build on
any machine, and with --device cuda where a GPU and CuPy are."""
import pytest

from scalellm import ops
from scalellm.ops.cuda import host as cuda_host
from tests import test_speculative as spec
from tests import test_speculative_draft as draft
from tests.checkpoints import build_checkpoint, perturbed_checkpoint
from tests.cuda_kernel_checks import engines_on_cuda, gpu, host


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """head_dim 64, a size the CUDA attention kernels are built for."""
    return build_checkpoint("llama", str(tmp_path_factory.mktemp("ckpt-llama-d64")), seed=5, hidden_size=256,
                            head_dim=64)


@pytest.fixture(scope="module")
def wide_draft(wide_llama, tmp_path_factory):
    return perturbed_checkpoint(wide_llama, str(tmp_path_factory.mktemp("ckpt-llama-d64-draft")), 0.1)


def _scenarios(folder, draft_folder):
    spec.test_every_step_verifying_matches_transformers(folder)
    draft.test_greedy_matches_transformers(folder, draft_folder)


@host
def test_speculation_on_host_built_cuda_kernels(wide_llama, wide_draft):
    before = cuda_host.launch_counts.copy()
    with ops.cuda_kernels_on_cpu(), cuda_host.thread_order("random", seed=7):
        _scenarios(wide_llama, wide_draft)
    launched = {name.split("::")[1].split("<")[0] for name in cuda_host.launch_counts - before}
    assert {"prefill_attention", "paged_attention_decode", "fused_sample"} <= launched


@gpu
def test_speculation_on_gpu(wide_llama, wide_draft, monkeypatch):
    engines_on_cuda(monkeypatch)
    _scenarios(wide_llama, wide_draft)
