"""The server process's life: listen at once, load the engine on a thread, serve, then drain on a signal
or exit non-zero when the engine's loop has died."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sys
import threading

from aiohttp import web

from scalellm.engine.async_engine import AsyncEngine
from scalellm.server.app import Server
from scalellm.server.errors import APIError
from scalellm.server.request_log import log_stats

log = logging.getLogger("scalellm.server")


def exit_process(code: int) -> None:
    """Flush the logs and leave at once: the interpreter's own teardown (torch, numba) takes seconds."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _in_daemon_thread(fn) -> asyncio.Future:
    """fn() on a daemon thread; unlike asyncio.to_thread, leaving the event loop never waits for it."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(), None
        except BaseException as e:
            result, error = None, e
        with contextlib.suppress(RuntimeError):  # the loop may be closed by now
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="scalellm-load", daemon=True).start()
    return future


async def _after_engine_death(server: Server, runner: web.AppRunner, stopping: asyncio.Future) -> int:
    """The engine's loop stopped and every request in flight was told so: give their handlers a moment to
    send it, then exit non-zero for the orchestrator (systemd, Kubernetes, a gateway's launcher) to restart
    the process. /health answers 503 meanwhile."""
    loop = asyncio.get_running_loop()
    log.critical("the engine stopped (%s): answering the %d request(s) in flight, then exiting", server.engine.dead,
                 server.in_flight)
    answered_by = loop.time() + 2.0
    while server.in_flight and loop.time() < answered_by:
        await asyncio.sleep(0.02)
    stopping.cancel()
    await runner.cleanup()
    server.pool.shutdown(wait=False)
    return 1


async def serve(server: Server, engine_factory, host: str, port: int, shutdown_grace: float,
                ready: asyncio.Event | None = None, stop: asyncio.Event | None = None,
                stats_interval: float = 10.0) -> int:
    """Listen at once (health says 503 while loading), load the engine on a thread, serve until
    SIGTERM or SIGINT, then drain: refuse new work and give in-flight requests the grace period to
    finish; past it, abort them and exit. A second signal exits at once."""
    import signal

    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("%s while shutting down: exiting now", name)
            exit_process(1)
        log.info("%s: shutting down", name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
    # On cleanup a handler still running gets this long before it is cancelled, which aborts its
    # requests; the grace period itself is waited for below.
    runner = web.AppRunner(server.make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        reason = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound: {e.strerror or e}"
        log.error("%s:%d %s; choose another with --port or --host", host, port, reason)
        await runner.cleanup()
        return 1
    url = f"http://{host}:{port}"
    log.info("listening on %s (loading the model)", url)
    loading = _in_daemon_thread(engine_factory)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():
        log.info("stopped while loading the model")
        await runner.cleanup()
        return 0
    try:
        engine = loading.result()
    except Exception as e:
        log.error("could not load the model: %s", e)
        stopping.cancel()
        await runner.cleanup()
        return 1
    server.attach(AsyncEngine(engine))
    e = engine
    log.info("serving %s as %r on %s: device=%s dtype=%s threads=%d max_model_len=%d KV cache=%d blocks "
             "(%d tokens)", e.loaded.path, server.model_name, url, e.config.device,
             str(e.loaded.dtype).replace("torch.", ""), e.num_threads, e.max_model_len, e.block_manager.num_blocks,
             e.kv_capacity_tokens)
    stats_task = asyncio.create_task(log_stats(server, stats_interval)) if stats_interval > 0 else None
    if ready is not None:
        ready.set()
    died = asyncio.ensure_future(server.engine.died.wait())
    await asyncio.wait({stopping, died}, return_when=asyncio.FIRST_COMPLETED)
    if stats_task is not None:
        stats_task.cancel()
    if died.done():
        return await _after_engine_death(server, runner, stopping)
    died.cancel()
    server.state = "draining"
    log.info("draining: %d request(s) in flight, up to %.0f s", server.in_flight, shutdown_grace)
    deadline = loop.time() + shutdown_grace
    while server.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if server.in_flight:
        log.warning("grace period over: aborting %d request(s) still in flight", server.in_flight)
        server.engine.fail_all(APIError(503, "the server shut down before this request finished",
                                        code="server_shutdown"))
        answered_by = loop.time() + 1.0  # each handler sends its error (a 503, or a stream's error event)
        while server.in_flight and loop.time() < answered_by:
            await asyncio.sleep(0.02)
    await runner.cleanup()
    idle_by = loop.time() + 2.0  # the engine thread frees the aborted requests' blocks on its next turn
    while engine.has_unfinished() and loop.time() < idle_by:
        await asyncio.sleep(0.02)
    stats = engine.stats()
    await server.engine.stop()
    server.pool.shutdown(wait=False)
    log.info("stopped: %d request(s) left in the engine, %d KV blocks in use",
             stats["num_running"] + stats["num_waiting"], stats["kv_blocks_used"])
    return 0
