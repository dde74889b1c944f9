"""The gateway: routing policies and pools (units), replica sources, and on loopback with real
replicas: failover after SIGKILL, client disconnects, admission, validation at the gateway, and
cache-aware routing against round robin."""
import asyncio
import contextlib
import json
import random
import signal
import statistics
import time
import urllib.request

import aiohttp
import pytest

from scalellm.gateway.replicas import Replica, ReplicaSet
from scalellm.gateway.routing import Router, prefix_hashes
from tests.server_utils import GatewayProcess, is_idle, llama_replica, scrape, wait_idle, wait_running

MODEL = "tiny-llama"


def healthy(*urls: str, pool: str | None = None) -> list[Replica]:
    return [Replica(u, pool, state="healthy") for u in urls]


# -- routing ---------------------------------------------------------------------------------------
def test_round_robin_least_load_and_power_of_two():
    a, b, c = healthy("a", "b", "c")
    rr = Router("round_robin")
    assert [rr.choose([a, b, c], 0).url for _ in range(6)] == ["a", "b", "c"] * 2
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 2
    assert Router("least_load").choose([a, b, c], 6) is b
    p2 = Router("power_of_two", seed=0)
    picks = [p2.choose([a, b, c], 6).url for _ in range(300)]
    assert picks.count("a") == 0  # the most loaded never wins a pair
    assert picks.count("b") > picks.count("c") > 0


def test_session_is_sticky_within_a_load_bound():
    replicas = healthy("a", "b", "c", "d")
    router = Router("session", session_epsilon=0.25)
    home = {s: router.choose(replicas, 0, session=s).url for s in (f"user-{i}" for i in range(40))}
    assert len(set(home.values())) >= 3  # sessions spread over the ring
    for s, url in home.items():
        assert router.choose(replicas, 0, session=s).url == url
    busy = next(r for r in replicas if r.url == home["user-0"])
    busy.in_flight = 10  # far above the mean: the session moves on along the ring
    moved = router.choose(replicas, 10, session="user-0")
    assert moved is not busy
    assert router.choose(replicas, 10, session="user-0") is moved  # and moves consistently


def test_cache_aware_prefers_the_longest_prefix_unless_imbalanced():
    a, b, c = healthy("a", "b", "c")
    router = Router("cache_aware", chunk_chars=16, load_bound=2)
    system = "You are a helpful assistant. " * 8
    first = router.choose([a, b, c], 0, system + "Q1")
    first.in_flight = 1
    assert router.choose([a, b, c], 1, system + "Q2") is first  # within the bound: the cached prefix wins
    longer = system + "Tell me about the sea. " * 4
    other = next(r for r in (a, b, c) if r is not first)
    router.index.clear()
    for h in prefix_hashes(system, 16):
        router.index[h] = {first.url}
    for h in prefix_hashes(longer, 16):
        router.index.setdefault(h, set()).add(other.url)
    other.in_flight = first.in_flight = 0
    assert router.choose([a, b, c], 0, longer + "?") is other  # the longest match
    other.in_flight = 5  # beyond the load bound of the least loaded: plain load balancing
    assert router.choose([a, b, c], 5, longer + "?") is not other


def test_pools_below_and_above_the_threshold():
    latency = healthy("l1", "l2", pool="latency")
    throughput = healthy("t1", "t2", pool="throughput")
    router = Router("least_load", pool_threshold=64)
    everyone = latency + throughput
    assert {router.choose(everyone, n).pool for n in (0, 10, 63)} == {"latency"}
    assert {router.choose(everyone, n).pool for n in (64, 65, 500)} == {"throughput"}
    assert router.choose(throughput, 0).pool == "throughput"  # no routable latency replica: fall back
    assert router.choose(healthy("x", "y"), 1000).url in ("x", "y")  # no pools: all replicas


