"""Each speed lever, before and after, measured in the same run: bench/results/ablation.md.

    .venv/bin/python bench/ablation.py [--models tiny-llama,smollm2-135m] [--repeats 3] [--skip-serving]

Part 1, the forward pass (bare decode steps at batch 1, 16 and 64, bfloat16), in one process with the
variants interleaved: torch's plain linear and torch elementwise ops (the earlier design) -> weights
packed once for oneDNN -> the fused numba kernels (the current forward). One OpenMP runtime versus
two is measured by running the current forward in two child processes, with and without the
runtime sharing (SCALELLM_SHARE_OPENMP), and 1 versus 2 compute threads likewise. For each variant the
top of a cProfile of its batch-64 step shows where the time goes: the profile behind the next lever.

Part 2, the whole server: milestone commits of this repository, each checked out into a worktree
and served in turn on the same machine, driven by tools/loadgen (streamed, 128 tokens in and out).

Part 3, the engine alone under the serving workload (bench/engine_loop.py: 64 requests in flight, 640
in all, prefill mixed into the decodes) at the recent levers' commits, each in a fresh process,
interleaved: the steps' levers measured without the HTTP path and the load generator sharing the cores.
Parts skipped in a run keep their last results (dated).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from compute_floor import floor  # noqa: E402
from harness import PY, RESULTS  # noqa: E402
from models import MODELS  # noqa: E402

BATCHES = (1, 16, 64)
# (label, commit, what it adds); the first is the state before this round of speed work
MILESTONES = [
    ("baseline", "5cc09f6", "torch elementwise ops, plain GEMMs, per-token Python in the step, asyncio.Queue per request"),
    ("forward + step", "b94f9c2", "packed GEMMs, fused numba kernels, array-based step bookkeeping, byte-table detokenizer"),
    ("one OpenMP runtime", "3cb4443", "numba shares torch's libgomp; vectorized exp in attention"),
    ("batched streaming", "47066ac", "per-request delta buffers, one socket write per request per step"),
    ("thread count kept", "f9a20a2", "numba's pool start no longer resets torch's thread count"),
    ("small-batch GEMM", "ffd9a36", "batches of 1-2 rows: numba GEMM over the plain weight instead of oneDNN"),
    ("SiLU via torch", "e85be02", "torch's vectorized SiLU-mul instead of a scalar numba loop"),
    ("attention layout", "ff70553", "attention walks each sequence's blocks in order; 128-token blocks; every core computes"),
    ("current", "HEAD", "everything on main (adds: the engine waits for the loop to hand out a long step's deltas)"),
]
# part 3: (label, commit, what it adds), the first the state before the levers
ENGINE_MILESTONES = [
    ("before", "46089c6", "decode attention with a scalar maximum pass and a normalizing pass; torch greedy argmax"),
    ("attention: lane-wise maximum", "11a874c", "the scoring keeps each head's maximum lane-wise; the values are "
     "divided by the sum once"),
    ("attention: scratch per run", "8e227d8", "each thread's run of rows allocates its scratch once, not per row"),
    ("greedy from the logits' bits", "c2979e3", "argmax by a numba kernel on the head's bfloat16 output, no float32 "
     "copy"),
    ("current", "HEAD", "everything on main"),
]
ENGINE_LOAD = (64, 640)  # requests in flight, requests in all


# -- part 1: the forward pass -----------------------------------------------------------------
def torch_elementwise_ops():
    """The earlier design's torch ops for norms, q/k/v split + rotary + cache write, and SiLU-mul."""
    from scalellm.ops import torch_ops as R

    def attention_inputs(qkv, positions, cos, sin, q_norm, k_norm, eps, heads, kv_heads, k_cache, v_cache, slots):
        dim = k_cache.shape[-1]
        q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        q, k, v = q.view(-1, heads, dim), k.view(-1, kv_heads, dim), v.view(-1, kv_heads, dim)
        if q_norm is not None:
            q, k = R.rms_norm(q, q_norm, eps), R.rms_norm(k, k_norm, eps)
        R.rotary_inplace(q, k, positions, cos, sin)
        R.write_kv(k, v, k_cache, v_cache, torch.from_numpy(slots))
        return q.contiguous()
    return {"rms_norm": R.rms_norm, "silu_mul": R.silu_mul, "attention_inputs": attention_inputs}


