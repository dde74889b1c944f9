"""One OpenMP runtime in the process: numba's parallel kernels run on torch's OpenMP threads.

The torch wheel bundles its own libgomp (soname libgomp.so.1), while numba's OpenMP layer links the
system's by file name (libgomp.so.1.0.0), so a process that uses both ends up with two OpenMP
runtimes, each with a thread pool spinning on the same cores. On a machine with few cores every
parallel region of one then waits for threads the other keeps busy, and steps slow down many times
over (bench/results/ablation.md). Loading numba's pool with
its dependency renamed to torch's libgomp makes the dynamic linker reuse the runtime torch already
loaded. The renamed copy of numba's (unchanged) pool lives in a cache folder; where anything does not
fit (no bundled libgomp, numba's pool already loaded, another threading layer asked for), nothing is
changed and numba behaves as it would anyway. SCALELLM_SHARE_OPENMP=0 turns it off.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import sys

log = logging.getLogger(__name__)

_POOL = "numba.np.ufunc.omppool"
_SYSTEM_NAME = b"libgomp.so.1.0.0\x00"
status = "not attempted"


def loaded_openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process."""
    with open(f"/proc/{os.getpid()}/maps") as f:
        paths = {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
    return sorted(p for p in paths if p.startswith("/"))


def torch_libgomp() -> str | None:
    import torch

    folder = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.startswith("libgomp") and ".so" in name:
            return os.path.join(folder, name)
    return None


def read_soname(path: str) -> bytes | None:
    """The SONAME of an ELF shared library (enough of an ELF reader for this one field)."""
    import struct

    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    for sh in sections:
        if sh[1] != 6:  # SHT_DYNAMIC
            continue
        strtab = sections[sh[6]]
        for off in range(sh[4], sh[4] + sh[5], 16):
            tag, value = struct.unpack_from("<qQ", data, off)
            if tag == 14:  # DT_SONAME
                start = strtab[4] + value
                return data[start:data.index(b"\x00", start)]
    return None


def share_torch_openmp() -> str:
    """Arrange for numba's OpenMP pool to use torch's libgomp; returns what was done (also in `status`)."""
    global status
    if status != "not attempted":
        return status
    status = _share()
    log.debug("OpenMP: %s", status)
    return status


def _share() -> str:
    from numba.core import config

    if not sys.platform.startswith("linux"):
        return "not Linux; left alone"
    if os.environ.get("SCALELLM_SHARE_OPENMP", "1") == "0":
        return "turned off by SCALELLM_SHARE_OPENMP=0"
    if _POOL in sys.modules:
        return "numba's OpenMP pool was already loaded"
    if str(config.THREADING_LAYER).lower() not in ("default", "omp"):
        return f"numba threading layer {config.THREADING_LAYER} asked for"
    torch_gomp = torch_libgomp()
    if torch_gomp is None:
        return "torch has no bundled libgomp (one runtime already)"
    soname = read_soname(torch_gomp)
    spec = importlib.util.find_spec(_POOL)
    if soname is None or spec is None or spec.origin is None or len(soname) >= len(_SYSTEM_NAME):
        return "unexpected library layout; left alone"
    with open(spec.origin, "rb") as f:
        data = f.read()
    if data.count(_SYSTEM_NAME) != 1:
        return "numba's pool does not name libgomp.so.1.0.0; left alone"
    patched = data.replace(_SYSTEM_NAME, soname + b"\x00" * (len(_SYSTEM_NAME) - len(soname)))
    from scalellm.ops.jit import cache_root

    folder = cache_root()
    path = os.path.join(folder, f"omppool-{hashlib.sha256(patched).hexdigest()[:16]}.so")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(patched)
        os.replace(tmp, path)
    loader = importlib.machinery.ExtensionFileLoader(_POOL, path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(_POOL, path, loader=loader))
    loader.exec_module(module)
    sys.modules[_POOL] = module
    config.THREADING_LAYER = "omp"
    runtimes = loaded_openmp_runtimes()
    if len(runtimes) != 1:
        return f"still {len(runtimes)} OpenMP runtimes: {runtimes}"
    return f"numba shares torch's OpenMP runtime ({runtimes[0]})"
