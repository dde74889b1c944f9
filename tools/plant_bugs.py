"""Plant known bugs, one at a time, in a temporary copy of the repository and check the tests catch each.

    .venv/bin/python tools/plant_bugs.py            # each bug against its related test files
    .venv/bin/python tools/plant_bugs.py --full     # each bug against the whole suite (slow)
    .venv/bin/python tools/plant_bugs.py --only b,c # some of the bugs

A bug is a textual patch: the first string must occur exactly once in the file, or the bug is reported
as "patch did not apply" (update its anchor in BUGS when the code around it changes). The copy holds
the working tree as git sees it (tracked and untracked files, not ignored ones) and runs with this
checkout's virtual environment; its own `scalellm` is the one imported, which the script checks first.
Then the unmodified copy runs the same tests once: if they fail there, nothing is counted (exit 2).
A bug is caught when its tests fail; tests that cannot run (a collection error, a conftest that does
not import, an internal error) are reported as an error, not as a catch.
Exit status 0 only when every bug is caught.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# this checkout's virtual environment, or the interpreter running the script where the checkout has none
# (a git worktree using another checkout's environment)
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable


@dataclass
class Bug:
    key: str
    name: str
    path: str
    old: str
    new: str
    tests: list[str]


SAMPLING_TESTS = ["tests/test_sampling.py", "tests/test_sampler_distributions.py", "tests/test_server_sampling.py"]
MODEL_TESTS = ["tests/test_weights_matter.py", "tests/test_correctness.py"]
QUANT_TESTS = ["tests/test_quantized.py"]

BUGS = [
    Bug("a", "repetition_penalty forced to 1.0 in the sampling batch", "scalellm/engine/sampler.py",
        "f32(_REPETITION)", "torch.ones(rows, dtype=torch.float32)", SAMPLING_TESTS),
    Bug("b", "the server forces greedy decoding", "scalellm/server/serving.py",
        "temperature=1.0 if req.temperature is None else req.temperature", "temperature=0.0",
        ["tests/test_server_sampling.py", "tests/test_server_api.py"]),
    Bug("c", "non-streamed requests are not aborted when their client leaves", "scalellm/server/lifecycle.py",
        "handler_cancellation=True", "handler_cancellation=False", ["tests/test_cancellation.py"]),
    Bug("d", "q/k/v bias ignored at load", "scalellm/model/weights.py",
        "linear(qkv, bias)", "linear(qkv, None)", MODEL_TESTS),
    Bug("e", "post-attention norm weight replaced by ones at load", "scalellm/model/weights.py",
        'post_norm=get(p + "post_attention_layernorm.weight")',
        'post_norm=torch.ones_like(get(p + "post_attention_layernorm.weight"))', MODEL_TESTS),
    Bug("f", "the warm-up skips whole steps (sampling compiles on the first request)", "scalellm/engine/warm_up.py",
        "        while engine.has_unfinished():\n            engine.step()", "        while False:\n            pass",
        ["tests/test_operator.py::test_no_kernel_compiles_after_healthy"]),
    Bug("g", "the gateway ejects a replica for answering 'at capacity'", "scalellm/gateway/upstream.py",
        "self.gw.replicas.report(replica, ok=upstream.status < 500 or is_refusal(upstream))",
        "self.gw.replicas.report(replica, ok=upstream.status < 500)",
        ["tests/test_gateway.py::test_a_busy_replica_is_relayed_not_ejected"]),
    Bug("h", "the dashboard shows prompt tokens/s as output tokens/s", "scalellm/server/dashboard.py",
        'point["tokens_per_s"], point["prompt_tokens_per_s"] = rate("generation_tokens"), rate("prompt_tokens")',
        'point["tokens_per_s"], point["prompt_tokens_per_s"] = rate("prompt_tokens"), rate("prompt_tokens")',
        ["tests/test_dashboard.py::test_the_page_under_load"]),
    # The padding rows' slots were once left stale; the host buffers they are written in now start
    # uninitialized (torch.empty), so a stale slot is garbage and the kernel writes out of bounds: pytest dies
    # of SIGSEGV (exit -11), an error, not a catch. Slot 0 is a live sequence's KV, as a stale slot was.
    Bug("i", "CUDA-graph padding rows write cache slot 0 (another sequence's KV), not nowhere",
        "scalellm/engine/cuda_graphs.py", 'h["slots"][n:bs] = -1', 'h["slots"][n:bs] = 0',
        ["tests/test_cuda_host_engine.py"]),
    Bug("j", "overlapped steps append a token to a sequence a stop string already ended",
        "scalellm/engine/step_outputs.py",
        "            if seq.finished:  # ended by a stop string", "            if False:  # ended by a stop string",
        ["tests/test_overlap.py"]),
    Bug("k", "the step's one copy misses the prefill positions (every chunk attends as if it started at 0)",
        "scalellm/ops/attention_metadata.py",
        "ctx_lens[chunk] - q_lens[chunk] + offset], axis=1)", "offset], axis=1)",
        ["tests/test_cuda_host_engine.py"]),
    Bug("l", "MoE routing renormalized whatever norm_topk_prob says", "scalellm/model/moe_weights.py",
        "renormalize=c.norm_topk_prob", "renormalize=True", ["tests/test_moe.py"]),
    Bug("m", "Qwen2-MoE's shared expert loses its sigmoid gate", "scalellm/ops/moe.py",
        "out += torch.sigmoid(w.shared_gate(x)) * w.shared_down", "out += w.shared_down", ["tests/test_moe.py"]),
    Bug("n", "4-bit blocks unpacked high nibbles first", "scalellm/ops/quant/ir.py",
        "    return (builder.uitofp(builder.and_(q, _const_vec([15] * 16, _I8)), _V16F),\n"
        "            builder.uitofp(builder.lshr(q, _const_vec([4] * 16, _I8)), _V16F))",
        "    return (builder.uitofp(builder.lshr(q, _const_vec([4] * 16, _I8)), _V16F),\n"
        "            builder.uitofp(builder.and_(q, _const_vec([15] * 16, _I8)), _V16F))", QUANT_TESTS),
    Bug("o", "Q4_1's minimum replaced by Q4_0's -8 scales", "scalellm/ops/quant/ir.py",
        '    if fmt == "q4_0":\n        return builder.fmul(scale, ir.Constant(_F32, -8.0))',
        '    if fmt in ("q4_0", "q4_1"):\n        return builder.fmul(scale, ir.Constant(_F32, -8.0))', QUANT_TESTS),
    Bug("p", "int8 activations scaled by max / 128", "scalellm/ops/quant/cpu.py",
        "scale = amax / np.float32(127.0)", "scale = amax / np.float32(128.0)", QUANT_TESTS),
    Bug("q", "a quantized GGUF's q/k rows left interleaved", "scalellm/model/gguf_file.py",
        "return w.reshape_rows(rows) if isinstance(w, QuantizedTensor) else rows(w)",
        "return w if isinstance(w, QuantizedTensor) else rows(w)", QUANT_TESTS),
    Bug("r", "both blocks of a pair take the first block's scale (int8 GEMM)", "scalellm/ops/quant/ir.py",
        "builder.shuffle_vector(p, p, _const_vec([2 * j] * 8 + [2 * j + 1] * 8))",
        "builder.shuffle_vector(p, p, _const_vec([2 * j] * 16))", QUANT_TESTS),
    Bug("v", "4-bit blocks unpacked high nibbles first (int8 GEMM)", "scalellm/ops/quant/ir.py",
        "order += [*range(16 * blk, 16 * blk + 16), *range(n + 16 * blk, n + 16 * blk + 16)]",
        "order += [*range(n + 16 * blk, n + 16 * blk + 16), *range(16 * blk, 16 * blk + 16)]", QUANT_TESTS),
    Bug("s", "bfloat16 decode attention: heads in pairs take the even head's weights for the values",
        "scalellm/ops/cpu/attention_ir.py",
        "where = builder.add(builder.mul(p_stride, ir.Constant(_I64, h)), loop.index)",
        "where = builder.add(builder.mul(p_stride, ir.Constant(_I64, h - h % 2)), loop.index)",
        ["tests/test_ops.py"]),
    Bug("t", "bfloat16 decode attention: the third head's scores are the second's", "scalellm/ops/cpu/attention_ir.py",
        "(_, v), = stacks[h]", "(_, v), = stacks[h - 1 if h == 2 else h]", ["tests/test_ops.py"]),
    Bug("u", "bfloat16 prefill on the decode kernel: each token of a chunk longer than one misses its own key",
        "scalellm/ops/attention_metadata.py",
        "np.arange(c.context_len - c.query_len + 1, c.context_len + 1, dtype=np.int32)",
        "np.arange(c.context_len - c.query_len + 1, c.context_len + 1, dtype=np.int32) - (c.query_len > 1)",
        ["tests/test_ops.py"]),
]

# Not a bug to find: proves the copy's code is what the tests run (a syntax error must break them).
CANARY = Bug("canary", "syntax error in the copy's scalellm/__init__.py", "scalellm/__init__.py",
             "def __getattr__(name: str):", "def __getattr__(name: str)):", ["tests/test_validation.py"])


def copy_tree(dest: str) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):  # deleted in the working tree
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))
    # numba's compiled-function cache: valid in the copy too (keyed by the source's mtime and size,
    # which copy2 keeps), and it spares each server started there a minute of compiling
    for folder, _, files in os.walk(os.path.join(ROOT, "scalellm")):
        for name in files:
            if name.endswith((".nbi", ".nbc")):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)
                os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
                shutil.copy2(os.path.join(ROOT, rel), os.path.join(dest, rel))


def env_for(copy: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=copy, PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONHOME", None)
    return env


def check_imports_copy(copy: str) -> None:
    out = subprocess.run([PYTHON, "-c", "import scalellm, tests; print(scalellm.__file__); print(tests.__file__)"],
                         cwd=copy, env=env_for(copy), check=True, capture_output=True, text=True).stdout.split()
    for path in out:
        if not os.path.realpath(path).startswith(os.path.realpath(copy) + os.sep):
            sys.exit(f"the copy imports {path}, not its own code: results would be meaningless")


def apply(copy: str, bug: Bug) -> str | None:
    """Patch the copy; the original text (to restore), or None when the anchor is not found exactly once."""
    path = os.path.join(copy, bug.path)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read()
    if text.count(bug.old) != 1:
        return None
    with open(path, "w") as f:
        f.write(text.replace(bug.old, bug.new))
    return text


def related_tests(copy: str, bug: Bug) -> list[str]:
    """The bug's test files and node ids (file::test) that exist in the copy."""
    return [t for t in bug.tests if os.path.exists(os.path.join(copy, t.split("::")[0]))]


