"""What an operator meets: warm-up before healthy, request and stats logs, the `scalellm` command and
its one-line answers, metrics labels and counts, /version and /v1/models/{id}."""
import asyncio
import glob
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import aiohttp
import pytest

from tests.server_utils import ServerProcess, post_json, scrape, wait_idle

MODEL = "tiny-llama"
SCALELLM = os.path.join(os.path.dirname(sys.executable), "scalellm")  # the console command pip installed


def requests_of_every_kind(url: str, long_prompt: list[int]) -> None:
    """Greedy, sampled with every option, logprobs, n > 1, chat, streamed, a long chunked prefill, a
    prefix-cache hit, and 40 at once (the parallel kernel builds)."""
    base = {"model": MODEL, "max_tokens": 4, "ignore_eos": True}
    post_json(url, "/v1/completions", {**base, "prompt": "Once", "temperature": 0})
    post_json(url, "/v1/completions", {**base, "prompt": "Once", "temperature": 0.7, "top_k": 8, "top_p": 0.9,
                                       "min_p": 0.02, "presence_penalty": 0.3, "frequency_penalty": 0.2,
                                       "repetition_penalty": 1.2, "seed": 3, "n": 3, "logprobs": 3,
                                       "min_tokens": 2, "stop": ["zz"]})
    post_json(url, "/v1/chat/completions", {**base, "messages": [{"role": "user", "content": "Hi"}],
                                            "logprobs": True, "top_logprobs": 2})
    post_json(url, "/v1/completions", {**base, "prompt": long_prompt})
    post_json(url, "/v1/completions", {**base, "prompt": long_prompt, "temperature": 0.5})  # a cache hit

    async def many():
        async with aiohttp.ClientSession() as s:
            async def one(i):
                body = {**base, "prompt": f"Story {i}:", "max_tokens": 12, "stream": True, "temperature": i % 2}
                async with s.post(url + "/v1/completions", json=body) as r:
                    assert r.status == 200
                    await r.read()
            await asyncio.gather(*(one(i) for i in range(40)))
    asyncio.run(many())


