"""The processes of a chaos run (bench/chaos.py): replicas and the gateway on fixed ports, killed and
restarted there; their RSS and CPU from /proc; and what their HTTP endpoints say (/health, /load,
/metrics, /replicas)."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time

import aiohttp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Service:
    """One server or gateway process on a fixed port, restartable on that port; each incarnation
    logs to its own file. (bench/harness.py's Proc picks a new port per start and logs under one
    name; a replica killed here must come back where the gateway expects it.)"""

    def __init__(self, name: str, cmd: list[str], port: int, log_dir: str):
        self.name, self.cmd, self.port, self.log_dir = name, cmd, port, log_dir
        self.url = f"http://127.0.0.1:{port}"
        self.incarnations: list[dict] = []  # {index, pid, log, started, ready, ended, killed}
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def current(self) -> dict:
        return self.incarnations[-1]

    def spawn(self) -> dict:
        index = len(self.incarnations)
        path = os.path.join(self.log_dir, f"{self.name}.{index}.log")
        self._log = open(path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        inc = {"index": index, "pid": self.proc.pid, "log": path, "started": time.time(), "ready": None,
               "ended": None, "killed": False}
        self.incarnations.append(inc)
        return inc

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 180.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.current['log']}")
            try:
                async with session.get(self.url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        self.current["ready"] = time.time()
                        return self.current["ready"] - self.current["started"]
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready after {timeout} s; see {self.current['log']}")

    def kill(self) -> None:
        """SIGKILL this incarnation (only the process this object started) and reap it."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.current.update(ended=time.time(), killed=True)
        self._log.close()

    def stop(self, grace: float = 30.0) -> None:
        if self.proc is None or self._log.closed:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self.current["ended"] = time.time()
        self._log.close()


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


async def wait_busy(session: aiohttp.ClientSession, url: str, want: int, timeout: float) -> int:
    """Wait (at most `timeout`) until the replica has `want` requests running; how many it has then."""
    deadline = time.monotonic() + timeout
    running = 0
    while time.monotonic() < deadline:
        try:
            async with session.get(url + "/load", timeout=aiohttp.ClientTimeout(total=1)) as r:
                running = (await r.json(content_type=None)).get("num_requests_running", 0)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
            running = 0
        if running >= want:
            return running
        await asyncio.sleep(0.02)
    return running


async def wait_routable(session: aiohttp.ClientSession, url: str, n: int, timeout: float = 60.0) -> None:
    """Wait until the gateway sees `n` replicas healthy, with their models known."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(url + "/replicas") as r:
                reps = (await r.json())["replicas"]
                if sum(1 for x in reps if x.get("state") == "healthy" and x.get("models")) >= n:
                    return
        except (aiohttp.ClientError, ValueError, KeyError):
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("the gateway did not see every replica healthy")


_METRIC = re.compile(r"^scalellm:(num_requests_running|num_requests_waiting|kv_cache_usage_perc"
                     r"|slow_readers_disconnected_total)\{[^}]*\} (\S+)$", re.M)
SLOW_READERS = "slow_readers_disconnected_total"  # a counter: it restarts at 0 with its process


async def end_state(session: aiohttp.ClientSession, url: str) -> dict:
    """A replica's /load and its gauges in /metrics (and its slow-reader counter, absent until the first)."""
    out: dict = {}
    try:
        async with session.get(url + "/load", timeout=aiohttp.ClientTimeout(total=10)) as r:
            out["load"] = await r.json(content_type=None) if r.status == 200 else {"status": r.status}
        async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
            if r.status == 200:
                out["metrics"] = {m.group(1): float(m.group(2)) for m in _METRIC.finditer(await r.text())}
                out["metrics"].setdefault(SLOW_READERS, 0.0)
            else:
                out["metrics"] = {"status": r.status}
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    load = out.get("load", {})
    out["clean"] = ("error" not in out and load.get("num_requests_running") == 0
                    and load.get("num_requests_waiting") == 0 and load.get("kv_cache_usage") == 0
                    and load.get("in_flight") == 0)
    return out


async def gateway_state(session: aiohttp.ClientSession, url: str) -> dict:
    """The gateway's view of each replica (/replicas)."""
    try:
        async with session.get(url + "/replicas", timeout=aiohttp.ClientTimeout(total=10)) as r:
            reps = (await r.json())["replicas"]
        return {x["url"]: {k: x.get(k) for k in ("state", "in_flight", "requests", "errors")} for x in reps}
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as e:
        return {"error": f"{type(e).__name__}: {e}"}

