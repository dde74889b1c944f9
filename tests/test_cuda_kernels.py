"""Every CUDA kernel in cuda_kernels/ against float64 references (tests/cuda_kernel_checks.py).

Without a GPU the unchanged sources run through their host build (scalellm/ops/cuda/host), once per
thread order: forward, reverse and random. With a GPU and CuPy the same checks run on the device.
The host build's own rules (barriers, warp intrinsics, deadlocks) are tested here too.
"""
import numpy as np
import pytest
import torch

from scalellm.ops.cuda import backend as cuda_backend
from scalellm.ops.cuda import host as cuda_host
from tests.cuda_kernel_checks import DTYPES, KERNEL_CHECKS, check_sampling, gpu, host, run_check

ORDERS = list(cuda_host.ORDERS)
DTYPE_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


@host
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kernel", list(KERNEL_CHECKS))
def test_kernel_on_host(kernel, dtype, order):
    with cuda_host.thread_order(order, seed=7):
        run_check(kernel, dtype)


@host
@pytest.mark.parametrize("order", ORDERS)
def test_sampling_kernel_on_host_draws_what_the_cpu_path_draws(order):
    with cuda_host.thread_order(order, seed=7):
        run_check("sampling")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kernel", list(KERNEL_CHECKS))
def test_kernel_on_gpu(kernel, dtype):
    KERNEL_CHECKS[kernel](dtype, device="cuda")


@gpu
def test_sampling_kernel_on_gpu_draws_what_the_cpu_path_draws():
    check_sampling(device="cuda")


def test_every_kernel_compiles_under_nvrtc_as_the_gpu_backend_compiles_it():
    """CuPy compiles through NVRTC, which has no C library headers: nvcc alone would not catch that."""
    from tools import nvrtc_check

    path = nvrtc_check.find_nvrtc()
    if path is None:
        pytest.skip("no libnvrtc here (.ci/run installs nvidia-cuda-nvrtc-cu12 and checks this after the tests)")
    import ctypes

    lib = ctypes.CDLL(path)
    failures = {name: log for name in cuda_backend.NAMES if (log := nvrtc_check.compile_module(lib, name, "sm_80"))}
    assert not failures, failures


# -- the host build's thread model -------------------------------------------------------------------
PROBES = r"""
__global__ void missing_barrier(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = threadIdx.x;
  out[threadIdx.x] = s[63 - threadIdx.x];  // no __syncthreads() before reading another thread's slot
}
__global__ void with_barrier(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = s[63 - threadIdx.x];
}
__global__ void early_exit_then_barrier(float* out) {
  __shared__ float s[64];
  if (threadIdx.x >= 48) return;  // exited threads count as arrived
  s[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = s[47 - threadIdx.x];
}
__global__ void divergent_barriers(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 0.f;
}
__global__ void warp_ops(float* out, int* flags) {
  const float v = threadIdx.x;
  const int lane = threadIdx.x & 31;
  out[threadIdx.x * 5 + 0] = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x * 5 + 1] = __shfl_sync(0xffffffffu, v, 3);
  out[threadIdx.x * 5 + 2] = __shfl_down_sync(0xffffffffu, v, 4, 8);
  out[threadIdx.x * 5 + 3] = __shfl_up_sync(0xffffffffu, v, 2);
  out[threadIdx.x * 5 + 4] = __shfl_xor_sync(0xffffffffu, v, 16, 16);  // earlier group readable, later not
  flags[threadIdx.x * 3 + 0] = __ballot_sync(0xffffffffu, lane % 3 == 0);
  flags[threadIdx.x * 3 + 1] = __any_sync(0xffffffffu, lane == 5);
  flags[threadIdx.x * 3 + 2] = __all_sync(0xffffffffu, lane < 31);
}
__global__ void shuffle_with_exited_lane(float* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}
__global__ void deadlock(float* out) {
  if (threadIdx.x < 16) __syncthreads();  // waits for lanes 16-31, which wait for lanes 0-15 below
  else out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}
__global__ void block_counter(int* out) {
  atomicAdd(out, 1);
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(out + 1 + blockIdx.x, *out);
}
__global__ void takes_int_and_float(float* out, int n, float x) { if (threadIdx.x < n) out[threadIdx.x] = x; }
"""
PROBE_NAMES = ["missing_barrier", "with_barrier", "early_exit_then_barrier", "divergent_barriers", "warp_ops",
               "shuffle_with_exited_lane", "deadlock", "block_counter", "takes_int_and_float"]