def wait_for_line(server: ServerProcess, text: str, timeout: float = 10.0) -> str:
    """The server's whole log once it holds `text` (the stats line comes on its own clock)."""
    deadline = time.monotonic() + timeout
    while text not in (log := server.output(whole=True)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return log


def test_no_kernel_compiles_after_healthy(llama_folder, tmp_path):
    # An empty compile cache: every kernel the warm-up misses would compile while a request waits.
    cache = tmp_path / "cache"
    with ServerProcess("--model", llama_folder, "--dtype", "bfloat16", "--served-model-name", MODEL,
                       "--max-model-len", "1024", "--kv-cache-memory", "64MB", "--block-size", "16",
                       "--max-num-batched-tokens", "256", "--log-stats-interval", "0.5",
                       env={"SCALELLM_CACHE_DIR": str(cache)}, timeout=600) as server:
        requests_of_every_kind(server.url, list(range(1000, 1600)))
        wait_idle(server.url)
        log = wait_for_line(server, "scalellm.stats: running")
    # the load's progress bar has a total and ends its line before the next log line
    assert re.search(r"loading weights: 100%\|[^\n]*\| (\d+)/\1 \[[^\n]*\]\n\d{4}-", log), log[:3000]
    warm_up = re.search(r"warm-up took [\d.]+ s: compiled (\d+) kernel build\(s\)", log)
    assert warm_up and int(warm_up.group(1)) > 0, log[:3000]
    assert "kernel compiled after warm-up" not in log, [line for line in log.splitlines() if "after warm-up" in line]
    assert glob.glob(str(cache / "numba" / "**" / "*.nbi"), recursive=True)  # the per-user cache, not the package
    # the request log and the stats line
    assert re.search(r"POST /v1/completions 200 finished cmpl-\w+: prompt 600, output 4 tokens, finish length, "
                     r"TTFT [\d.]+ s, E2E [\d.]+ s", log), log
    assert re.search(r"POST /v1/chat/completions 200 finished chatcmpl-\w+", log), log
    assert re.search(r"scalellm.stats: running \d+, waiting \d+ requests; prompt [\d.]+ tok/s, generation [\d.]+ "
                     r"tok/s; KV cache [\d.]+% used; prefix-cache hit rate [\d.]+%; \d+ preemptions", log), log


def test_a_compile_after_warm_up_is_reported(caplog):
    from numba import njit

    from scalellm.ops import jit

    jit.install()
    with jit.warming_up():
        pass
    before = jit.compiles_after_warm_up()

    @njit
    def late(x):
        return x + 1

    with caplog.at_level(logging.WARNING, logger="scalellm.ops.jit"):
        late(1)
    assert jit.compiles_after_warm_up() == before + 1
    assert "kernel compiled after warm-up: " in caplog.text and "late" in caplog.text
    with jit.warming_up():
        late(1.5)  # a compile during a warm-up is expected
    assert jit.compiles_after_warm_up() == before + 1


def test_disable_log_requests(llama_folder):
    with ServerProcess("--model", llama_folder, "--dtype", "float32", "--served-model-name", MODEL,
                       "--max-model-len", "512", "--kv-cache-memory", "16MB", "--disable-log-requests",
                       "--log-stats-interval", "0.3") as server:
        post_json(server.url, "/v1/completions", {"model": MODEL, "prompt": "Once", "max_tokens": 40,
                                                  "ignore_eos": True})
        wait_idle(server.url)
        log = wait_for_line(server, "scalellm.stats: running")
    assert "POST /v1/completions" not in log
    assert "scalellm.stats: running" in log  # the stats line stays


def get(url: str) -> tuple[int, dict]:
    import json

    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_metrics_count_rejected_requests_with_the_model_name(llama_server):
    url = llama_server.url
    before = scrape(url, model_name=MODEL)
    bad = urllib.request.Request(url + "/v1/completions", data=b'{"prompt": 3}',
                                 headers={"Content-Type": "application/json"})
    statuses = []
    for req in (bad, url + "/v1/no-such-route"):
        try:
            urllib.request.urlopen(req, timeout=10)
        except urllib.error.HTTPError as e:
            statuses.append(e.code)
    statuses.append(get(url + "/v1/models/no-such-model")[0])
    assert statuses == [400, 404, 404]
    after = scrape(url, model_name=MODEL)  # every series labelled with the served model's name, none `_created`
    key = 'scalellm:requests_total{outcome="rejected",status="%d"}'
    assert after[key % 400] - before.get(key % 400, 0) == 1
    assert after[key % 404] - before.get(key % 404, 0) == 2


def test_version_and_one_model(llama_server):
    import scalellm

    assert get(llama_server.url + "/version") == (200, {"version": scalellm.__version__})
    status, card = get(llama_server.url + f"/v1/models/{MODEL}")
    assert status == 200 and card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == 512
    status, body = get(llama_server.url + "/v1/models/gpt-5")
    assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"


def test_load_endpoint_and_cache_config_for_other_routers(llama_server):
    status, load = get(llama_server.url + "/load")
    assert status == 200 and set(load) == {"num_requests_running", "num_requests_waiting", "kv_cache_usage",
                                           "in_flight"}
    m = scrape(llama_server.url)
    configs = [k for k in m if k.startswith("vllm:cache_config_info{")]
    assert len(configs) == 1 and 'block_size="16"' in configs[0] and m[configs[0]] == 1.0
    assert "vllm:num_requests_waiting" in m and "vllm:kv_cache_usage_perc" in m


def run_command(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([SCALELLM, *args], capture_output=True, text=True, timeout=timeout)


def test_scalellm_serve_help_shows_every_default():
    out = run_command("serve", "--help")
    assert out.returncode == 0
    from scalellm.server.__main__ import build_parser

    # each flag's entry starts on a line indented by exactly two spaces
    entries = [" ".join(e.split()) for e in re.split(r"\n  (?=[-A-Z])", out.stdout.split("positional arguments:")[1])]
    entries = [e for e in entries if e and not e.startswith("-h,")]
    flags = [a for a in build_parser(model_positional=True)._actions if a.dest != "help"]
    assert len(entries) == len(flags), entries
    for entry in entries:
        assert "default" in entry, entry


def test_port_in_use_is_one_line(llama_folder):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = run_command("serve", llama_folder, "--port", str(port))
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode != 0
    assert len(lines) == 1 and f"127.0.0.1:{port} is already in use" in lines[0], lines


@pytest.mark.parametrize("model", ["HuggingFaceTB/SmolLM2-135M-Instruct", "/no/such/folder"])
def test_a_model_that_is_not_here_is_one_line(model):
    out = run_command("serve", model)
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, lines
    assert "nothing is downloaded" in lines[0]
    assert ("looks like a Hugging Face id" in lines[0]) == (not model.startswith("/"))


def test_the_dashboard_reports_loading_serving_and_draining(llama_long_folder):
    """What the page's state badge shows comes from /dashboard/snapshot: loading, then serving, then
    draining after SIGTERM while a request is still running."""
    import json
    import signal

    server = ServerProcess("--model", llama_long_folder, "--dtype", "float32", "--served-model-name", MODEL,
                           "--max-model-len", "65536", "--kv-cache-memory", "64MB", "--shutdown-grace", "30",
                           wait=False)

    def state() -> str | None:
        try:
            with urllib.request.urlopen(server.url + "/dashboard/snapshot", timeout=5) as r:
                return json.loads(r.read())["point"]["state"]
        except OSError:
            return None
    try:
        seen = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "serving" not in seen:
            s = state()
            if s and (not seen or seen[-1] != s):
                seen.append(s)
            time.sleep(0.05)
        assert seen == ["loading", "serving"], seen

        async def drain():
            async with aiohttp.ClientSession() as s:
                body = {"model": MODEL, "prompt": "Tell me everything", "max_tokens": 60000, "ignore_eos": True,
                        "stream": True}
                async with s.post(server.url + "/v1/completions", json=body) as r:
                    assert r.status == 200
                    await r.content.readline()
                    server.proc.send_signal(signal.SIGTERM)
                    return await asyncio.to_thread(wait_for_state, state, "draining")
        assert asyncio.run(drain())
    finally:
        server.stop(signal.SIGKILL)


def wait_for_state(state, wanted: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state() == wanted:
            return True
        time.sleep(0.05)
    return False
