"""numba's parallel kernels share torch's OpenMP runtime instead of starting a second one."""
import os
import subprocess
import sys

import pytest

from scalellm.ops.cpu import openmp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import numpy as np, torch
from scalellm import ops
from scalellm.ops.cpu import kernels as cpu_kernels
from scalellm.ops.cpu import openmp
x = np.ones((100, 8), np.float32); out = np.empty_like(x)
cpu_kernels.rms_norm_kernel.parallel(out, x, np.ones(8, np.float32), np.float32(1e-6))
torch.set_num_threads(1)
print(openmp.status)
print(len(openmp.loaded_openmp_runtimes()), torch.get_num_threads(), float(out[0, 0]))
"""


@pytest.mark.skipif(openmp.torch_libgomp() is None, reason="this torch build does not bundle its own libgomp")
def test_one_openmp_runtime_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    status, numbers = out.stdout.strip().splitlines()[-2:]
    assert status.startswith("numba shares torch's OpenMP runtime"), status
    runtimes, threads, value = numbers.split()
    assert runtimes == "1" and threads == "1" and abs(float(value) - 1.0) < 1e-5


def test_soname_reader():
    path = openmp.torch_libgomp()
    if path is None:
        pytest.skip("this torch build does not bundle its own libgomp")
    assert openmp.read_soname(path) == b"libgomp.so.1"
