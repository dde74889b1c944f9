"""The batch's token masks: one row of int32 words per constrained sequence, bit t set where token t
may come next, filled by llguidance's thread pool with the GIL released."""
from __future__ import annotations

import os

import llguidance
import llguidance.numpy
import numpy as np


class BatchMasker:
    def __init__(self, vocab_size: int, num_threads: int | None = None):
        self.words = (vocab_size + 31) // 32
        threads = num_threads or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
        self.executor = llguidance.LLExecutor(threads)
        self._buffer = np.empty((0, self.words), np.int32)

    def fill(self, matchers: list[llguidance.LLMatcher]) -> np.ndarray:
        """[len(matchers), words] int32 masks (a view of a reused buffer: valid until the next fill)."""
        n = len(matchers)
        if self._buffer.shape[0] < n:
            self._buffer = np.empty((max(n, 2 * self._buffer.shape[0]), self.words), np.int32)
        out = self._buffer[:n]
        if n == 1:
            llguidance.numpy.fill_next_token_bitmask(matchers[0], out, 0)
        else:
            llguidance.numpy.fill_next_token_bitmask_par(self.executor, list(zip(matchers, range(n))), out)
        return out


def token_mask(token_ids, vocab_size: int) -> np.ndarray:
    """One mask row allowing exactly these tokens (ids outside the vocabulary are dropped)."""
    words = np.zeros((vocab_size + 31) // 32, np.uint32)
    ids = np.asarray([t for t in token_ids if 0 <= t < vocab_size], np.int64)
    np.bitwise_or.at(words, ids >> 5, (np.uint32(1) << (ids & 31).astype(np.uint32)))
    return words.view(np.int32)
