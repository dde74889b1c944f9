"""How many threads the model step computes on, set for torch and numba together."""
from __future__ import annotations

import torch


def default_compute_threads(model) -> int:
    """One thread per core: once the kernels share one OpenMP runtime, leaving a core to the event loop
    is slower for every model size (the loop's work fits between the steps' parallel regions)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_compute_threads(n: int) -> None:
    import numba

    # numba first: starting its OpenMP pool resets the calling thread's OpenMP thread count
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(n)
