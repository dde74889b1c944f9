"""Compiled kernels: where their cache lives, and a record of every compile in this process.

numba compiles a kernel for each new combination of argument types the first time it is called.
That takes seconds per kernel, so the engine calls every kernel during warm-up, before the server
reports healthy; `seal()` marks the end of warm-up, and a compile after it is logged as a warning (a
kernel the warm-up missed, which a request then waited for).

The compiled code is cached on disk in a per-user folder: SCALELLM_CACHE_DIR, else
$XDG_CACHE_HOME/scalellm, else ~/.cache/scalellm (numba's own NUMBA_CACHE_DIR still wins). Nothing is
written inside the installed package, so a read-only install works.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass

from numba.core import event

log = logging.getLogger(__name__)


def cache_root() -> str:
    """The per-user cache folder (created on first use; a temporary folder when home is read-only)."""
    root = os.environ.get("SCALELLM_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "scalellm")
    try:
        os.makedirs(root, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise PermissionError(root)
    except OSError:
        root = os.path.join(tempfile.gettempdir(), f"scalellm-cache-{os.getuid()}")
        os.makedirs(root, exist_ok=True)
    return root


@dataclass
class Compile:
    kernel: str
    signature: str
    seconds: float
    after_warm_up: bool


class _Recorder(event.Listener):
    """Listens to numba's compile events (a cache load raises none)."""

    def __init__(self):
        self.compiles: list[Compile] = []
        self.sealed = False
        self.warming = 0
        self._started = threading.local()

    def on_start(self, event) -> None:
        stack = getattr(self._started, "stack", None)
        if stack is None:
            stack = self._started.stack = []
        stack.append(time.perf_counter())

    def on_end(self, event) -> None:
        seconds = time.perf_counter() - self._started.stack.pop()
        if self._started.stack:  # a callee compiled as part of its caller: counted in the caller's time
            return
        data = event.data or {}
        dispatcher = data.get("dispatcher")
        name = getattr(getattr(dispatcher, "py_func", None), "__qualname__", str(dispatcher))
        signature = ", ".join(str(a) for a in data.get("args", ()))
        late = self.sealed and not self.warming
        self.compiles.append(Compile(name, signature, seconds, late))
        if late:
            log.warning("kernel compiled after warm-up: %s(%s) in %.1f s; a request waited for it",
                        name, signature, seconds)


_recorder = _Recorder()
_installed = False


def install() -> None:
    """Point numba's cache at the per-user folder and start recording compiles. Call before any
    kernel with cache=True is defined (scalellm.ops does)."""
    global _installed
    if _installed:
        return
    import numba

    if not os.environ.get("NUMBA_CACHE_DIR"):
        numba.config.CACHE_DIR = os.path.join(cache_root(), "numba")
    event.register("numba:compile", _recorder)
    _installed = True


def cache_dir() -> str:
    import numba

    return numba.config.CACHE_DIR or "next to the package's sources"


def compiles() -> list[Compile]:
    return list(_recorder.compiles)


def compiles_after_warm_up() -> int:
    return sum(c.after_warm_up for c in _recorder.compiles)


@contextlib.contextmanager
def warming_up():
    """Compiles inside are expected; once the first warm-up ends, a compile outside one is a miss
    worth a warning."""
    _recorder.warming += 1
    try:
        yield
    finally:
        _recorder.warming -= 1
        _recorder.sealed = True


def summary(since: int = 0) -> str:
    """One line on the compiles recorded from index `since` on."""
    done = _recorder.compiles[since:]
    if not done:
        return f"no kernel compiled (all loaded from the cache in {cache_dir()})"
    names = sorted({c.kernel for c in done})
    total = sum(c.seconds for c in done)
    return (f"compiled {len(done)} kernel build(s) in {total:.1f} s ({', '.join(names)}); "
            f"cached in {cache_dir()}")
