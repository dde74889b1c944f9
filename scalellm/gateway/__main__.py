"""python -m scalellm.gateway: one OpenAI endpoint over many server replicas.

    python -m scalellm.gateway --replica http://10.0.0.5:8000 --replica http://10.0.0.6:8000,pool=throughput
    python -m scalellm.gateway --launch 2 -- --model /path/to/model     # flags after -- go to each server
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import sys

from aiohttp import web

from scalellm.gateway.routing import POLICIES

log = logging.getLogger("scalellm.gateway")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m scalellm.gateway", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    add("--port", type=int, default=8080, help="port (default 8080)")
    add("--replica", action="append", default=[], metavar="URL[,pool=NAME]",
        help="a replica (repeatable); a host name resolving to several addresses is one replica per address")
    add("--replicas-file", default=None,
        help="one URL[,pool=NAME] per line; re-read when it changes (a replica taken out is drained and stays out)")
    add("--launch", type=int, default=0, metavar="N",
        help="start N local scalellm.server processes (flags after -- go to each), cores split between them")
    add("--policy", default="power_of_two", choices=POLICIES, help="routing policy (default power_of_two)")
    add("--pool-threshold", type=int, default=64,
        help="in-flight requests below which the latency pool serves, above which the throughput pool (default 64)")
    add("--session-header", default="x-session-id", help="header the session policy hashes (default x-session-id)")
    add("--chunk-chars", type=int, default=256, help="cache_aware: characters per hashed prompt chunk (default 256)")
    add("--load-bound", type=int, default=8,
        help="cache_aware: most extra in-flight requests a replica may have over the least loaded (default 8)")
    add("--api-key", default=None,
        help="require 'Authorization: Bearer KEY' from the gateway's clients on every path but /health and "
             "/dashboard (never sent to replicas)")
    add("--upstream-api-key", default=None, metavar="KEY",
        help="sent to the replicas as 'Authorization: Bearer KEY' (requests, health checks); with --launch, "
             "each launched server requires it")
    add("--max-in-flight", type=int, default=1024, help="requests forwarded at once (default 1024)")
    add("--max-queue", type=int, default=1024, help="requests waiting beyond that before 503 (default 1024)")
    add("--max-body-bytes", type=int, default=8 << 20, help="largest accepted request body (default 8 MiB)")
    add("--retries", type=int, default=2,
        help="other replicas tried when one provably did not run the request: connection refused or lost before "
             "any byte of the answer, 503 with Retry-After, 429 (default 2)")
    add("--health-interval", type=float, default=2.0,
        help="seconds between health checks, each also reading the replica's models (default 2)")
    add("--eject-after", type=int, default=3,
        help="consecutive failures (5xx answers, connections lost) that eject a replica; a refused connection "
             "ejects at once, a timeout never (default 3)")
    add("--eject-seconds", type=float, default=5.0, help="seconds before an ejected replica is probed (default 5)")
    add("--dns-interval", type=float, default=10.0, help="seconds between DNS lookups of replica names (default 10)")
    add("--request-timeout", type=float, default=600.0,
        help="most seconds between bytes from a replica; beyond, the client gets 504 (mid-stream an error "
             "event) and the request is not re-sent (default 600)")
    add("--shutdown-grace", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM (default 30)")
    add("--launch-log-dir", default=None, help="where launched replicas log (default: a temporary folder)")
    add("--disable-log-requests", action="store_true", help="no log line per request")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level (default info)")
    return ap


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else argv
    server_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, server_args = argv[:cut], argv[cut + 1:]
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.replica and not args.replicas_file and not args.launch:
        ap.error("give --replica URL, --replicas-file PATH or --launch N")
    if server_args and not args.launch:
        ap.error("flags after -- are for launched servers: add --launch N")
    if any(a == "--api-key" or a.startswith("--api-key=") for a in server_args):
        ap.error("give launched servers their key with --upstream-api-key KEY (the gateway sends it), not after --")
    return args, server_args


def build(args, server_args: list[str]):
    """The replica set, gateway and launcher (None without --launch) the flags describe; nothing started."""
    from scalellm.gateway.launcher import Launcher
    from scalellm.gateway.proxy import Gateway
    from scalellm.gateway.replicas import ReplicaSet
    from scalellm.gateway.routing import Router

    replicas = ReplicaSet(args.replica, args.replicas_file, args.health_interval, args.eject_after,
                          args.eject_seconds, args.dns_interval)
    router = Router(args.policy, args.pool_threshold, args.chunk_chars, args.load_bound)
    gateway = Gateway(replicas, router, args.api_key, args.max_in_flight, args.max_queue, args.max_body_bytes,
                      args.retries, args.session_header, args.request_timeout, not args.disable_log_requests,
                      upstream_api_key=args.upstream_api_key)
    launcher = None
    if args.launch:
        import tempfile

        launcher = Launcher(args.launch, server_args, args.launch_log_dir or tempfile.mkdtemp(prefix="scalellm-"),
                            api_key=args.upstream_api_key)
    return replicas, gateway, launcher


async def run(args, server_args: list[str]) -> int:
    replicas, gateway, launcher = build(args, server_args)
    runner = web.AppRunner(gateway.make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, args.host, args.port).start()
    except OSError as e:
        why = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound: {e.strerror or e}"
        log.error("%s:%d %s; choose another with --port or --host", args.host, args.port, why)
        await runner.cleanup()
        return 1
    if launcher is not None:
        launcher.start(replicas)
    await replicas.start()
    log.info("gateway on http://%s:%d: policy %s, %d replica(s)", args.host, args.port, args.policy,
             len(replicas.replicas))
    # What startup made lives as long as the process: kept out of the collector's full passes, which
    # otherwise stop every stream for the time it takes to walk them
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            os._exit(1)
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
    await stop.wait()
    gateway.draining = True
    deadline = loop.time() + args.shutdown_grace
    while gateway.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await runner.cleanup()
    await replicas.stop()
    if launcher is not None:
        await launcher.stop(grace=2.0)
    return 0


def main(argv: list[str] | None = None) -> int:
    args, server_args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    return asyncio.run(run(args, server_args))


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    os._exit(code)