# -- replica sources -------------------------------------------------------------------------------
def test_dns_names_expand_to_every_address_and_a_file_adds_and_removes(tmp_path):
    answers = {"replicas.svc": ["10.0.0.1", "10.0.0.2"]}

    async def resolver(host, port):
        if host not in answers:
            raise OSError("no such host")
        return answers[host]

    listing = tmp_path / "replicas.txt"
    listing.write_text("http://127.0.0.1:9001,pool=latency\n# a comment\nhttp://127.0.0.1:9002\n")

    async def main():
        rs = ReplicaSet(["http://replicas.svc:8000", "http://127.0.0.1:9000"], str(listing), resolver=resolver)
        await rs.refresh_dns()
        await rs.refresh_file()
        live = lambda: {u: r.pool for u, r in rs.replicas.items() if r.state != "removed"}  # noqa: E731
        assert live() == {"http://10.0.0.1:8000": None, "http://10.0.0.2:8000": None, "http://127.0.0.1:9000": None,
                          "http://127.0.0.1:9001": "latency", "http://127.0.0.1:9002": None}
        answers["replicas.svc"] = ["10.0.0.2", "10.0.0.3"]  # a pod replaced
        await rs.refresh_dns()
        assert {"http://10.0.0.3:8000", "http://10.0.0.2:8000"} <= set(live()) and "http://10.0.0.1:8000" not in live()
        del answers["replicas.svc"]  # a failed lookup keeps what it had
        await rs.refresh_dns()
        assert "http://10.0.0.3:8000" in live()
        time.sleep(0.01)
        listing.write_text("http://127.0.0.1:9002\nhttp://127.0.0.1:9003,pool=throughput\n")
        await rs.refresh_file()
        assert "http://127.0.0.1:9001" not in live() and live()["http://127.0.0.1:9003"] == "throughput"
    asyncio.run(main())


# -- on loopback -----------------------------------------------------------------------------------
@contextlib.contextmanager
def fleet(folder: str, n: int, *gateway_args: str, replica_args: tuple[str, ...] = ()):
    replicas = [llama_replica(folder, *replica_args, wait=False) for _ in range(n)]
    gateway = None
    try:
        for r in replicas:
            r.wait_healthy(120)
        gateway = GatewayProcess(*[a for r in replicas for a in ("--replica", r.url)], *gateway_args)
        deadline = time.monotonic() + 30
        while sum(r["state"] == "healthy" for r in gateway.replicas()) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        yield gateway, replicas
    finally:
        if gateway is not None:
            gateway.stop()
        for r in replicas:
            r.stop()


LONG = {"model": MODEL, "prompt": "Tell me everything", "max_tokens": 400, "ignore_eos": True}


def test_a_killed_replica_is_ejected_and_readmitted(llama_folder):
    with fleet(llama_folder, 3, "--policy", "round_robin", "--eject-seconds", "0.5") as (gateway, replicas):
        victim = replicas[1]

        async def main():
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as s:
                async def stream(i):
                    body = {**LONG, "max_tokens": 200, "stream": True, "prompt": f"Stream {i}"}
                    async with s.post(gateway.url + "/v1/completions", json=body) as r:
                        events = [line async for line in r.content if line.startswith(b"data: ")]
                    return r.status, events
                tasks = [asyncio.create_task(stream(i)) for i in range(24)]
                await asyncio.sleep(1.0)  # every stream is running
                victim.proc.send_signal(signal.SIGKILL)
                results = await asyncio.gather(*tasks)  # none hangs (the session's timeout would fail it)
                after = []
                for i in range(9):
                    async with s.post(gateway.url + "/v1/completions", json={**LONG, "max_tokens": 4}) as r:
                        after.append(r.status)
                return results, after
        results, after = asyncio.run(main())
        # the victim's streams go on elsewhere (tests/test_gateway_resume.py): every stream finishes whole
        assert all(status == 200 and events[-1] == b"data: [DONE]\n" and len(events) == 201 for status, events in results)
        assert after == [200] * 9  # requests after the kill all succeed on the others
        states = {r["url"]: r["state"] for r in gateway.replicas()}
        assert states[victim.url] in ("ejected", "down")
        victim.stop()
        restarted = llama_replica(llama_folder, port=victim.port)  # the same address comes back
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if {r["url"]: r["state"] for r in gateway.replicas()}[victim.url] == "healthy":
                    break
                time.sleep(0.2)
            assert {r["url"]: r["state"] for r in gateway.replicas()}[victim.url] == "healthy"
        finally:
            restarted.stop()


def test_client_disconnects_free_every_replicas_kv_cache(llama_folder):
    with fleet(llama_folder, 2, "--policy", "round_robin") as (gateway, replicas):
        async def main():
            async with aiohttp.ClientSession() as s:
                async def leave_stream(i):
                    body = {**LONG, "stream": True, "prompt": f"Stream {i}"}
                    async with s.post(gateway.url + "/v1/completions", json=body) as r:
                        await r.content.readline()
                        r.close()

                async def leave_plain(i):
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(s.post(gateway.url + "/v1/completions",
                                                      json={**LONG, "prompt": f"Plain {i}"}), 0.5)
                await asyncio.gather(*(leave_stream(i) for i in range(4)), *(leave_plain(i) for i in range(4)))
        asyncio.run(main())
        for r in replicas:
            m = wait_idle(r.url, timeout=20)
            assert m["scalellm:kv_cache_usage_perc"] == 0 and m["scalellm:num_requests_running"] == 0, r.url
            assert m['scalellm:request_success_total{finished_reason="abort"}'] >= 1, r.url  # both were used


