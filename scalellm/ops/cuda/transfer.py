"""Host <-> device traffic of a step, each direction in one copy, and counted.

`Transfer`: a step's host arrays to the device in one copy. Every array is written into one page-locked
host buffer (each at an 8-byte aligned offset), the buffer is copied to the device once, and each array
comes back as a typed view of the device copy. The host buffer is kept and grown as needed; before it is
rewritten, the last copy out of it is waited for (an event recorded after the copy).

`StaticInputs`: the same for a fixed layout whose device buffer never moves (what a CUDA graph reads):
the host writes numpy views, one copy updates the device views in place. Two host buffers alternate,
so a step can be written while the previous step's copy may still be queued.

`Readback`: device tensors (the sampled ids, logprobs) to page-locked host memory with an event; the
host waits for the event only when it reads them.

`counters` counts copies each way and the host's waits on the device (tests hold step budgets on them).
"""
from __future__ import annotations

import collections

import numpy as np
import torch

_TORCH = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32, np.dtype(np.float32): torch.float32}
_NUMPY = {v: k for k, v in _TORCH.items()}
counters: collections.Counter = collections.Counter()  # "h2d", "d2h", "read", "wait": in this process


def _pinned(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")


class HostEvent:
    """A CPU step's event: the work is done when the call returns; waiting on it is counted as on a GPU."""

    @staticmethod
    def query() -> bool:
        return True

    @staticmethod
    def synchronize() -> None:
        pass


def _record(device: torch.device):
    if device.type != "cuda":
        return HostEvent
    event = torch.cuda.Event()
    event.record()
    return event


def wait(event) -> None:
    """The host waits for the device up to `event` (None: nothing was recorded)."""
    if event is not None:
        counters["wait"] += 1
        event.synchronize()


class Transfer:
    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.host = torch.empty(0, dtype=torch.uint8)
        self.raw = self.host.numpy()
        self.copied = None  # a CUDA event after the last copy out of the host buffer

    def _buffer(self, nbytes: int) -> torch.Tensor:
        if self.copied is not None and not self.copied.query():
            wait(self.copied)
        if self.host.numel() < nbytes:
            self.host = _pinned(max(nbytes, 2 * self.host.numel(), 1 << 16), self.device)
            self.raw = self.host.numpy()
        return self.host

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        layout, total = [], 0
        for name, a in arrays.items():
            a = np.ascontiguousarray(a)
            layout.append((name, a, total))
            total += -(-a.nbytes // 8) * 8
        host = self._buffer(total)
        raw = self.raw
        for _, a, offset in layout:
            raw[offset:offset + a.nbytes] = a.reshape(-1).view(np.uint8)
        counters["h2d"] += 1
        if self.device.type == "cpu":
            staged = host[:total].clone()  # the next step reuses the buffer; the views must not change
        else:
            staged = host[:total].to(self.device, non_blocking=True)
            self.copied = _record(self.device)
        return {name: staged[offset:offset + a.nbytes].view(_TORCH[a.dtype]).view(a.shape)
                for name, a, offset in layout}


class StaticInputs:
    """Named arrays at fixed places of one device buffer; fields: name -> (torch dtype, shape)."""

    def __init__(self, fields: dict[str, tuple[torch.dtype, tuple[int, ...]]], device: torch.device):
        self.device = device
        self.offsets, total = {}, 0
        for name, (dtype, shape) in fields.items():
            nbytes = int(np.prod(shape)) * dtype.itemsize
            self.offsets[name] = (total, nbytes, dtype, shape)
            total += -(-nbytes // 16) * 16
        self.nbytes = total
        self.buffer = torch.zeros(total, dtype=torch.uint8, device=device)
        self.device_views = self._views(self.buffer)
        self.hosts = [_pinned(total, device) for _ in range(2)]
        self.host_views = [{k: v.numpy() for k, v in self._views(h).items()} for h in self.hosts]
        self.events = [None, None]
        self.turn = 0

    def _views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: buffer[o:o + n].view(dtype).view(shape) for name, (o, n, dtype, shape) in self.offsets.items()}

    def host(self) -> dict[str, np.ndarray]:
        """The next host buffer's views, to write this step's inputs into (its last copy is done)."""
        self.turn ^= 1
        if self.events[self.turn] is not None and not self.events[self.turn].query():
            wait(self.events[self.turn])
        return self.host_views[self.turn]

    def copy(self, nbytes: int | None = None) -> None:
        """One copy of the host buffer just written (its first nbytes) into the device buffer."""
        n = self.nbytes if nbytes is None else nbytes
        counters["h2d"] += 1
        self.buffer[:n].copy_(self.hosts[self.turn][:n], non_blocking=True)
        self.events[self.turn] = _record(self.device)


class Readback:
    """Device tensors copied to page-locked host memory as soon as they are computed; read later."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self, tensors: list[torch.Tensor]) -> tuple:
        """Queue the copies now (nothing waits); -> a handle for read()."""
        for _ in tensors:
            counters["d2h"] += 1
        if self.device.type != "cuda":
            return [t.detach().numpy().copy() for t in tensors], HostEvent  # the next step may reuse them
        hosts = []
        for t in tensors:
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            hosts.append(h)
        return hosts, _record(self.device)

    @staticmethod
    def read(handle: tuple) -> list[np.ndarray]:
        """The tensors' values on the host (waits for the copies, the first time, on a GPU)."""
        hosts, event = handle
        counters["read"] += 1
        wait(event)
        return [h if isinstance(h, np.ndarray) else h.numpy() for h in hosts]
