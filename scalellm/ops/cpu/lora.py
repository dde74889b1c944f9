"""LoRA's added term as one numba kernel per projection (Punica's BGMV on the CPU): each token's input
times its own slot's A (the shrink), then that times its slot's B added to the token's output row (the
expand), in float32 and rounded once into the output. One call per projection, and only the token's own
adapter computed, where the torch form takes three ops and computes every slot for every token."""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from scalellm.ops.cpu.kernels import twin
from scalellm.ops.cpu.numba_util import load, store


@twin
def _bgmv(y, x, a, b, token_slots, workers):
    """y [T, out] += (x [T, in] @ a[s]^T) @ b[s] with s = token_slots[t] (-1: nothing);
    a [slots, R, in], b [slots, R, out]: both read along their rows, so the loops vectorize. The
    tokens are dealt to the threads, each doing its tokens' shrink and expand: one parallel region."""
    tokens, rank, k = x.shape[0], a.shape[1], a.shape[2]
    out = b.shape[2]
    for w in prange(workers):
        xa = np.empty(rank, np.float32)
        acc = np.empty(out, np.float32)
        for t in range(w, tokens, workers):
            s = token_slots[t]
            if s < 0:
                continue
            x_row = x[t]
            for r in range(rank):
                a_row = a[s, r]
                total = np.float32(0.0)
                for j in range(k):
                    total += load(x_row[j]) * load(a_row[j])
                xa[r] = total
            y_row = y[t]  # whole rows: indices from range() let LLVM vectorize (no wrap-around checks)
            for o in range(out):
                acc[o] = load(y_row[o])
            for r in range(rank):
                v = xa[r]
                b_row = b[s, r]
                for o in range(out):
                    acc[o] += v * load(b_row[o])
            for o in range(out):
                store(y_row, o, acc[o])


def bgmv(y: np.ndarray, x: np.ndarray, a: np.ndarray, b: np.ndarray, token_slots: np.ndarray) -> None:
    """numba-ready arrays (as_numba views); y is added to in place. One token: the serial build."""
    tokens = x.shape[0]
    if tokens == 1:
        _bgmv.serial(y, x, a, b, token_slots, 1)
    else:
        _bgmv.parallel(y, x, a, b, token_slots, min(tokens, numba.get_num_threads()))
