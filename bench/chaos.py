"""Chaos run: the gateway over three replicas of the tiny test llama, under steady load, hostile
clients, bursts and replica kills, for N minutes; then the evidence that nothing hung, leaked or ran twice.

    .venv/bin/python bench/chaos.py [--minutes 10]

Everything stays on 127.0.0.1 and stops by itself. What runs, all at once:

* steady load: streaming and non-streamed /v1/completions and /v1/chat/completions, a few at a time;
* random client disconnects: a stream closed after a random number of events, or any request closed
  after a random delay;
* slow readers: a raw socket with a small receive buffer, read a few hundred bytes at a time with
  sleeps, sometimes stalled for many seconds; the replicas run with `--max-stream-buffer-bytes 16384`,
  so that one falling behind is disconnected (a server that drops one has done its job: counted apart
  as "slow reader disconnected", from what the client saw and the replicas' logs);
* a burst of 10x the steady concurrency, short and non-streamed, every minute; replicas and gateway
  run with small admission limits so that a burst overflows and must get fast 503s;
* a replica SIGKILLed every two minutes and restarted on the same port.

Every client request carries its own x-request-id (the gateway passes it to each replica it tries,
and each replica writes it in its request log line) and a deadline (default 60 s): one still open at
its deadline is "hung". At the end the replicas' /load must show nothing running and no KV pages in
use, and the RSS of every process (read from /proc every few seconds) must not trend upwards.
Results: bench/results/chaos.{md,json,png}; process logs in bench/.cache/logs/chaos/.

This module starts the run and orchestrates it; the rest is in chaos_procs (the processes: start, kill,
restart, /proc, /load), chaos_load (the clients and each request's outcome), chaos_logs (reading the
processes' logs), chaos_analysis (the summary and its must-show) and chaos_report (chaos.md and .png).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import sys
import time

import aiohttp

BENCH = os.path.dirname(os.path.abspath(__file__))
_path = list(sys.path)
sys.path.insert(0, BENCH)
try:
    from harness import LOGS, PY, ROOT, free_port  # noqa: E402
    import chaos_report  # noqa: E402
    from chaos_analysis import analyse  # noqa: E402
    from chaos_load import MODEL_NAME, Load  # noqa: E402
    from chaos_procs import (Service, cpu_seconds, end_state as replica_end_state, gateway_state,  # noqa: E402
                             rss_mb, wait_busy, wait_routable)
finally:
    sys.path[:] = _path  # imported from elsewhere (a test): leave no bench/ on the path

RESULTS = os.path.join(BENCH, "results")


def default_config(minutes: float) -> dict:
    return {
        "minutes": minutes,
        "replicas": 3,
        "stream_workers": 3,  # closed-loop clients that stream (some disconnect early)
        "plain_workers": 2,  # closed-loop clients that do not stream (some disconnect early)
        "slow_workers": 1,  # closed-loop clients that stream and read slowly
        "think_s": 0.2,  # each steady client pauses up to this long between requests
        "disconnect_share": 0.2,  # of steady requests: the client closes the connection early
        "slow_read_bytes": 256, "slow_read_pause_s": 0.1, "slow_stall_share": 0.3, "slow_stall_s": (8.0, 16.0),
        "max_tokens_stream": (32, 256), "max_tokens_plain": (16, 64), "max_tokens_burst": 16,
        "burst_every_s": 60.0, "burst_first_s": 30.0, "burst_factor": 10,
        "kill_every_s": 120.0, "kill_targets": None,  # None: every replica but replica 0 in turn
        "deadline_s": 60.0,
        "rss_interval_s": 2.0,
        "settle_s": 5.0,  # after the last request ends, before reading each replica's /load
        "replica_max_num_seqs": 4, "replica_max_queue_len": 4,
        "replica_max_stream_buffer_bytes": 16384,  # unread bytes before a replica disconnects a slow reader
        "gateway_max_in_flight": 24, "gateway_max_queue": 8,
        "health_interval_s": 0.5, "eject_seconds": 1.0,
        "seed": 0,
    }


# -- the run -----------------------------------------------------------------------------------

async def _chaos(cfg: dict, model: str, log_dir: str) -> dict:
    rng = random.Random(cfg["seed"])
    n = cfg["replicas"]
    duration = cfg["minutes"] * 60.0
    server_flags = ["--model", model, "--served-model-name", MODEL_NAME, "--dtype", "float32", "--max-model-len", "512",
                    "--kv-cache-memory", "64MB", "--block-size", "16", "--num-threads", "1",
                    "--max-num-seqs", str(cfg["replica_max_num_seqs"]),
                    "--max-queue-len", str(cfg["replica_max_queue_len"]),
                    "--max-stream-buffer-bytes", str(cfg["replica_max_stream_buffer_bytes"]), "--host", "127.0.0.1"]
    replicas = []
    for i in range(n):
        port = free_port()
        replicas.append(Service(f"replica{i}", [PY, "-m", "scalellm.server", *server_flags, "--port", str(port)],
                                port, log_dir))
    gport = free_port()
    gateway = Service("gateway", [PY, "-m", "scalellm.gateway", "--host", "127.0.0.1", "--port", str(gport),
                                  *[a for r in replicas for a in ("--replica", r.url)],
                                  "--health-interval", str(cfg["health_interval_s"]),
                                  "--eject-seconds", str(cfg["eject_seconds"]),
                                  "--max-in-flight", str(cfg["gateway_max_in_flight"]),
                                  "--max-queue", str(cfg["gateway_max_queue"])], gport, log_dir)
    services = [gateway, *replicas]
    targets = cfg["kill_targets"] if cfg["kill_targets"] is not None else list(range(1, n)) or [0]
    kills: list[dict] = []
    bursts: list[dict] = []
    rss: list[dict] = []
    end_state: dict = {}
    ctl = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
    load = None
    try:
        for r in replicas:
            r.spawn()
        for r in replicas:
            await r.wait_ready(ctl)
        gateway.spawn()
        await gateway.wait_ready(ctl, timeout=60)
        await wait_routable(ctl, gateway.url, n)

        t0 = time.time()
        loadavg = [os.getloadavg()]
        client_cpu = time.process_time()
        load = Load(gateway.url, cfg, t0, rng)
        load.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=None),
                                             trace_configs=[load.trace_config()])
        load.burst_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                                                   timeout=aiohttp.ClientTimeout(total=None),
                                                   trace_configs=[load.trace_config()])

        async def sample_rss() -> None:
            while True:
                now = time.time() - t0
                for s in services:
                    inc = s.current
                    if inc["ended"] is None:
                        mb, cpu = rss_mb(inc["pid"]), cpu_seconds(inc["pid"])
                        if mb is not None:
                            rss.append({"t": now, "process": s.name, "incarnation": inc["index"], "mb": mb,
                                        "cpu_s": cpu})
                await asyncio.sleep(cfg["rss_interval_s"])

        async def bursts_loop() -> None:
            size = cfg["burst_factor"] * (cfg["stream_workers"] + cfg["plain_workers"] + cfg["slow_workers"])
            k = 0
            while True:
                at = cfg["burst_first_s"] + k * cfg["burst_every_s"]
                if at >= duration:
                    return
                await asyncio.sleep(max(0.0, t0 + at - 2.0 - time.time()))
                await load.warm_burst_pool(size)
                await asyncio.sleep(max(0.0, t0 + at - time.time()))
                bursts.append({"index": k, "t": time.time() - t0, "size": size})
                load.burst(k, size)
                k += 1

        async def kills_loop() -> None:
            k = 0
            while True:
                at = (k + 1) * cfg["kill_every_s"]
                if at >= duration:
                    return
                await asyncio.sleep(max(0.0, t0 + at - time.time()))
                r = replicas[targets[k % len(targets)]]
                busy = await wait_busy(ctl, r.url, 2, 5.0)  # a kill that hits requests in flight
                pid = r.current["pid"]
                r.kill()
                event = {"t": time.time() - t0, "replica": r.name, "url": r.url, "pid": pid, "restart_s": None,
                         "running_at_kill": busy}
                kills.append(event)
                r.spawn()
                event["new_pid"] = r.current["pid"]
                try:
                    event["restart_s"] = await r.wait_ready(ctl)
                except (RuntimeError, TimeoutError) as e:  # the end state will show this replica missing
                    event["restart_error"] = str(e)
                    return
                k += 1

        background = [asyncio.create_task(sample_rss())]
        kill_task = asyncio.create_task(kills_loop())
        burst_task = asyncio.create_task(bursts_loop())
        workers = [asyncio.create_task(load.stream_worker()) for _ in range(cfg["stream_workers"])]
        workers += [asyncio.create_task(load.plain_worker()) for _ in range(cfg["plain_workers"])]
        workers += [asyncio.create_task(load.slow_worker()) for _ in range(cfg["slow_workers"])]
        await asyncio.sleep(max(0.0, t0 + duration - time.time()))
        load.stopping.set()
        loadavg.append(os.getloadavg())
        client_cpu = time.process_time() - client_cpu
        burst_task.cancel()
        # every request ends by its deadline at the latest; a kill under way finishes its restart
        await asyncio.gather(*workers, *list(load.tasks), return_exceptions=True)
        await asyncio.gather(kill_task, return_exceptions=True)
        load_end = time.time() - t0
        await asyncio.sleep(cfg["settle_s"])
        for r in replicas:
            end_state[r.name] = await replica_end_state(ctl, r.url)
        end_state["gateway"] = await gateway_state(ctl, gateway.url)
        await asyncio.sleep(cfg["rss_interval_s"])
        for t in background:
            t.cancel()
        await asyncio.gather(*background, return_exceptions=True)
    finally:
        if load is not None:
            for sess in (load.session, load.burst_session):
                if sess is not None:
                    await sess.close()
        await ctl.close()
        for s in services:
            s.stop()
    return {"t0": t0, "duration_s": duration, "load_end_s": load_end, "records": load.records, "kills": kills,
            "bursts": bursts, "rss": rss, "end_state": end_state, "loadavg": loadavg,
            "client_cpu_s": client_cpu,
            "services": {s.name: {"url": s.url, "cmd": s.cmd, "incarnations": s.incarnations} for s in services}}


def run_chaos(minutes: float = 10.0, out_dir: str = RESULTS, log_dir: str | None = None, model: str | None = None,
              name: str = "chaos", **overrides) -> dict:
    """Run the chaos load for `minutes` (any config key of default_config can be overridden), write
    <out_dir>/<name>.{md,json,png} and return the summary, whose `must_show` maps each requirement
    to True (met) or False."""
    wall0 = time.time()
    cfg = default_config(minutes)
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise TypeError(f"unknown chaos settings: {sorted(unknown)}")
    cfg.update(overrides)
    log_dir = log_dir or os.path.join(LOGS, "chaos")
    os.makedirs(log_dir, exist_ok=True)
    for f in os.listdir(log_dir):
        if f.endswith(".log"):
            os.remove(os.path.join(log_dir, f))
    if model is None:
        model = os.path.join(BENCH, ".cache", "chaos-llama")
        if not os.path.exists(os.path.join(model, "config.json")):
            sys.path.insert(0, ROOT)
            try:
                from tests.checkpoints import build_checkpoint
            finally:
                sys.path.remove(ROOT)
            build_checkpoint("llama", model)
    raw = asyncio.run(_chaos(cfg, model, log_dir))
    summary = analyse(raw, cfg)
    summary["wall_s"] = time.time() - wall0
    summary["t0_epoch"] = raw["t0"]  # the load's start: every "t", "start", "end" is relative to it
    summary["log_dir"] = log_dir
    summary["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, name)
    with open(os.path.join(log_dir, "requests.json"), "w") as f:  # every request, for digging
        json.dump(raw["records"], f)
    with open(base + ".json", "w") as f:
        json.dump({"summary": summary, "rss": [{k: round(v, 2) if isinstance(v, float) else v for k, v in p.items()}
                                               for p in raw["rss"]]}, f, indent=1)
    chaos_report.plot(raw, summary, base + ".png")
    with open(base + ".md", "w") as f:
        f.write(chaos_report.markdown(summary, os.path.basename(base) + ".png"))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    ap.add_argument("--kill-every", type=float, default=120.0, help="seconds between replica kills (default 120)")
    ap.add_argument("--burst-every", type=float, default=60.0, help="seconds between bursts (default 60)")
    ap.add_argument("--burst-first", type=float, default=None, help="when the first burst comes (default: half of "
                    "--burst-every)")
    ap.add_argument("--deadline", type=float, default=60.0, help="each request's deadline in seconds (default 60)")
    ap.add_argument("--out-dir", default=RESULTS, help="where chaos.{md,json,png} go (default bench/results)")
    ap.add_argument("--name", default="chaos", help="file name of the results (default chaos)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    summary = run_chaos(args.minutes, args.out_dir, name=args.name, kill_every_s=args.kill_every,
                        burst_every_s=args.burst_every,
                        burst_first_s=args.burst_every / 2 if args.burst_first is None else args.burst_first,
                        deadline_s=args.deadline, seed=args.seed)
    print(open(os.path.join(args.out_dir, args.name + ".md")).read())
    print("must-show: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in summary["must_show"].items()))
    sys.exit(0 if all(summary["must_show"].values()) else 1)


if __name__ == "__main__":
    main()