def forward_variants(name: str):
    """(label, LLM, ops to use, rows that take the small-batch GEMM), each adding one lever."""
    from scalellm import LLM, ops
    from scalellm.ops import linear

    folder = MODELS[name]()
    fused = {k: getattr(ops, k) for k in ("rms_norm", "silu_mul", "attention_inputs")}
    plain_ops = torch_elementwise_ops()
    linear.PACK_WEIGHTS = False
    plain = LLM(folder, dtype="bfloat16", kv_cache_memory="1GiB")
    linear.PACK_WEIGHTS = True
    packed = LLM(folder, dtype="bfloat16", kv_cache_memory="1GiB")
    torch_silu = {**fused, "silu_mul": plain_ops["silu_mul"]}
    return [("torch ops + plain GEMMs", plain, plain_ops, 0), ("+ packed GEMMs", packed, plain_ops, 0),
            ("+ numba norms and attention inputs", packed, torch_silu, 0),
            ("+ small-batch numba GEMM", packed, torch_silu, linear.SMALL_BATCH_ROWS),
            ("+ numba SiLU-mul, parallel build (current)", packed, fused, linear.SMALL_BATCH_ROWS)]


def use_ops(table: dict, small_rows: int) -> None:
    from scalellm import ops
    from scalellm.ops import linear

    for k, fn in table.items():
        setattr(ops, k, fn)
    linear.SMALL_BATCH_ROWS = small_rows


def step_profile(llm, batch: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    floor(llm, batch, 128, 6)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).sort_stats("tottime")
    total = stats.total_tt
    rows = []
    for (path, line, fn), (_, _, tottime, _, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:5]:
        where = fn if path == "~" else f"{os.path.basename(path)}:{fn}"
        rows.append(f"{where} {100 * tottime / total:.0f}%")
    return ", ".join(rows)


def part_forward(name: str, repeats: int) -> dict:
    variants = forward_variants(name)
    times = {label: {b: [] for b in BATCHES} for label, *_ in variants}
    for llm in {id(v[1]): v[1] for v in variants}.values():
        floor(llm, 2, 128, 4)  # compile and warm
    for _ in range(repeats):
        for label, llm, table, rows in variants:
            use_ops(table, rows)
            for b in BATCHES:
                times[label][b].append(floor(llm, b, 128, 24)["tpot_ms"]["median"])
    profiles = {}
    for label, llm, table, rows in variants:
        use_ops(table, rows)
        profiles[label] = {b: step_profile(llm, b) for b in (1, 64)}
    use_ops(variants[-1][2], variants[-1][3])
    return {"times": times, "profiles": profiles}