@pytest.fixture(scope="module")
def probes():
    return cuda_host.HostModule(code=PROBES, name_expressions=PROBE_NAMES)


def run(probes, name, *args, grid=1, block=64, order="forward"):
    with cuda_host.thread_order(order):
        probes.get_function(name)((grid,), (block,), args)


@host
def test_a_missing_barrier_shows_in_some_order_and_a_barrier_fixes_it(probes):
    want = torch.arange(63, -1, -1, dtype=torch.float32)
    results = {}
    for order in ORDERS:
        out = torch.zeros(64)
        run(probes, "missing_barrier", out, order=order)
        results[order] = torch.equal(out, want)
        out = torch.zeros(64)
        run(probes, "with_barrier", out, order=order)
        assert torch.equal(out, want), order
    assert not all(results.values()), "no thread order exposed the missing barrier"
    assert not results["forward"]  # thread 0 reads slot 63 before thread 63 wrote it: NaN


@host
def test_exited_threads_count_as_arrived(probes):
    out = torch.zeros(64)
    run(probes, "early_exit_then_barrier", out, order="reverse")
    assert out[:48].eq(1).all() and out[48:].eq(0).all()


@host
def test_divergent_barriers_exited_shuffle_lanes_and_deadlocks_are_reported(probes):
    with pytest.raises(cuda_host.KernelError, match="different barriers"):
        run(probes, "divergent_barriers", torch.zeros(64))
    with pytest.raises(cuda_host.KernelError, match="exited"):
        run(probes, "shuffle_with_exited_lane", torch.zeros(64), block=32)
    with pytest.raises(cuda_host.KernelError, match="deadlock"):
        run(probes, "deadlock", torch.zeros(64))


@host
@pytest.mark.parametrize("order", ORDERS)
def test_warp_intrinsics(probes, order):
    out, flags = torch.zeros(64 * 5), torch.zeros(64 * 3, dtype=torch.int32)
    run(probes, "warp_ops", out, flags, order=order)
    out, flags = out.view(64, 5), flags.view(64, 3)
    t = torch.arange(64)
    lane, base = t % 32, t - t % 32
    assert torch.equal(out[:, 0], (t ^ 1).float())
    assert torch.equal(out[:, 1], (base + 3).float())
    group_end = lane - lane % 8 + 8
    assert torch.equal(out[:, 2], torch.where(lane + 4 < group_end, t + 4, t).float())
    assert torch.equal(out[:, 3], torch.where(lane >= 2, t - 2, t).float())
    assert torch.equal(out[:, 4], torch.where(lane >= 16, t - 16, t).float())
    ballot = sum(1 << i for i in range(32) if i % 3 == 0)
    assert flags[:, 0].tolist() == [np.int32(np.uint32(ballot).view(np.int32))] * 64
    assert flags[:, 1].eq(1).all() and flags[:, 2].eq(0).all()


@host
@pytest.mark.parametrize("order", ORDERS)
def test_atomics_and_blocks_run_one_at_a_time(probes, order):
    out = torch.zeros(5, dtype=torch.int32)
    run(probes, "block_counter", out, grid=4, block=96, order=order)
    assert out[0] == 4 * 96
    assert sorted(out[1:].tolist()) == [96, 192, 288, 384]


@host
def test_arguments_are_checked_against_the_kernel(probes):
    out = torch.zeros(8)
    run(probes, "takes_int_and_float", out, np.int32(5), np.float32(2.5), block=8)
    assert out.tolist() == [2.5] * 5 + [0.0] * 3
    with pytest.raises(cuda_host.KernelError, match="argument 1"):
        run(probes, "takes_int_and_float", out, np.int64(5), np.float32(2.5), block=8)
    with pytest.raises(cuda_host.KernelError, match="3 arguments"):
        run(probes, "takes_int_and_float", out, np.int32(5), block=8)
    with pytest.raises(TypeError):
        run(probes, "takes_int_and_float", out, 5, np.float32(2.5), block=8)
