"""Prompt lookup: propose the tokens that followed the latest earlier occurrence of the sequence's last
n tokens (n from prompt_lookup_max down to prompt_lookup_min), searched over prompt and output."""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose(token_ids: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k draft tokens, [] when no earlier occurrence of a suffix is found."""
    total = len(token_ids)
    if k < 1 or total < min_n + 1:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        suffix = tokens[total - n:]
        windows = sliding_window_view(tokens[:total - 1], n)  # every earlier n-gram, the suffix itself excluded
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the latest occurrence: what followed it
            return token_ids[start:start + k]
    return []
