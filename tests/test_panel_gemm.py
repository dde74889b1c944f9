"""The panel kernel for small bfloat16 batches (ops/cpu/panel_gemm.py) against a float64 reference:
odd and even row counts (pairs of rows and a last single one), column counts that do not fill the last panel, bias,
residual and both fused prologues, serial and parallel builds."""
import numpy as np
import pytest
import torch

from scalellm.ops import torch_ops as R
from scalellm.ops.cpu import panel_gemm
from scalellm.ops.cpu.kernels import NO_PROLOGUE, NO_WEIGHT, RMS_NORM, SILU_MUL
from scalellm.ops.cpu.numba_util import as_numba

BF16 = dict(atol=3e-2, rtol=2e-2)  # one bfloat16 rounding of the output, and of the prologue's values


def test_pack_layout():
    w = torch.arange(40 * 6, dtype=torch.float32).view(40, 6).bfloat16()
    p = torch.from_numpy(panel_gemm.pack(w)).view(torch.bfloat16)  # [panels, pairs, 16 lanes x 2]
    assert p.shape == (3, 3, 32)
    assert p[1, 2, 2 * 5] == w[16 + 5, 4] and p[1, 2, 2 * 5 + 1] == w[16 + 5, 5]
    assert (p[2, :, 2 * 8:] == 0).all()  # columns past N are zero


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 16, 21, 40])
@pytest.mark.parametrize("n", [7, 48, 700])
def test_rows_and_columns(rows, n):
    torch.manual_seed(rows * 1000 + n)
    w, x = (torch.randn(n, 96) / 10).bfloat16(), torch.randn(rows, 96).bfloat16()
    bias, residual = torch.randn(n).bfloat16(), torch.randn(rows, n).bfloat16()
    ref = x.double() @ w.double().t()
    for b, res in ((None, None), (bias, residual)):
        out = torch.full((rows, n), float("nan"), dtype=torch.bfloat16)
        panel_gemm.panel_gemm(as_numba(x), panel_gemm.pack(w), np.zeros(0, np.int16) if b is None else as_numba(b),
                              np.zeros((0, 0), np.int16) if res is None else as_numba(res), as_numba(out))
        want = ref if b is None else ref + b.double() + res.double()
        torch.testing.assert_close(out.double(), want, **BF16)


@pytest.mark.parametrize("op", [NO_PROLOGUE, RMS_NORM, SILU_MUL])
@pytest.mark.parametrize("build", ["serial", "parallel"])
def test_prologues_and_builds(op, build):
    torch.manual_seed(op)
    k = 64
    x = torch.randn(3, 2 * k if op == SILU_MUL else k).bfloat16()
    w, norm = (torch.randn(40, k) / 8).bfloat16(), (1 + 0.2 * torch.randn(k)).bfloat16()
    first = {NO_PROLOGUE: lambda: x, RMS_NORM: lambda: R.rms_norm(x, norm, 1e-5), SILU_MUL: lambda: R.silu_mul(x)}[op]()
    out = torch.empty(3, 40, dtype=torch.bfloat16)
    getattr(panel_gemm.panel_gemm_kernel, build)(as_numba(x), panel_gemm.pack(w), np.zeros(0, np.int16), np.zeros((0, 0), np.int16),
                               as_numba(out), op, as_numba(norm) if op == RMS_NORM else NO_WEIGHT, np.float32(1e-5))
    torch.testing.assert_close(out.double(), first.double() @ w.double().t(), **BF16)
