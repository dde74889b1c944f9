"""numba twin of cuda_kernels/sampling.cu: one parallel task per row, the same semantics and the same
counter-based random numbers. Thresholds are exact here (partition and sort) where the CUDA kernel
bisects."""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from scalellm.ops.cpu.numba_util import exp_f32
from scalellm.ops.sampling_batch import SamplingBatch


@njit(inline="always")
def _mix64(x):
    x ^= x >> np.uint64(31)
    x *= np.uint64(0x7FB5D329728EA185)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x81DADEF4BC2DD44D)
    x ^= x >> np.uint64(33)
    return x


@njit(inline="always")
def _stream_key(seed, index, position):
    """stream_keys (ops/sampling_batch.py) for one row, as the CUDA kernel computes it."""
    x = (seed * np.uint64(0x9E3779B97F4A7C15) + np.uint64(index) * np.uint64(0xBF58476D1CE4E5B9)
         + np.uint64(position) * np.uint64(0x94D049BB133111EB))
    x ^= x >> np.uint64(31)
    return x * np.uint64(0xD6E8FEB86659FD93)


@njit(inline="always")
def _uniform(stream, token):
    h = _mix64(stream ^ _mix64(np.uint64(token) + np.uint64(0x9E3779B97F4A7C15)))
    return (np.float32(h >> np.uint64(40)) + np.float32(1.0)) * np.float32(1.0 / 16777216.0)


@njit(parallel=True, nogil=True, cache=True)
def _sample(logits, temperature, top_k, top_p, min_p, presence, frequency, repetition, pen_offsets, pen_tokens,
            pen_counts, ban_offsets, ban_tokens, seeds, indices, positions, num_top, out_tokens, out_logprob, top_ids,
            top_lp):
    rows, vocab = logits.shape
    for r in prange(rows):
        x = logits[r]
        plain = pen_offsets[r] == pen_offsets[r + 1] and ban_offsets[r] == ban_offsets[r + 1]
        if temperature[r] == 0.0 and plain:  # plain greedy: no copy, no scaling
            chosen = np.argmax(x)
            out_tokens[r] = chosen
            if num_top[r] >= 0:
                _logprobs(x, chosen, num_top[r], r, out_logprob, top_ids, top_lp)
            continue
        w = x.copy()
        for j in range(pen_offsets[r], pen_offsets[r + 1]):
            t, c = pen_tokens[j], pen_counts[j]
            v = w[t]
            if repetition[r] != 1.0:
                v = v / repetition[r] if v > 0 else v * repetition[r]
            if c > 0:
                v -= frequency[r] * c + presence[r]
            w[t] = v
        for j in range(ban_offsets[r], ban_offsets[r + 1]):
            w[ban_tokens[j]] = -np.inf
        if temperature[r] == 0.0:
            chosen = np.argmax(w)
        else:
            w *= np.float32(1.0 / temperature[r])
            mx = w.max()
            cut = mx + np.log(min_p[r]) if min_p[r] > 0 else -np.inf
            if 0 < top_k[r] < vocab:
                cut = max(cut, np.partition(w, vocab - top_k[r])[vocab - top_k[r]])
            if top_p[r] < 1.0:
                kept = np.sort(w[w >= cut])[::-1]
                probs = np.exp(kept - mx)
                target = top_p[r] * probs.sum()
                acc = 0.0
                for j in range(kept.shape[0]):  # smallest prefix whose mass reaches top_p
                    acc += probs[j]
                    if acc >= target:
                        cut = max(cut, kept[j])
                        break
            best, chosen = -np.inf, 0
            stream = _stream_key(np.uint64(seeds[r]), indices[r], positions[r])
            for i in range(vocab):
                v = w[i]
                if v >= cut and v > -np.inf:
                    key = v - np.log(-np.log(_uniform(stream, i)))
                    if key > best:
                        best, chosen = key, i
        out_tokens[r] = chosen
        if num_top[r] >= 0:
            _logprobs(x, chosen, num_top[r], r, out_logprob, top_ids, top_lp)


@njit(nogil=True, cache=True)
def _logprobs(x, chosen, num_top, r, out_logprob, top_ids, top_lp):
    """Logprob of the chosen token and the num_top largest, from the raw logits."""
    vocab = x.shape[0]
    raw_max = x.max()
    raw_log_z = raw_max + np.log(np.exp(x - raw_max).sum())
    out_logprob[r] = x[chosen] - raw_log_z
    n = min(num_top, top_ids.shape[1])
    if n > 0:
        # the n largest (argpartition), then ordered by value and, on ties, index (as on the GPU)
        order = np.argpartition(-x, n - 1)[:n] if n < vocab else np.arange(vocab)
        for a in range(1, n):  # insertion sort: value descending, index ascending on ties
            j, item = a, order[a]
            while j > 0 and (x[order[j - 1]] < x[item] or (x[order[j - 1]] == x[item] and order[j - 1] > item)):
                order[j] = order[j - 1]
                j -= 1
            order[j] = item
        for j in range(n):
            top_ids[r, j] = order[j]
            top_lp[r, j] = x[order[j]] - raw_log_z


