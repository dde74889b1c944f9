"""Compile every CUDA kernel the way the GPU backend does: NVRTC (through which CuPy compiles), with the
backend's own options and name expressions, for sm_80 and sm_90. nvcc accepts things NVRTC does not
(C library headers, for one), so this is checked on its own; no GPU is needed.

    .venv/bin/python tools/nvrtc_check.py [--nvrtc PATH/libnvrtc.so]

Without --nvrtc it looks in $SCALELLM_NVRTC_DIR, then ~/.cache/scalellm/nvrtc (where .ci/run installs
the nvidia-cuda-nvrtc-cu12 wheel), then the CUDA toolkit. Exit status 0 when everything compiles.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scalellm.ops.cuda import backend as cuda_backend  # noqa: E402


def find_nvrtc() -> str | None:
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "scalellm", "nvrtc")
    wheels = [d for d in (os.environ.get("SCALELLM_NVRTC_DIR"), cache) if d]
    patterns = [os.path.join(d, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*") for d in wheels]
    patterns += ["/usr/local/cuda/lib64/libnvrtc.so*", "/usr/local/cuda/targets/*/lib/libnvrtc.so*"]
    for pattern in patterns:
        found = sorted(p for p in glob.glob(pattern) if "alt" not in os.path.basename(p))
        if found:
            return found[0]
    return None


def compile_module(lib, name: str, arch: str) -> str | None:
    """None when it compiles, else NVRTC's log."""
    prog = ctypes.c_void_p()
    source = cuda_backend.kernel_source(name).encode()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source, f"{name}.cu".encode(), 0, None, None):
        return "nvrtcCreateProgram failed"
    for expr in cuda_backend.NAMES[name]:
        lib.nvrtcAddNameExpression(prog, expr.encode())
    options = [o.encode() for o in cuda_backend.compile_options()] + [f"--gpu-architecture=compute_{arch[3:]}".encode()]
    rc = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return None if rc == 0 else log.value.decode(errors="replace")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nvrtc", default=None)
    args = ap.parse_args()
    path = args.nvrtc or find_nvrtc()
    if path is None:
        print("nvrtc_check: no libnvrtc found (pip install nvidia-cuda-nvrtc-cu12); not checked", file=sys.stderr)
        return 1
    lib = ctypes.CDLL(path)
    failed = 0
    for name in cuda_backend.NAMES:
        for arch in ("sm_80", "sm_90"):
            log = compile_module(lib, name, arch)
            print(f"nvrtc {arch} {name}.cu: {'ok' if log is None else 'FAILED'}", flush=True)
            if log is not None:
                print(log[-3000:])
                failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
