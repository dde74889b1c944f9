"""No register spills in the hot CUDA kernels: each file is compiled the way CI compiles it (nvcc -cubin for
sm_80 and sm_90, see .ci/run) with ptxas's verbose report, and every entry function must report 0 bytes of
spill stores, 0 bytes of spill loads and a 0-byte stack frame (a runtime-indexed local array lives in local
memory just as a spill does). Every name the backend launches (cuda_backend.NAMES) must be among the
entries, so the templates really were instantiated and checked. Skipped without nvcc; no GPU needed.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from scalellm.ops.cuda import backend as cuda_backend

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="needs nvcc (a CUDA toolkit)")
FILES = ["paged_attention", "prefill_attention", "sampling"]
ARCHS = ["sm_80", "sm_90"]

_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """ptxas -v's report -> {mangled entry function: {registers, stack, spill_stores, spill_loads}}."""
    entries: dict[str, dict[str, int]] = {}
    entry = props = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry = props = m.group(1)
            entries[entry] = {}
        elif m := _PROPS.search(line):
            props = m.group(1)
        elif (m := _FRAME.search(line)) and props in entries:
            entries[props].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif (m := _REGS.search(line)) and entry in entries:
            entries[entry]["registers"] = int(m[1])
    return entries


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> demangled (c++filt, from binutils), or {} when there is none."""
    if not shutil.which("c++filt"):
        return {}
    done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, done.stdout.splitlines()))


def compile_report(path: str, arch: str, tmp_path) -> dict[str, dict[str, int]]:
    cmd = [NVCC, "-std=c++17", f"-arch={arch}", "-cubin", f"-I{cuda_backend.KERNEL_DIR}", "-Xptxas", "-v",
           "-o", str(tmp_path / "out.cubin"), path]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return parse_ptxas(done.stdout + done.stderr)


def table(entries: dict[str, dict[str, int]], names: dict[str, str]) -> str:
    rows = []
    for mangled, info in sorted(entries.items(), key=lambda kv: names.get(kv[0], kv[0])):
        name = re.sub(r"\(.*$", "", names.get(mangled, mangled)).replace("scalellm::", "")
        rows.append(f"{name:55s} {info.get('registers', '?'):>4} regs  stack {info.get('stack', '?'):>4}  "
                    f"spill st {info.get('spill_stores', '?'):>4} ld {info.get('spill_loads', '?'):>4}")
    return "\n".join(rows)


def test_parse_ptxas_reads_each_entry():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z1fPf' for 'sm_80'
ptxas info    : Function properties for _Z1fPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 388 bytes cmem[0]
ptxas info    : Compiling entry function '_Z1gPf' for 'sm_80'
ptxas info    : Function properties for _Z1gPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers, 356 bytes cmem[0]
"""
    assert parse_ptxas(log) == {
        "_Z1fPf": dict(registers=40, stack=8, spill_stores=4, spill_loads=12),
        "_Z1gPf": dict(registers=12, stack=0, spill_stores=0, spill_loads=0)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", FILES)
def test_kernels_do_not_spill(module, arch, tmp_path):
    entries = compile_report(os.path.join(cuda_backend.KERNEL_DIR, f"{module}.cu"), arch, tmp_path)
    assert entries, f"ptxas reported no entry function for {module}.cu"
    names = demangle(list(entries))
    print(f"\n{module}.cu, {arch}:\n{table(entries, names)}")
    incomplete = [n for n, info in entries.items()
                  if {"registers", "stack", "spill_stores", "spill_loads"} - set(info)]
    assert not incomplete, f"ptxas's report for these entries was not understood: {incomplete}"
    wanted = cuda_backend.NAMES[module]
    assert len(entries) >= len(wanted), f"{len(entries)} entry functions, the backend launches {len(wanted)}"
    if names:  # every template the backend launches was instantiated (so its registers were checked here)
        compiled = {re.sub(r"^void |\(.*$", "", d) for d in names.values()}  # templates demangle with "void "
        missing = [w for w in wanted if w not in compiled]
        assert not missing, f"not among {module}.cu's entry functions: {missing}"
    bad = {names.get(n, n): info for n, info in entries.items()
           if info["spill_stores"] or info["spill_loads"] or info["stack"]}
    assert not bad, f"{module}.cu ({arch}) spills or keeps a local-memory stack frame: {bad}"
