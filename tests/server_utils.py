"""Start the real server (python -m scalellm.server) on a free loopback port for end-to-end tests."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, wait: bool = True, timeout: float = 120.0, env: dict[str, str] | None = None,
                 port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"scalellm-test-{self.port}.log")
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "scalellm.server", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **env} if env else None)
        if wait:
            self.wait_healthy(timeout)

    def status(self, path: str = "/health") -> int | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            if self.status() == 200:
                return
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy after {timeout} s: {self.output()}")

    def output(self, whole: bool = False) -> str:
        """The end of the server's log, or all of it (it writes straight to the file; readable after stop too)."""
        with open(self.log_path) as f:
            text = f.read()
        return text if whole else text[-4000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class GatewayProcess(ServerProcess):
    """python -m scalellm.gateway on a free loopback port, healthy once a replica is routable."""

    def __init__(self, *args: str, wait: bool = True, timeout: float = 60.0, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"scalellm-gateway-{self.port}.log")
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "scalellm.gateway", "--host", "127.0.0.1", "--port", str(self.port),
               "--health-interval", "0.3", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **env} if env else None)
        if wait:
            self.wait_healthy(timeout)

    def replicas(self) -> list[dict]:
        with urllib.request.urlopen(self.url + "/replicas", timeout=5) as r:
            return json.loads(r.read())["replicas"]


def llama_replica(folder: str, *args: str, wait: bool = True, port: int | None = None) -> ServerProcess:
    """A replica of the tiny test llama as the shared llama_server runs it, on one compute thread
    (later flags override these)."""
    return ServerProcess("--model", folder, "--dtype", "float32", "--served-model-name", "tiny-llama",
                         "--max-model-len", "512", "--kv-cache-memory", "32MB", "--block-size", "16",
                         "--num-threads", "1", "--disable-log-requests", *args, wait=wait, port=port)


def post_json(url: str, path: str, body: dict, timeout: float = 60.0) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"POST {path} answered {e.code}: {e.read()[:400]!r}") from None


def single_token_id(url: str, text: str) -> int:
    """The id of a token given by its text (as logprobs show it); fails if the text is not one token."""
    ids = post_json(url, "/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]
    assert len(ids) == 1 and post_json(url, "/detokenize", {"tokens": ids})["prompt"] == text, text
    return ids[0]


def scrape(url: str, model_name: str | None = None) -> dict[str, float]:
    """Every sample in /metrics, keyed as in the text format, name or name{label="value",...}, without
    the model_name label, which every sample must carry (with the same value, or `model_name`)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    names = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert "model_name" in s.labels, f"{s.name} has no model_name label"
            names.add(s.labels["model_name"])
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if k != "model_name")
            values[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    assert len(names) <= 1 and (model_name is None or names <= {model_name}), names
    assert not any(key.endswith("_created") for key in values)
    return values


def is_idle(m: dict[str, float]) -> bool:
    return (m["scalellm:kv_cache_usage_perc"] == 0 and m["scalellm:num_requests_running"] == 0
            and m["scalellm:num_requests_waiting"] == 0)


def wait_idle(url: str, timeout: float = 20.0) -> dict[str, float]:
    """Scrape until the engine holds no request and no KV block, or the timeout passes; the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        if is_idle(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def wait_running(url: str, count: int, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        if m["scalellm:num_requests_running"] >= count:
            return m
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} request(s) running after {timeout} s")
        time.sleep(0.02)


def copy_checkpoint(folder: str, dest: str, config: dict | None = None,
                    generation_config: dict | None = None) -> str:
    """A copy of a checkpoint folder with some config.json / generation_config.json fields changed."""
    shutil.copytree(folder, dest)
    for name, changes in (("config.json", config), ("generation_config.json", generation_config)):
        if changes:
            path = os.path.join(dest, name)
            with open(path) as f:
                data = json.load(f)
            data.update(changes)
            with open(path, "w") as f:
                json.dump(data, f)
    return dest
