"""ops.apply_token_bitmask (grammar-constrained sampling) against a plain torch reference, bit for bit: the
numba kernel (scalellm/ops/cpu/bitmask.py), cuda_kernels/token_bitmask.cu through its host build, and the
same kernel on a GPU when there is one."""
import numpy as np
import pytest
import torch

from scalellm import ops
from scalellm.ops.cpu import bitmask as cpu_bitmask
from scalellm.ops.cuda import backend as cuda_backend
from scalellm.ops.cuda import host as cuda_host

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
NEG_INF = {torch.float32: 0xFF800000, torch.bfloat16: 0xFF80, torch.float16: 0xFC00}
# (vocab, logits rows, masked rows, extra mask words past ceil(vocab / 32)); 10 masked rows take the
# CPU kernel's parallel build, 3 its serial one
CASES = [(49152, 12, 3, 0), (49152, 14, 10, 0), (8003, 16, 10, 1), (8003, 5, 3, 0), (31, 4, 2, 0)]
CASE_IDS = [f"V{v}-R{r}-M{m}{'-wide' if extra else ''}" for v, r, m, extra in CASES]

_HOST_MISSING = cuda_host.available()
host = pytest.mark.skipif(_HOST_MISSING is not None, reason=_HOST_MISSING or "")
try:
    import cupy  # noqa: F401
    _GPU_MISSING = None if torch.cuda.is_available() else "no CUDA GPU here"
except ImportError:
    _GPU_MISSING = "CuPy is not installed (pip install cupy-cuda12x)"
gpu = pytest.mark.skipif(_GPU_MISSING is not None, reason=f"needs a CUDA GPU and CuPy: {_GPU_MISSING}")


def random_mask(rows: int, words: int, seed: int) -> torch.Tensor:
    """int32 [rows, words]: a mix of words with every token allowed (-1), none (0), half of them and a few
    (the shapes llguidance's masks take), bits past the vocabulary included; row 0 allows nothing at all
    and row 1 everything."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 4, size=(rows, words))
    half = rng.integers(0, 2**32, size=(rows, words), dtype=np.uint64)
    few = np.uint64(1) << rng.integers(0, 32, size=(rows, words)).astype(np.uint64)
    words_u = np.select([kind == 0, kind == 1, kind == 2], [np.uint64(0xFFFFFFFF), np.uint64(0), half], few)
    mask = words_u.astype(np.uint32).view(np.int32)
    mask[0] = 0
    if rows > 1:
        mask[1] = -1
    return torch.from_numpy(np.ascontiguousarray(mask))


def reference(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """The masked logits by plain torch, the bits unpacked with numpy (least significant first)."""
    vocab = logits.shape[1]
    bits = np.unpackbits(bitmask.numpy().astype("<i4").view(np.uint8), axis=1, bitorder="little")
    allowed = torch.from_numpy(bits[:, :vocab].astype(bool))
    out = logits.clone()
    idx = rows.long()
    out[idx] = torch.where(allowed, out[idx], torch.tensor(float("-inf"), dtype=out.dtype))
    return out


def make_case(vocab, num_rows, masked, extra, dtype, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    width = vocab + 40 if strided else vocab  # rows `width` apart: a view into wider logits
    full = (torch.randn(num_rows, width, generator=g) * 5).to(dtype)
    logits = full[:, :vocab]
    rows = torch.randperm(num_rows, generator=g)[:masked].to(torch.int32)
    bitmask = random_mask(masked, -(-vocab // 32) + extra, seed)
    return full, logits, rows, bitmask


def check(vocab, num_rows, masked, extra, dtype, device="cpu", seed=0, strided=False):
    full, logits, rows, bitmask = make_case(vocab, num_rows, masked, extra, dtype, seed, strided)
    expected_full = full.clone()
    expected_full[:, :vocab] = reference(logits, rows, bitmask)
    if device != "cpu":
        full = full.to(device)
        logits, rows, bitmask = full[:, :vocab], rows.to(device), bitmask.to(device)
    ops.apply_token_bitmask(logits, rows, bitmask)
    got = full.cpu()
    bits = BITS[dtype]
    # every element bit for bit: masked tokens hold -inf's exact pattern, everything else is untouched
    # (rows not listed, allowed tokens, the padding past the vocabulary)
    assert torch.equal(got.view(bits), expected_full.view(bits))
    masked_rows = got[rows.cpu().long(), :vocab]
    assert masked_rows.isneginf().any(), "nothing was masked"
    if masked:
        neg = masked_rows[0].view(bits)  # row 0 of the mask allows nothing
        assert (neg.to(torch.int64) & ((1 << (8 * got.element_size())) - 1)).eq(NEG_INF[dtype]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpu_kernel_matches_reference(case, dtype):
    check(*case, dtype, seed=sum(case))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_cpu_kernel_on_rows_of_wider_logits(dtype):
    check(8003, 9, 9, 0, dtype, seed=3, strided=True)


@host
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_kernel_on_host_matches_reference(case, dtype):
    with ops.cuda_kernels_on_cpu(), cuda_host.thread_order("random", seed=5):
        check(*case, dtype, seed=sum(case))


@host
def test_cuda_kernel_on_host_on_rows_of_wider_logits():
    with ops.cuda_kernels_on_cpu():
        check(8003, 9, 4, 0, torch.bfloat16, seed=3, strided=True)


@host
def test_cuda_kernel_checks_catch_a_wrong_bit_order():
    source = cuda_backend.kernel_source("token_bitmask")
    anchor = "(bits >> (t & 31)) & 1u"
    assert source.count(anchor) == 1
    with cuda_backend.patched_source("token_bitmask", source.replace(anchor, "(bits >> (31 - (t & 31))) & 1u")):
        with ops.cuda_kernels_on_cpu(), pytest.raises(AssertionError):
            check(8003, 5, 3, 0, torch.float32, seed=1)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_kernel_on_gpu_matches_reference(case, dtype):
    check(*case, dtype, device="cuda", seed=sum(case))


def test_nothing_to_mask_and_bad_arguments():
    logits = torch.randn(4, 100)
    before = logits.clone()
    ops.apply_token_bitmask(logits, torch.empty(0, dtype=torch.int32), torch.empty(0, 4, dtype=torch.int32))
    assert torch.equal(logits, before)
    rows, mask = torch.tensor([1], dtype=torch.int32), torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(ValueError):
        ops.apply_token_bitmask(logits, rows, torch.zeros(1, 3, dtype=torch.int32))  # too few words
    with pytest.raises(TypeError):
        ops.apply_token_bitmask(logits, rows.long(), mask)
    with pytest.raises(TypeError):
        ops.apply_token_bitmask(logits.double(), rows, mask)
    with pytest.raises(ValueError):
        ops.apply_token_bitmask(logits.t(), rows, torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError):
        ops.apply_token_bitmask(logits, rows, torch.zeros(2, 4, dtype=torch.int32))  # a mask row per row
    with pytest.raises(IndexError):
        ops.apply_token_bitmask(logits, torch.tensor([4], dtype=torch.int32), mask)
    assert torch.equal(logits, before)


def test_parallel_build_threshold_is_covered():
    """The cases above run both of the CPU kernel's builds."""
    masked = {m for _, _, m, _ in CASES}
    assert min(masked) < cpu_bitmask.PARALLEL_BITMASK_ROWS <= max(masked)