def child_forward(name: str, env: dict) -> dict[int, float]:
    """Decode step ms of the current forward in a fresh process (so OpenMP and threads start anew)."""
    code = ("import sys, json; sys.path[:0] = [%r, %r]\n"
            "from compute_floor import floor\nfrom models import MODELS\nfrom scalellm import LLM\n"
            "llm = LLM(MODELS[%r](), dtype='bfloat16', kv_cache_memory='1GiB', num_threads=int(sys.argv[1]))\n"
            "floor(llm, 2, 128, 4)\n"
            "print(json.dumps({b: floor(llm, b, 128, 24)['tpot_ms']['median'] for b in %r}))"
            % (BENCH, ROOT, name, BATCHES))
    threads = env.pop("THREADS")
    out = subprocess.run([PY, "-c", code, threads], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def part_runtime(name: str, repeats: int) -> dict:
    settings = {"two OpenMP runtimes, 2 threads": {"SCALELLM_SHARE_OPENMP": "0", "THREADS": "2"},
                "one OpenMP runtime, 2 threads": {"SCALELLM_SHARE_OPENMP": "1", "THREADS": "2"},
                "one OpenMP runtime, 1 thread": {"SCALELLM_SHARE_OPENMP": "1", "THREADS": "1"}}
    times = {label: {b: [] for b in BATCHES} for label in settings}
    for _ in range(repeats):
        for label, env in settings.items():
            for b, ms in child_forward(name, dict(env)).items():
                times[label][b].append(ms)
    return {"times": times}


# -- part 2: the whole server at milestone commits ------------------------------------------------
def worktree(commit: str) -> str:
    if commit == "HEAD":
        return ROOT
    path = os.path.join(BENCH, ".cache", "worktrees", commit)
    if not os.path.exists(path):
        subprocess.check_call(["git", "worktree", "add", "--detach", "-f", path, commit], cwd=ROOT,
                              stdout=subprocess.DEVNULL)
    return path


def serve_and_drive(tree: str, folder: str, args) -> dict[int, dict]:
    from harness import MAX_MODEL_LEN, NAME, Proc, loadgen

    p = Proc("ablation", [PY, "-m", "scalellm.server", "--model", folder, "--port", "{port}", "--dtype", "bfloat16",
                          "--served-model-name", NAME, "--max-model-len", str(MAX_MODEL_LEN)],
             env={"PYTHONPATH": tree}, cwd=tree)
    try:
        return {c: loadgen(p.url, folder, c, max(8, 2 * c), args) for c in BATCHES}
    finally:
        p.stop()


def interleaved(milestones: list, repeats: int, what: str, name: str, measure) -> dict:
    """measure(tree) at each milestone's worktree, the milestones taken in turn in every repeat."""
    trees = {label: worktree(commit) for label, commit, _ in milestones}
    runs = {label: [] for label in trees}
    for r in range(repeats):
        for label, tree in trees.items():
            print(f"  {name} {what} {label} (repeat {r + 1})", flush=True)
            runs[label].append(measure(tree))
    return runs


def part_serving(name: str, repeats: int, args) -> dict:
    folder = MODELS[name]()
    return interleaved(MILESTONES, repeats, "serving", name, lambda tree: serve_and_drive(tree, folder, args))


# -- part 3: the engine alone, closed loop, at recent commits --------------------------------------
def part_engine(name: str, repeats: int, args) -> dict:
    folder = MODELS[name]()

    def measure(tree: str) -> dict:
        out = subprocess.run([PY, os.path.join(BENCH, "engine_loop.py"), folder, "--concurrency", str(ENGINE_LOAD[0]),
                              "--requests", str(ENGINE_LOAD[1]), "--input-len", str(args.input_len),
                              "--output-len", str(args.output_len)],
                             cwd=tree, env={**os.environ, "PYTHONPATH": tree}, capture_output=True, text=True,
                             timeout=1800)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        return json.loads(out.stdout.strip().splitlines()[-1])
    return interleaved(ENGINE_MILESTONES, repeats, "engine loop", name, measure)


# -- report ---------------------------------------------------------------------------------------
def _ms(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def write(results: dict, args) -> str:
    skipped = "".join(f" --skip-{p}" for p in ("forward", "serving", "engine") if getattr(args, f"skip_{p}"))
    L = ["# Ablation: each speed lever, before and after, in the same run", "",
         f"{os.cpu_count()} cores, torch {torch.__version__}, bfloat16; {time.strftime('%Y-%m-%d')}. "
         f"Latest command: `.venv/bin/python bench/ablation.py --models {args.models} --repeats {args.repeats}"
         f"{skipped}`; a table from an earlier run says so and gives its date. "
         "Forward and runtime cells: median over the repeats (range in brackets); whole-server cells: median over "
         f"the runs per milestone, {' and '.join(map(str, BATCHES))} concurrent, max(8, 2 x concurrency) requests "
         "each, so a single run there carries this machine's +-10-20% drift. Variants were interleaved so drift "
         "hits all alike.", ""]
    for name, res in results.items():
        L += [f"## {name}", ""]
        if "forward" in res:
            fw = res["forward"]
            L += [f"### Forward pass: decode step ms (bare, no server){_kept(res, 'forward')}", "",
                  "| variant | " + " | ".join(f"batch {b}" for b in BATCHES) + " |", "|---|" + "---:|" * len(BATCHES)]
            for label, per_batch in fw["times"].items():
                L.append(f"| {label} | " + " | ".join(_ms(per_batch[b]) for b in BATCHES) + " |")
            L += ["", "Where each variant's decode steps spend their time (cProfile, self time, top 5): the profile "
                  "that points at the next lever.", "", "| variant | batch 1 | batch 64 |", "|---|---|---|"]
            for label, per_batch in fw["profiles"].items():
                L.append(f"| {label} | {per_batch[1]} | {per_batch[64]} |")
        if "runtime" in res:
            L += ["", "### OpenMP runtimes and compute threads: decode step ms (current forward, fresh process each)"
                  f"{_kept(res, 'runtime')}", "",
                  "| setting | " + " | ".join(f"batch {b}" for b in BATCHES) + " |", "|---|" + "---:|" * len(BATCHES)]
            for label, per_batch in res["runtime"]["times"].items():
                L.append(f"| {label} | " + " | ".join(_ms(per_batch[b]) for b in BATCHES) + " |")
        if "serving" in res:
            L += ["", f"### Whole server at milestone commits: output tok/s (TPOT p50 ms){_kept(res, 'serving')}", "",
                  "| milestone | commit | adds | " + " | ".join(f"c={c}" for c in BATCHES) + " |",
                  "|---|---|---|" + "---:|" * len(BATCHES)]
            for label, commit, adds in MILESTONES:
                runs = res["serving"].get(label) or []
                cells = []
                for c in BATCHES:
                    tps = [run[c]["output_throughput"] for run in runs]
                    tpot = [run[c]["tpot_ms"]["median"] for run in runs]
                    cells.append(f"{statistics.median(tps):.1f} ({statistics.median(tpot):.2f})" if tps else "–")
                L.append(f"| {label} | {commit} | {adds} | " + " | ".join(cells) + " |")
        if "engine" in res:
            L += ["", f"### The engine alone, closed loop at recent commits: output tok/s (step ms)"
                  f"{_kept(res, 'engine')}", "",
                  f"{ENGINE_LOAD[0]} requests in flight, {ENGINE_LOAD[1]} in all, {args.input_len} tokens in and "
                  f"{args.output_len} out (bench/engine_loop.py, a fresh process per run, commits interleaved); "
                  "median (range) over the repeats. The streaming lever (91b6ac1) works on the server's loop, "
                  "not in the engine: it is measured in the README's serving notes.", "",
                  "| milestone | commit | adds | output tok/s | step ms |", "|---|---|---|---:|---:|"]
            for label, commit, adds in ENGINE_MILESTONES:
                runs = res["engine"].get(label) or []
                tps, step = [r["output_throughput"] for r in runs], [r["step_ms"] for r in runs]
                cells = f"{_ms(tps)} | {_ms(step)}" if runs else "– | –"
                L.append(f"| {label} | {commit} | {adds} | {cells} |")
        L.append("")
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "ablation.md")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
    with open(os.path.join(RESULTS, "ablation.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    return path


def _kept(res: dict, part: str) -> str:
    return f" (not re-run: from the run of {res[part + '_date']})" if res.get(part + "_kept") else ""


def _previous_results() -> dict:
    """The last run's results (batch and concurrency keys back to ints), or {}."""
    try:
        with open(os.path.join(RESULTS, "ablation.json")) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    for res in data.values():
        res.update({part + "_kept": True for part in ("forward", "runtime", "serving", "engine") if part in res})
        for label, runs in res.get("serving", {}).items():
            res["serving"][label] = [{int(c): v for c, v in run.items()} for run in runs]
        for part, tables in (("forward", ("times", "profiles")), ("runtime", ("times",))):
            for table in tables:
                for label, per_batch in res.get(part, {}).get(table, {}).items():
                    res[part][table][label] = {int(b): v for b, v in per_batch.items()}
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny-llama,smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--skip-serving", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()
    parts = {"forward": (not args.skip_forward, lambda name: part_forward(name, args.repeats)),
             "runtime": (not args.skip_forward, lambda name: part_runtime(name, args.repeats)),
             "serving": (not args.skip_serving, lambda name: part_serving(name, max(1, args.repeats - 1), args)),
             "engine": (not args.skip_engine, lambda name: part_engine(name, args.repeats, args))}
    results = _previous_results()  # other models' results and skipped parts stay, dated
    for name in args.models.split(","):
        old, res = results.get(name, {}), {}
        results[name] = res
        for part, (run, measure) in parts.items():
            if run:
                print(f"== {name}: {part}", flush=True)
                res[part], res[part + "_date"] = measure(name), time.strftime("%Y-%m-%d")
            elif part in old:
                res.update({part: old[part], part + "_kept": True,
                            part + "_date": old.get(part + "_date", "an earlier day")})
        print(f"wrote {write(results, args)}", flush=True)


if __name__ == "__main__":
    main()
