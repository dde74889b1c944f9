"""What one engine step costs a device, counted on the CUDA kernels' host build (no GPU needed).

`count_steps()` records, in order, every kernel launch (the host build's launch counter), every torch op
(a TorchDispatchMode), whether each ran inside what a GPU replays from a CUDA graph (a decode graph's
step, a piece of a piecewise graph: "replay"), the step's copies (ops/cuda/transfer.py: "h2d" host to device, "d2h" device to host),
the host's reads of sampled ids ("read") and its waits on the device ("wait"), and every host sync a GPU
would make: an op that reads a device value on the host (item(), bool(), nonzero, ...) or a tensor read
with tolist()/numpy() while a step is between its input copy and its sampled-id copy.

On a GPU the same step costs: one launch per replay, one per kernel launch or compute op outside graphs
(views launch nothing), one cudaMemcpyAsync per h2d/d2h, and a stall of the host per sync; graph_nodes
counts what the replays run.
"""
from __future__ import annotations

import collections
import contextlib
import sys
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scalellm.engine.cuda_graphs import DecodeGraphs
from scalellm.engine.piecewise_graphs import PiecewiseGraphs
from scalellm.ops.cuda import host as cuda_host
from scalellm.ops.cuda import transfer

VIEWS = {"view", "_unsafe_view", "reshape", "split", "split_with_sizes", "slice", "select", "as_strided", "t",
         "transpose", "permute", "expand", "unsqueeze", "squeeze", "alias", "detach", "unbind", "narrow",
         "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "_reshape_alias", "to", "detach_",
         "resolve_conj", "resolve_neg"}  # no kernel on a GPU ("to" a dtype the tensor has; a real cast is _to_copy)
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique", "_unique2",
           "unique_consecutive", "repeat_interleave", "item"}


class _Log(collections.Counter):
    """A Counter that also appends each increment to the steps' events (the copies open and close the
    window between a step's input copy and its sampled-id copy)."""

    def __init__(self, steps: "Steps", kind: str | None = None):
        super().__init__()
        self.steps, self.kind = steps, kind

    def __setitem__(self, key, value):
        if value > self.get(key, 0):
            self.steps.events.append(key if self.kind is None else (self.kind, key, self.steps.in_graph))
            if self.kind is None and key in ("h2d", "d2h"):
                self.steps.in_window = key == "h2d"
        super().__setitem__(key, value)


@dataclass
class Steps:
    # "h2d", "d2h", "read", "wait", "replay", ("launch", kernel, in a graph), ("op", aten op, in a graph),
    # ("sync", what, inside the window)
    events: list = field(default_factory=list)
    in_window: bool = False
    in_graph: bool = False  # inside what a GPU replays from a CUDA graph (run eagerly here)

    def count(self, kind: str) -> int:
        return sum(1 for e in self.events if e == kind or (isinstance(e, tuple) and e[0] == kind))

    def _kernels(self, in_graph: bool) -> list:
        """Launches of the kernels and torch ops that run one on a GPU (views and allocations do not)."""
        return [e for e in self.events if isinstance(e, tuple) and e[0] in ("launch", "op") and e[2] == in_graph
                and not (e[0] == "op" and e[1] in VIEWS)]

    @property
    def launches(self) -> int:
        """Device launches outside graphs: kernels and torch ops."""
        return len(self._kernels(False))

    @property
    def graph_nodes(self) -> int:
        """Kernels and torch ops inside graphs (each a node a replay runs)."""
        return len(self._kernels(True))

    @property
    def syncs(self) -> list:
        """Host syncs: ops that read a device value anywhere, and tensor reads inside a step's window."""
        return [e for e in self.events if isinstance(e, tuple) and e[0] == "sync"]

    def window_waits(self) -> int:
        """Host waits on the device between an input copy and the next sampled-id copy."""
        n, inside = 0, False
        for e in self.events:
            if e in ("h2d", "d2h"):
                inside = e == "h2d"
            elif e == "wait" and inside:
                n += 1
        return n

    def summary(self) -> dict:
        return {"replays": self.count("replay"), "launches": self.launches, "graph_nodes": self.graph_nodes,
                "h2d": self.count("h2d"), "d2h": self.count("d2h"), "syncs": len(self.syncs) + self.window_waits()}


class _Ops(TorchDispatchMode):
    def __init__(self, steps: Steps):
        super().__init__()
        self.steps = steps

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.steps.events.append(("op", name, self.steps.in_graph))
        if name in SYNCING:
            self.steps.events.append(("sync", name, self.steps.in_window))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_steps():
    """Count everything the engine does inside the block (run it inside ops.cuda_kernels_on_cpu())."""
    steps = Steps()
    saved = transfer.counters, cuda_host.launch_counts
    transfer.counters = _Log(steps)
    cuda_host.launch_counts = _Log(steps, "launch")
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "item")}

    def reading(name):
        original = originals[name]

        def read(self, *a, **k):
            # as_numba: a CPU kernel's view of its input, on a path only CPU tensors take (not a device read)
            if steps.in_window and sys._getframe(1).f_code.co_name != "as_numba":
                steps.events.append(("sync", name, True))
            return original(self, *a, **k)
        return read

    def replaying(original):
        def replay(self, *a, **k):
            steps.events.append("replay")
            steps.in_graph = True
            try:
                return original(self, *a, **k)
            finally:
                steps.in_graph = False
        return replay

    graphed = [(DecodeGraphs, "_step"), (PiecewiseGraphs, "_replay")]
    saved_graphed = [getattr(cls, name) for cls, name in graphed]
    try:
        for cls, name in graphed:
            setattr(cls, name, replaying(getattr(cls, name)))
        for name in originals:
            setattr(torch.Tensor, name, reading(name))
        with _Ops(steps):
            yield steps
    finally:
        for (cls, name), f in zip(graphed, saved_graphed):
            setattr(cls, name, f)
        for name, f in originals.items():
            setattr(torch.Tensor, name, f)
        transfer.counters, cuda_host.launch_counts = saved
