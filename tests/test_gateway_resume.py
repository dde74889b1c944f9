"""A replica SIGKILLed in the middle of a stream: the gateway resumes the stream on another replica and
the client's stream is the uninterrupted run's, token for token (float32, unquantized)."""
import asyncio
import json
import signal
import time
import urllib.request

import aiohttp
import pytest

from tests.server_utils import llama_replica
from tests.test_gateway import fleet
from tests.test_resume import by_choice, close, text_of

MODEL = "tiny-llama"
REPLICA_ARGS = ("--quantization", "none", "--max-model-len", "1024")


def sse_events(raw: bytes) -> list:
    assert raw.endswith(b"\n\n"), raw[-300:]
    events = []
    for event in raw[:-2].split(b"\n\n"):
        assert event.startswith(b"data: ") and b"\n" not in event, event[:300]  # no id line reaches the client
        data = event[6:]
        events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return events


def direct(url: str, path: str, body: dict) -> list:
    req = urllib.request.Request(url + path, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return sse_events(r.read())


def busy_replica(gateway, replicas):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for r in gateway.replicas():
            if r["in_flight"]:
                return next(p for p in replicas if p.url == r["url"])
        time.sleep(0.005)
    raise AssertionError("no replica is serving the stream")


def kill_mid_stream(gateway, replicas, path: str, body: dict, after: int = 100):
    """Stream through the gateway; once `after` events arrived, SIGKILL the replica serving it; read on."""
    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            async with s.post(gateway.url + path, json={**body, "stream": True}) as r:
                assert r.status == 200
                raw, victim = bytearray(), None
                async for chunk in r.content.iter_any():
                    raw += chunk
                    if victim is None and raw.count(b"\n\n") >= after:
                        victim = busy_replica(gateway, replicas)
                        victim.proc.send_signal(signal.SIGKILL)
                return bytes(raw), victim
    raw, victim = asyncio.run(main())
    assert victim is not None, "the stream ended before the kill"
    victim.proc.wait(10)
    return sse_events(raw), victim


def gateway_metric(gateway, name: str) -> float:
    """A gateway metric's sum over its labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(gateway.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def resumed_count(gateway) -> float:
    return gateway_metric(gateway, "scalellm_gateway:streams_resumed_total")


def check_same(got: list, expected: list) -> None:
    assert got.count("[DONE]") == 1 and got[-1] == "[DONE]"
    assert len({c["id"] for c in got if c != "[DONE]"}) == 1  # one stream, under one id
    strip = [[{k: v for k, v in c.items() if k not in ("id", "created")} if c != "[DONE]" else c for c in x]
             for x in (got, expected)]
    close(by_choice(strip[0]), by_choice(strip[1]))


def restart(gateway, victim, folder):
    replica = llama_replica(folder, *REPLICA_ARGS, port=victim.port)
    deadline = time.monotonic() + 30
    while {r["url"]: r["state"] for r in gateway.replicas()}[victim.url] != "healthy":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return replica


@pytest.mark.timeout(600)
def test_killed_mid_stream_the_client_gets_the_uninterrupted_run(llama_folder):
    with fleet(llama_folder, 2, "--policy", "round_robin", "--eject-seconds", "0.3",
               replica_args=REPLICA_ARGS) as (gateway, replicas):
        cases = [
            ("/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 800, "temperature": 0,
                                 "ignore_eos": True, "logprobs": 2, "stream_options": {"include_usage": True}}),
            ("/v1/completions", {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 800,
                                 "temperature": 1.0, "seed": 17, "ignore_eos": True}),
            ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}],
                                      "max_tokens": 800, "temperature": 0.9, "seed": 5, "n": 2, "ignore_eos": True,
                                      "logprobs": True, "top_logprobs": 2, "stream_options": {"include_usage": True}}),
        ]
        # the chat case also stops at a string: one from late in its first choice's uninterrupted text
        path, body = cases[2]
        text = text_of(direct(replicas[0].url, path, body), 0)
        body["stop"] = [text[1500:1506], "no such stop"]
        started = []
        try:
            for path, body in cases:
                before = resumed_count(gateway)
                got, victim = kill_mid_stream(gateway, replicas, path, body)
                survivor = next(r for r in replicas if r is not victim)
                check_same(got, direct(survivor.url, path, body))
                assert resumed_count(gateway) == before + 1
                replacement = restart(gateway, victim, llama_folder)
                started.append(replacement)
                replicas[replicas.index(victim)] = replacement
            assert text_of(got, 0) == text[:1500]  # the stop string ended choice 0 after the resume
            assert gateway_metric(gateway, "scalellm_gateway:resume_gap_seconds_count") == 3
        finally:
            for r in started:
                r.stop()