def fused_sample(logits: torch.Tensor, batch: SamplingBatch, max_top: int = 1):
    """logits: [rows, vocab] float32 -> (tokens int64, chosen logprobs, top ids [rows, max_top], top logprobs);
    max_top: the most top-N logprobs a row wants."""
    rows = logits.shape[0]
    max_top = max(1, max_top)
    tokens = torch.empty(rows, dtype=torch.int64)
    chosen = torch.empty(rows, dtype=torch.float32)
    top_ids = torch.zeros(rows, max_top, dtype=torch.int64)
    top_lp = torch.zeros(rows, max_top, dtype=torch.float32)
    b = batch
    _sample(logits.contiguous().numpy(), b.temperature.numpy(), b.top_k.numpy(), b.top_p.numpy(), b.min_p.numpy(),
        b.presence.numpy(), b.frequency.numpy(), b.repetition.numpy(), b.pen_offsets.numpy(),
        b.pen_tokens.numpy(), b.pen_counts.numpy(), b.ban_offsets.numpy(), b.ban_tokens.numpy(),
        b.seeds.numpy().view(np.uint64), b.indices.numpy(), b.positions.numpy(), b.num_top.numpy(), tokens.numpy(), chosen.numpy(), top_ids.numpy(),
        top_lp.numpy())
    return tokens, chosen, top_ids, top_lp


# Greedy rows: the index of each row's largest logit, first of equals (torch.argmax's answer), read
# straight from the logits' bits. A float's bits, as a signed integer with the magnitude of negatives
# complemented, order like the float (and -0.0 meets +0.0), so the maximum and the search for its first
# place are integer loops that vectorize, and bfloat16 logits need no float32 copy (which torch's float() and
# argmax would make). A row holding a NaN (its key beyond
# infinity's on either side) is flagged; the caller answers it with torch.


@njit(inline="always")
def _order_key(bits, sign_shift, magnitude):
    neg = bits >> sign_shift  # -1 for negatives, 0 otherwise
    return (bits ^ (neg & magnitude)) - neg


def _make_argmax(int_type: str, sign_shift: int, magnitude: int, inf_key: int, parallel: bool):
    shift, mask, inf = np.int32(sign_shift), np.int32(magnitude), np.int32(inf_key)

    def argmax_rows(bits, out, has_nan):
        rows, n = bits.shape
        for r in prange(rows):
            top, low = np.int32(-inf - 1), np.int32(inf + 1)
            for j in range(n):
                key = np.int32(_order_key(np.int32(bits[r, j]), shift, mask))
                top, low = max(top, key), min(low, key)
            first = np.int32(n)
            for j in range(n):
                key = np.int32(_order_key(np.int32(bits[r, j]), shift, mask))
                first = min(first, np.int32(j) if key == top else np.int32(n))
            out[r] = first
            has_nan[r] = top > inf or low < -inf
    argmax_rows.__name__ = argmax_rows.__qualname__ = f"argmax_rows_{int_type}{'_parallel' if parallel else ''}"
    return njit(parallel=parallel, nogil=True, cache=True)(argmax_rows)


_ARGMAX_LAYOUTS = {torch.bfloat16: (torch.int16, "int16", 15, 0x7FFF, 0x7F80),
                   torch.float32: (torch.int32, "int32", 31, 0x7FFFFFFF, 0x7F800000)}
_ARGMAX = {(dtype, parallel): (bits, _make_argmax(*layout, parallel))
           for dtype, (bits, *layout) in _ARGMAX_LAYOUTS.items() for parallel in (False, True)}
PARALLEL_ARGMAX_ROWS = 4  # rows from which the parallel build runs


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits: [rows, vocab] (bfloat16 or float32; others go through torch) -> int64 [rows], each row's
    argmax, ties to the first index as torch.argmax (and a row with a NaN as torch answers it)."""
    entry = _ARGMAX.get((logits.dtype, logits.shape[0] >= PARALLEL_ARGMAX_ROWS))
    if entry is None or logits.dim() != 2:
        return logits.float().argmax(-1)
    bits_type, kernel = entry
    logits = logits.contiguous()
    tokens = torch.empty(logits.shape[0], dtype=torch.int64)
    has_nan = np.empty(logits.shape[0], np.bool_)
    kernel(logits.view(bits_type).numpy(), tokens.numpy(), has_nan)
    if has_nan.any():
        rows = torch.from_numpy(np.flatnonzero(has_nan))
        tokens[rows] = logits[rows].float().argmax(-1)
    return tokens


@njit(parallel=True, nogil=True, cache=True, fastmath={"contract", "nsz", "arcp", "reassoc"})
def _token_logprobs(logits, targets, chosen, ranks):
    """Per row: the target's log-probability and rank (1 + how many logits exceed its own), in two passes
    over the row and without writing the log-softmax out. reassoc lets the sum of exponentials run in
    vector lanes: 16 partial sums, more accurate than one float32 running sum over a vocabulary (that
    one was off by up to 1e-4 over 49k terms; this one by 2e-6, torch's log_softmax by 6e-6)."""
    rows, vocab = logits.shape
    for i in prange(rows):
        row = logits[i]
        target = row[targets[i]]
        m = row[0]
        above = 0
        for j in range(vocab):
            m = max(m, row[j])
            above += row[j] > target
        total = np.float32(0.0)
        for j in range(vocab):
            total += exp_f32(row[j] - m)
        chosen[i] = target - m - np.log(total)
        ranks[i] = above + 1


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits float32 [rows, vocab], targets [rows] -> (the targets' logprobs [rows], their ranks [rows])."""
    chosen = torch.empty(logits.shape[0], dtype=torch.float32)
    ranks = torch.empty(logits.shape[0], dtype=torch.int32)
    _token_logprobs(logits.contiguous().numpy(), targets.numpy(), chosen.numpy(), ranks.numpy())
    return chosen, ranks
