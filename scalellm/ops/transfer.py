"""A step's host arrays to the device in one copy.

Every array is written into one page-locked host buffer (each at an 8-byte aligned offset), the buffer
is copied to the device once, and each array comes back as a typed view of the device copy. The host
buffer is kept and grown as needed; before it is rewritten, the last copy out of it is waited for (an
event recorded after the copy; in a normal step the tokens were read since, so it is long done, but a
step that failed between its launch and its tokens may have left one in flight).
"""
from __future__ import annotations

import numpy as np
import torch

_TORCH = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32, np.dtype(np.float32): torch.float32}


class Transfer:
    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.host = torch.empty(0, dtype=torch.uint8)
        self.copied = None  # a CUDA event after the last copy out of the host buffer

    def _buffer(self, nbytes: int) -> torch.Tensor:
        if self.copied is not None:
            self.copied.synchronize()
        if self.host.numel() < nbytes:
            size = max(nbytes, 2 * self.host.numel(), 1 << 16)
            self.host = torch.empty(size, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        return self.host

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        layout, total = [], 0
        for name, a in arrays.items():
            a = np.ascontiguousarray(a)
            layout.append((name, a, total))
            total += -(-a.nbytes // 8) * 8
        host = self._buffer(total)
        raw = host.numpy()
        for _, a, offset in layout:
            raw[offset:offset + a.nbytes] = a.reshape(-1).view(np.uint8)
        if self.device.type == "cpu":
            staged = host[:total].clone()  # the next step reuses the buffer; the views must not change
        else:
            staged = host[:total].to(self.device, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        return {name: staged[offset:offset + a.nbytes].view(_TORCH[a.dtype]).view(a.shape)
                for name, a, offset in layout}
