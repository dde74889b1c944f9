"""`--launch N`: N local `scalellm.server` processes behind the gateway, the cores split between them
(each pinned to its share and given that many compute threads), and one that dies started again. With
an `api_key` (the gateway's --upstream-api-key) each server requires it; without, none is given one."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys

log = logging.getLogger("scalellm.gateway")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_cores(n: int) -> list[list[int]]:
    """The cores this process may use, in n contiguous shares (a core is shared only when n > cores)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if n >= len(cores):
        return [[cores[i % len(cores)]] for i in range(n)]
    size, extra = divmod(len(cores), n)
    shares, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        shares.append(cores[start:end])
        start = end
    return shares


class Launched:
    def __init__(self, index: int, cores: list[int], server_args: list[str], log_dir: str,
                 api_key: str | None = None):
        self.index = index
        self.cores = cores
        self.server_args = server_args
        self.api_key = api_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(log_dir, f"replica-{index}.log")
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.next_start = 0.0

    def command(self) -> list[str]:
        return [sys.executable, "-m", "scalellm.server", "--host", "127.0.0.1", "--port", str(self.port),
                "--num-threads", str(len(self.cores)), *self.server_args,
                *(["--api-key", self.api_key] if self.api_key else [])]

    def start(self) -> None:
        cores = set(self.cores)
        with open(self.log_path, "a") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=(lambda: os.sched_setaffinity(0, cores))
                                         if hasattr(os, "sched_setaffinity") else None)
        log.info("replica %d: %s on cores %s (pid %d, log %s)", self.index, self.url, self.cores, self.proc.pid,
                 self.log_path)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)


class Launcher:
    def __init__(self, n: int, server_args: list[str], log_dir: str, api_key: str | None = None):
        os.makedirs(log_dir, exist_ok=True)
        self.children = [Launched(i, cores, server_args, log_dir, api_key) for i, cores in enumerate(split_cores(n))]
        self._task: asyncio.Task | None = None

    def start(self, replicas) -> None:
        for child in self.children:
            child.start()
            replicas.add(child.url, None, "launch").pid = child.proc.pid
        self._task = asyncio.create_task(self._watch(replicas))

    async def _watch(self, replicas) -> None:
        while True:
            await asyncio.sleep(1.0)
            for child in self.children:
                if child.proc is not None and child.proc.poll() is not None:
                    if asyncio.get_running_loop().time() < child.next_start:
                        continue  # a replica that keeps dying is started again less and less often
                    child.restarts += 1
                    child.next_start = asyncio.get_running_loop().time() + min(60.0, 2.0 ** child.restarts)
                    log.warning("replica %d exited with %s; starting it again (restart %d)", child.index,
                                child.proc.returncode, child.restarts)
                    child.start()  # same port: the replica keeps its address, and is re-admitted when healthy
                    replicas.add(child.url, None, "launch").pid = child.proc.pid

    async def stop(self, grace: float) -> None:
        if self._task is not None:
            self._task.cancel()
        for child in self.children:
            child.stop()
        deadline = asyncio.get_running_loop().time() + grace + 5
        while any(c.proc and c.proc.poll() is None for c in self.children):
            if asyncio.get_running_loop().time() > deadline:
                for c in self.children:
                    if c.proc and c.proc.poll() is None:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(c.proc.pid, signal.SIGKILL)
                break
            await asyncio.sleep(0.1)