def test_bad_input_stops_at_the_gateway_and_request_ids_pass_through(llama_long_folder):
    with fleet(llama_long_folder, 1, "--max-in-flight", "1", "--max-queue", "1",
               replica_args=("--max-model-len", "65536")) as (gateway, (replica,)):
        before = scrape(replica.url)
        req = urllib.request.Request(gateway.url + "/v1/completions", data=b'{"prompt": 3}',
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 400 and json.loads(e.value.read())["error"]["param"] == "prompt"
        assert scrape(replica.url).get('scalellm:requests_total{outcome="rejected",status="400"}', 0) == \
            before.get('scalellm:requests_total{outcome="rejected",status="400"}', 0)  # never reached the replica
        req = urllib.request.Request(gateway.url + "/v1/completions", headers={
            "Content-Type": "application/json", "x-request-id": "trace-123"},
            data=json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.headers["x-request-id"] == "trace-123"
        assert "trace-123" in gateway.output()

        async def admission():
            async with aiohttp.ClientSession() as s:
                async def endless():
                    body = {**LONG, "max_tokens": 60000, "stream": True}
                    async with s.post(gateway.url + "/v1/completions", json=body) as r:
                        await r.content.readline()
                        await asyncio.sleep(60)
                tasks = [asyncio.create_task(endless()) for _ in range(2)]  # one in flight, one queued
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    async with s.get(gateway.url + "/replicas") as r:
                        state = await r.json()
                    if state["in_flight"] == 1 and state["queued"] == 1:
                        break
                    await asyncio.sleep(0.05)
                async with s.post(gateway.url + "/v1/completions", json={**LONG, "max_tokens": 2}) as r:
                    third = r.status, r.headers.get("Retry-After"), (await r.json())["error"]["code"]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                return state, third
        state, third = asyncio.run(admission())
        assert (state["in_flight"], state["queued"]) == (1, 1)
        assert third == (503, "1", "server_overloaded")
        assert is_idle(wait_idle(replica.url))  # the abandoned endless request was aborted


def test_a_busy_replica_is_relayed_not_ejected(llama_long_folder):
    """A replica at capacity answers 503 with Retry-After: with nowhere else to go the client gets that
    answer, and the replica stays in rotation (busy is not broken)."""
    with fleet(llama_long_folder, 1, "--eject-after", "2", replica_args=(
            "--max-model-len", "65536", "--max-num-seqs", "1", "--max-queue-len", "0")) as (gateway, (replica,)):
        async def main():
            async with aiohttp.ClientSession() as s:
                async def endless():
                    async with s.post(gateway.url + "/v1/completions",
                                      json={**LONG, "max_tokens": 60000, "stream": True}) as r:
                        await r.content.readline()
                        await asyncio.sleep(60)
                hog = asyncio.create_task(endless())
                await asyncio.to_thread(wait_running, replica.url, 1)
                answers = []
                for _ in range(4):
                    async with s.post(gateway.url + "/v1/completions", json={**LONG, "max_tokens": 2}) as r:
                        answers.append((r.status, (await r.json())["error"]["code"]))
                hog.cancel()
                await asyncio.gather(hog, return_exceptions=True)
                return answers
        answers = asyncio.run(main())
        assert answers == [(503, "server_overloaded")] * 4
        assert [r["state"] for r in gateway.replicas()] == ["healthy"]


@pytest.fixture(scope="module")
def wide_llama_folder(tmp_path_factory):
    """A test llama wide enough that a 1,400-token prefill costs real time (~0.2 s on one core)."""
    from tests.checkpoints import build_checkpoint

    return build_checkpoint("llama", str(tmp_path_factory.mktemp("ckpt-llama-wide")), hidden_size=256,
                            intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                            max_position_embeddings=2048)


def test_cache_aware_routing_beats_round_robin(wide_llama_folder):
    """16 distinct ~1,400-token system prompts, each followed by short questions, over 4 replicas."""
    rng_words = [f"w{i}" for i in range(4000)]
    systems = [" ".join(rng_words[(s * 97 + k * 13) % 4000] for k in range(300)) for s in range(16)]  # ~1,400 tokens
    order = [(s, q) for q in range(5) for s in range(16)]
    random.Random(0).shuffle(order)  # users arrive in no particular order

    def run(policy: str) -> tuple[float, float, list[int]]:
        # room for ~5 of the 16 prefixes per replica (4 KiB per token): round robin, sending every
        # prefix everywhere, must evict; cache-aware routing keeps each replica's share resident
        args = ("--max-model-len", "2048", "--kv-cache-memory", "28MB", "--max-num-batched-tokens", "2048")
        with fleet(wide_llama_folder, 4, "--policy", policy, "--chunk-chars", "512",
                   replica_args=args) as (gateway, replicas):
            async def main():
                ttfts = []
                async with aiohttp.ClientSession() as s:
                    sem = asyncio.Semaphore(2)  # light load: TTFT is mostly the prefill the cache saves

                    async def ask(system, q):  # one token: its latency is the time to first token
                        body = {"model": MODEL, "max_tokens": 1,
                                "messages": [{"role": "system", "content": system},
                                             {"role": "user", "content": f"Question {q}?"}]}
                        async with sem:
                            start = time.monotonic()
                            async with s.post(gateway.url + "/v1/chat/completions", json=body) as r:
                                assert r.status == 200
                                await r.read()
                            ttfts.append(time.monotonic() - start)
                    await asyncio.gather(*(ask(systems[i], q) for i, q in order))
                return ttfts
            ttfts = asyncio.run(main())
            metrics = [scrape(r.url) for r in replicas]
            served_key = 'scalellm:requests_total{outcome="finished",status="200"}'
            if policy == "cache_aware":  # a uniform workload (nothing shared) is plain load balancing
                async def uniform():
                    async with aiohttp.ClientSession() as s:
                        sem = asyncio.Semaphore(8)

                        async def one(i):
                            body = {"model": MODEL, "max_tokens": 8, "ignore_eos": True,
                                    "prompt": " ".join(rng_words[(i * 31 + k * 7) % 4000] for k in range(60))}
                            async with sem, s.post(gateway.url + "/v1/completions", json=body) as r:
                                assert r.status == 200
                        await asyncio.gather(*(one(i) for i in range(40)))
                asyncio.run(uniform())
                uniform_served = [scrape(r.url).get(served_key, 0) - m.get(served_key, 0)
                                  for r, m in zip(replicas, metrics)]
                assert max(uniform_served) <= 1.5 * 40 / 4, uniform_served
        hits = sum(m["scalellm:prefix_cache_hits_total"] for m in metrics)
        queries = sum(m["scalellm:prefix_cache_queries_total"] for m in metrics)
        served = [int(m.get(served_key, 0)) for m in metrics]
        return hits / queries, statistics.median(ttfts), served

    aware_rate, aware_ttft, aware_served = run("cache_aware")  # served: each replica's share of the prefixes
    rr_rate, rr_ttft, _ = run("round_robin")
    print(f"prefix-cache hit rate {aware_rate:.3f} vs {rr_rate:.3f}, TTFT p50 {aware_ttft * 1000:.1f} vs "
          f"{rr_ttft * 1000:.1f} ms, served per replica {aware_served}")
    assert aware_rate >= 2 * rr_rate, (aware_rate, rr_rate)
    assert aware_ttft < rr_ttft, (aware_ttft, rr_ttft)


def test_launch_splits_the_cores_and_restarts_a_replica_that_dies(llama_folder):
    import os

    gateway = GatewayProcess("--launch", "2", "--", "--model", llama_folder, "--dtype", "float32",
                             "--served-model-name", MODEL, "--max-model-len", "512", "--kv-cache-memory", "16MB",
                             timeout=180)
    try:
        deadline = time.monotonic() + 120
        while sum(r["state"] == "healthy" for r in gateway.replicas()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        replicas = gateway.replicas()
        assert [r["state"] for r in replicas] == ["healthy"] * 2
        cores = [os.sched_getaffinity(r["pid"]) for r in replicas]
        assert all(cores) and (len(os.sched_getaffinity(0)) < 2 or not cores[0] & cores[1])  # shares, not overlaps
        with urllib.request.urlopen(urllib.request.Request(
                gateway.url + "/v1/completions", data=json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 3}).encode(),
                headers={"Content-Type": "application/json"}), timeout=30) as r:
            assert r.status == 200
        victim = replicas[0]
        os.kill(victim["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            now = {r["url"]: r for r in gateway.replicas()}[victim["url"]]
            if now["pid"] != victim["pid"] and now["state"] == "healthy":
                break
            time.sleep(0.2)
        assert now["pid"] != victim["pid"] and now["state"] == "healthy", now
    finally:
        gateway.stop()
    assert "starting it again" in gateway.output()
