"""numba twin of cuda_kernels/token_bitmask.cu: a grammar's token bitmask applied to logits in place.

The logits are never converted: their storage is viewed as integers of the element's width (int32 for
float32, int16 for bfloat16 and float16) and -inf is written as its bit pattern, so one build per width
serves every dtype of that width. Each 32-token word of the mask takes one of three paths: all ones
(the token is allowed: nothing to do, the common case of a permissive grammar), all zeros (32 stores of
-inf, the common case of a strict one), or mixed (a select per token, which vectorizes).
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

# The element's bits as a signed integer, and -inf's bit pattern in that integer type.
NEG_INF_BITS = {torch.float32: (torch.int32, np.int32(np.uint32(0xFF800000).view(np.int32))),
                torch.bfloat16: (torch.int16, np.int16(np.uint16(0xFF80).view(np.int16))),
                torch.float16: (torch.int16, np.int16(np.uint16(0xFC00).view(np.int16)))}
PARALLEL_BITMASK_ROWS = 8  # masked rows from which the parallel build runs


@njit(inline="always", nogil=True)
def _select(flat, at, bits, n, neg_inf):
    """flat[at + j] = -inf for each j < n whose bit in bits is 0 (least significant first)."""
    for j in range(n):
        k = at + np.uint64(j)
        flat[k] = flat[k] if (bits >> np.uint32(j)) & np.uint32(1) else neg_inf


def _make_apply(bits_name: str, parallel: bool):
    def apply_rows(flat, num_rows, row_stride, vocab, rows, bitmask, neg_inf):
        """flat: the logits' elements as integers, row r (< num_rows) at r * row_stride; rows: int32 [M];
        bitmask: int32 [M, W]; neg_inf: -inf's bits in flat's type. Returns how many rows were out of
        range (and skipped). Indices into flat are unsigned where a loop should vectorize (a signed index
        costs a negative-index check per element, which stops it)."""
        full, tail = vocab >> 5, vocab & 31
        bad = 0
        for i in prange(rows.shape[0]):
            if rows[i] < 0 or rows[i] >= num_rows:
                bad += 1
                continue
            start = np.int64(rows[i]) * row_stride
            mask = bitmask[i]
            for w in range(full):
                bits = mask[w]
                if bits == -1:  # every token allowed
                    continue
                at = start + w * 32
                if bits == 0:  # none allowed
                    flat[at:at + 32] = neg_inf
                else:
                    _select(flat, np.uint64(at), np.uint32(bits), 32, neg_inf)
            if tail:
                _select(flat, np.uint64(start + full * 32), np.uint32(bitmask[i, full]), tail, neg_inf)
        return bad
    name = f"apply_token_bitmask_{bits_name}{'_parallel' if parallel else ''}"
    apply_rows.__name__ = apply_rows.__qualname__ = name
    return njit(parallel=parallel, nogil=True, cache=True)(apply_rows)


_KERNELS = {(bits, parallel): _make_apply(name, parallel)
            for bits, name in ((torch.int32, "int32"), (torch.int16, "int16")) for parallel in (False, True)}


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: logits[rows[i], t] = -inf wherever bit t % 32 of bitmask[i, t // 32] is 0 (see
    scalellm.ops.apply_token_bitmask)."""
    count, (num_rows, vocab) = rows.shape[0], logits.shape
    if count == 0 or vocab == 0:
        return
    if num_rows == 0:
        raise IndexError("apply_token_bitmask: row indices into logits without rows")
    bits_type, neg_inf = NEG_INF_BITS[logits.dtype]
    row_stride = logits.stride(0)
    # every element from the first row's to the last one's, as one flat array of the element's bits
    span = (num_rows - 1) * row_stride + vocab
    flat = logits.view(bits_type).as_strided((span,), (1,)).numpy()
    kernel = _KERNELS[bits_type, count >= PARALLEL_BITMASK_ROWS]
    bad = kernel(flat, np.int64(num_rows), np.int64(row_stride), np.int64(vocab), rows.contiguous().numpy(),
                 bitmask.contiguous().numpy(), neg_inf)
    if bad:
        raise IndexError(f"apply_token_bitmask: {bad} row index(es) outside [0, {num_rows}) (those rows skipped)")
