"""Run the CUDA kernels in cuda_kernels/*.cu on the CPU, unchanged: how they are tested without a GPU.

`HostModule` has the call shape of `cupy.RawModule`: it compiles a kernel source with g++ against
simt.h (CUDA's thread model for one CPU thread: a fiber per CUDA thread, counted barriers, warp
intrinsics as meeting points, per-block shared memory; see the header), caches the shared library by
a hash of everything it was built from, and `get_function(name)(grid, block, args, shared_mem=0)`
runs the kernel on host memory: CPU tensors stand where device pointers go, numpy scalars where
values go (their sizes are checked against the kernel's parameters).

Threads of a block are resumed in the current thread order (`thread_order`): forward, reverse or
random (blocks too). A kernel that is missing a barrier gives a different result in some order; a
kernel error (deadlock, threads at different barriers, a shuffle reading an exited lane, more shared
memory than a block gets) raises `KernelError`.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ORDERS = {"forward": 0, "reverse": 1, "random": 2}
# -fno-gnu-unique: each library keeps its own runtime state (g++ would otherwise share the inline
# `simt::rt` across every library loaded in the process)
FLAGS = ("-std=c++17", "-O2", "-shared", "-fPIC", "-fno-strict-aliasing", "-fno-gnu-unique", "-U_FORTIFY_SOURCE",
         "-D_FORTIFY_SOURCE=0", "-w")


class KernelError(RuntimeError):
    """A kernel did something a GPU would not run correctly (deadlock, divergent barrier, ...)."""


class HostBuildUnavailable(RuntimeError):
    pass


_order = ("forward", 0)  # process-wide: the engine launches kernels from its own thread
_launches = 0
_launch_lock = threading.Lock()  # one launch at a time in the process: fibers switch stacks under one thread
launch_counts: collections.Counter = collections.Counter()  # kernel name -> launches in this process


@contextlib.contextmanager
def thread_order(name: str, seed: int = 0):
    """Resume threads (and blocks) in this order for kernels launched inside the block."""
    if name not in ORDERS:
        raise ValueError(f"thread order must be one of {sorted(ORDERS)}")
    global _order
    previous, _order = _order, (name, seed)
    try:
        yield
    finally:
        _order = previous


def current_order() -> tuple[str, int]:
    return _order


@functools.cache
def cuda_include_dir() -> str:
    """Where cuda_fp16.h and cuda_bf16.h are: a CUDA toolkit, or the nvidia-cuda-runtime wheel."""
    candidates = [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append("/usr/local/cuda/include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    try:
        import nvidia.cuda_runtime as runtime  # the pip wheel nvidia-cuda-runtime-cu12 ships the headers

        candidates += [os.path.join(p, "include") for p in runtime.__path__]
    except ImportError:
        pass
    for c in candidates:
        if os.path.exists(os.path.join(c, "cuda_bf16.h")) and os.path.exists(os.path.join(c, "cuda_fp16.h")):
            return c
    raise HostBuildUnavailable("the host build of the CUDA kernels needs CUDA's cuda_fp16.h and cuda_bf16.h: "
                               "install a CUDA toolkit (or set CUDA_HOME) or pip install nvidia-cuda-runtime-cu12")


def available() -> str | None:
    """None when kernels can be built here, else why not."""
    try:
        cuda_include_dir()
    except HostBuildUnavailable as e:
        return str(e)
    return None if shutil.which("g++") else "the host build of the CUDA kernels needs g++"


_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:<>,\s]+?)\s+(\w+)\s*\[\s*\]\s*;")
_SHARED = re.compile(r"__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:<>,\s]+?)\s+(\w+)\s*((?:\[[^\]]*\]\s*)*);")


def rewrite_shared(source: str) -> str:
    """Shared-memory declarations -> per-block storage every thread of the block sees (simt.h)."""
    source = _EXTERN_SHARED.sub(lambda m: f"SIMT_EXTERN_SHARED({m.group(1)}, {m.group(2)});", source)
    return _SHARED.sub(lambda m: (f"using simt_type_{m.group(2)} = {m.group(1)}; "
                                  f"SIMT_SHARED(simt_type_{m.group(2)}, {m.group(2)}, {m.group(3).strip()});"), source)


def _translation_unit(code: str, names: list[str]) -> str:
    entries = ",\n  ".join(f"::simt::entry(&{n})" for n in names)
    return (f'#include "simt.h"\n#line 1 "kernel.cu"\n{rewrite_shared(code)}\n'
            f"static const ::simt::Entry* simt_entries() {{\n  static const ::simt::Entry e[] = {{\n  {entries}\n  }};\n"
            f"  return e;\n}}\n"
            'extern "C" int simt_launch(int index, const unsigned* grid, const unsigned* block, size_t shared,\n'
            "                           void** args, int num_args, const size_t* sizes, int order,\n"
            "                           unsigned long long seed, char* error, size_t error_len) {\n"
            "  return ::simt::launch(simt_entries()[index], grid, block, shared, args, num_args, sizes, order, seed,\n"
            "                        error, error_len);\n}\n")


def _include_dirs(options) -> list[str]:
    return [o[2:] for o in options if o.startswith("-I")]


def _fingerprint(unit: str, includes: list[str]) -> str:
    h = hashlib.sha256(unit.encode())
    for path in sorted(os.path.join(HERE, f) for f in os.listdir(HERE) if f.endswith(".h")) + sorted(os.path.join(d, f) for d in includes if os.path.isdir(d) for f in os.listdir(d)
                                  if f.endswith((".cuh", ".h"))):
        with open(path, "rb") as f:
            h.update(path.encode() + f.read())
    h.update(" ".join(FLAGS).encode())
    return h.hexdigest()[:24]


def _cache_dir() -> str:
    from scalellm.ops.jit import cache_root

    path = os.path.join(cache_root(), "cuda-host")
    os.makedirs(path, exist_ok=True)
    return path


def build(code: str, names: list[str], options=()) -> str:
    """Compile (or find in the cache) the shared library for `code` with one entry per name."""
    why = available()
    if why:
        raise HostBuildUnavailable(why)
    unit = _translation_unit(code, names)
    includes = [d for d in _include_dirs(options) if d != cuda_include_dir()]  # CUDA's own: added below
    lib = os.path.join(_cache_dir(), f"kernels-{_fingerprint(unit, includes)}.so")
    if os.path.exists(lib):
        return lib
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "unit.cpp")
        with open(src, "w") as f:
            f.write(unit)
        out = os.path.join(tmp, "unit.so")
        cmd = ["g++", *FLAGS, f"-I{HERE}", f"-I{cuda_include_dir()}", *[f"-I{d}" for d in includes], src, "-o", out]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"host build of CUDA kernels failed:\n{done.stderr[-4000:]}")
        os.replace(out, lib + f".{os.getpid()}")
        os.replace(lib + f".{os.getpid()}", lib)
    return lib


class HostModule:
    """cupy.RawModule's shape: HostModule(code=..., options=("-I...",), name_expressions=[...])."""

    def __init__(self, code: str, options=(), name_expressions=(), **_):
        self.names = list(name_expressions)
        self.lib = ctypes.CDLL(build(code, self.names, options))
        self.lib.simt_launch.restype = ctypes.c_int
        self.lib.simt_launch.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                                         ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                         ctypes.POINTER(ctypes.c_size_t), ctypes.c_int, ctypes.c_ulonglong,
                                         ctypes.c_char_p, ctypes.c_size_t]

    def get_function(self, name: str) -> "HostKernel":
        if name not in self.names:
            raise KeyError(f"{name} is not among the module's name expressions")
        return HostKernel(self, self.names.index(name), name)