def selection(copy: str, bugs: list[Bug]) -> list[str]:
    """Every test the bugs run, once: a node id is dropped when its whole file is selected too."""
    tests = list(dict.fromkeys(t for bug in bugs for t in related_tests(copy, bug)))
    return [t for t in tests if "::" not in t or t.split("::")[0] not in tests]


def run_tests(copy: str, files: list[str]) -> tuple[int, str, list[str], float]:
    """pytest's exit status, its output, its FAILED/ERROR summary lines, and the seconds it took."""
    cmd = [PYTHON, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *files]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True)
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return proc.returncode, proc.stdout + proc.stderr, failed, time.monotonic() - start


COLLECTION_ERRORS = ("during collection", "ERROR collecting")


def verdict(rc: int, output: str) -> tuple[str, str]:
    """A planted copy's pytest run as (kind, what to report): "caught" when tests failed, "missed" when
    they passed or none ran, "error" when they could not run: a collection error (exit 2), an internal
    error (3), a usage error or a conftest that does not import (4). A bug that breaks an import is not
    caught by a test: the suite did not get to run."""
    if rc == 2 or any(s in output for s in COLLECTION_ERRORS):
        return "error", f"ERROR: the tests could not be collected (pytest exit {rc})"
    if rc in (3, 4):
        return "error", f"ERROR: the tests could not run (pytest exit {rc})"
    if rc == 1:
        return "caught", "caught"
    if rc in (0, 5):
        return "missed", {0: "MISSED", 5: "no tests ran"}[rc]
    return "error", f"ERROR: pytest exit {rc}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="run the whole suite for each bug, not its related files")
    ap.add_argument("--only", default=None, help="comma-separated bug keys (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = ap.parse_args()
    bugs = [b for b in BUGS if args.only is None or b.key in args.only.split(",")]
    copy = tempfile.mkdtemp(prefix="scalellm-planted-")
    results = []
    try:
        copy_tree(copy)
        check_imports_copy(copy)
        print(f"copy of {ROOT} in {copy}; tests: {'the whole suite' if args.full else 'each bug’s related files'}")
        # the same tests with nothing planted: a failure there would be counted as a catch of every bug
        rc, _, failed, seconds = run_tests(copy, [] if args.full else selection(copy, [CANARY, *bugs]))
        print(f"[baseline] nothing planted: {'passed' if rc == 0 else f'pytest exit {rc}'} ({seconds:.0f} s)"
              + (f" by {failed[0]}" if failed else ""), flush=True)
        if rc != 0:
            print("the tests fail on the unmodified copy: nothing counted (make them pass first)")
            return 2
        for bug in [CANARY, *bugs]:
            original = apply(copy, bug)
            if original is None:
                kind, status, failed, seconds = "missed", "PATCH DID NOT APPLY", [], 0.0
                print(f"!!! {bug.key}: '{bug.old}' is not found exactly once in {bug.path}: update BUGS")
            else:
                try:
                    rc, output, failed, seconds = run_tests(copy, [] if args.full else related_tests(copy, bug))
                finally:
                    with open(os.path.join(copy, bug.path), "w") as f:
                        f.write(original)
                kind, status = verdict(rc, output)
            results.append((bug, kind))
            print(f"[{bug.key}] {bug.name}: {status} ({seconds:.0f} s)"
                  + (f"{':' if kind == 'error' else ' by'} {failed[0]}" if failed else ""), flush=True)
    finally:
        if args.keep:
            print(f"kept {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)
    canary_ok = results[0][1] != "missed"  # a syntax error in the package: the tests fail or cannot run
    if not canary_ok:
        print("the canary was not caught: the tests do not run the copy's code")
    missed = [b.key for b, kind in results[1:] if kind == "missed"]
    errors = [b.key for b, kind in results[1:] if kind == "error"]
    caught = len(results) - 1 - len(missed) - len(errors)
    print(f"{caught}/{len(results) - 1} bugs caught" + (f"; not caught: {missed}" if missed else "")
          + (f"; the tests could not run (errors, not catches): {errors}" if errors else ""))
    return 0 if canary_ok and not missed and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