def _dims(d) -> tuple[int, int, int]:
    d = (d,) if isinstance(d, int) else tuple(d)
    return tuple(int(x) for x in d) + (1,) * (3 - len(d))


def _argument(a, keep: list) -> tuple[int, int]:
    """(address of the argument's bytes, their size), as cuLaunchKernel's kernelParams holds them."""
    if isinstance(a, torch.Tensor):
        if a.is_cuda:
            raise TypeError("host-built kernels take CPU tensors")
        buf = ctypes.c_void_p(a.data_ptr())
    elif isinstance(a, np.ndarray) and a.ndim > 0:
        buf = ctypes.c_void_p(a.ctypes.data)
    elif isinstance(a, (np.generic, np.ndarray)):
        raw = np.asarray(a).tobytes()
        buf = ctypes.create_string_buffer(raw, len(raw))
    else:
        raise TypeError(f"kernel arguments are tensors or numpy scalars (np.int32(...)), got {type(a).__name__}")
    keep.append(buf)
    return ctypes.addressof(buf), ctypes.sizeof(buf)


class HostKernel:
    def __init__(self, module: HostModule, index: int, name: str):
        self.module, self.index, self.name = module, index, name

    def __call__(self, grid, block, args, shared_mem: int = 0, stream=None) -> None:
        global _launches
        keep: list = []
        pairs = [_argument(a, keep) for a in args]
        n = len(pairs)
        ptrs = (ctypes.c_void_p * max(n, 1))(*[p for p, _ in pairs])
        sizes = (ctypes.c_size_t * max(n, 1))(*[s for _, s in pairs])
        order, seed = current_order()
        err = ctypes.create_string_buffer(1024)
        with _launch_lock:
            _launches += 1
            launch_counts[self.name] += 1
            rc = self.module.lib.simt_launch(self.index, (ctypes.c_uint * 3)(*_dims(grid)),
                                             (ctypes.c_uint * 3)(*_dims(block)), int(shared_mem), ptrs, n, sizes,
                                             ORDERS[order], seed + _launches, err, len(err))
        if rc:
            raise KernelError(f"{self.name}: {err.value.decode(errors='replace')}")
