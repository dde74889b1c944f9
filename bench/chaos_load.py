"""The client side of a chaos run (bench/chaos.py): closed-loop workers that stream, do not stream,
disconnect early or read slowly; bursts on a warm connection pool; and a record of every request with
its outcome (one of Outcome's), decided from what the client saw."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import socket
import time

import aiohttp

MODEL_NAME = "tiny-llama"

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "Write a haiku about the sea.",
           "List three prime numbers and explain why they are prime.", "def fibonacci(n):",
           "The quick brown fox jumps over the lazy dog because", "Summarize the history of the bicycle.",
           "Translate to German: good morning, how are you?", "What is 17 times 23?",
           "A recipe for pancakes needs"]


class Outcome:
    OK = "ok"
    DISCONNECT = "client disconnect"  # we closed it on purpose
    SLOW_DROPPED = "slow reader disconnected"  # the server dropped a slow reader: allowed
    ERROR = "error"  # a failure with a clear OpenAI error (body or SSE error event)
    UNCLEAR = "unclear failure"  # a failure without one: connection reset, truncated stream, bare 5xx
    HUNG = "hung"  # still open at its deadline


def error_kind(status: int, body: object) -> str | None:
    """`503 server_error/server_overloaded` from an OpenAI error body; None if it is not one."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict) and body["error"].get("message"):
        e = body["error"]
        return f"{status} {e.get('type') or '-'}/{e.get('code') or '-'}"
    return None


def parse_json(data: bytes) -> object:
    try:
        return json.loads(data)
    except ValueError:
        return None


class SSE:
    """Incremental parser of an SSE body: content events, [DONE], and an error event."""

    def __init__(self):
        self.events = 0
        self.max_gap = 0.0  # the longest wait between two content events (a resumed stream's pause)
        self._last: float | None = None
        self.done = False
        self.error: str | None = None
        self._buf = b""

    def feed(self, data: bytes) -> None:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                continue
            obj = parse_json(payload)
            if isinstance(obj, dict) and "error" in obj:
                self.error = "stream " + (error_kind(200, obj) or "error event without a message").split(" ", 1)[1]
            elif isinstance(obj, dict) and obj.get("choices") is not None:
                self.events += 1
                now = time.monotonic()
                if self._last is not None:
                    self.max_gap = max(self.max_gap, now - self._last)
                self._last = now


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """The body of a chunked HTTP/1.1 response, and whether its terminating chunk arrived."""
    out, pos = bytearray(), 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return bytes(out), False
        try:
            size = int(data[pos:end].split(b";")[0], 16)
        except ValueError:
            return bytes(out), False
        if size == 0:
            return bytes(out), True
        out += data[end + 2:end + 2 + size]
        if len(data) < end + 2 + size + 2:
            return bytes(out), False
        pos = end + 2 + size + 2


class Load:
    """The client side: steady workers, bursts and the record of every request."""

    def __init__(self, url: str, cfg: dict, t0: float, rng: random.Random):
        self.url, self.cfg, self.t0, self.rng = url, cfg, t0, rng
        self.host, self.port = "127.0.0.1", int(url.rsplit(":", 1)[1])
        self.records: list[dict] = []
        self.counter = itertools.count()
        self.stopping = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.session: aiohttp.ClientSession | None = None
        self.burst_session: aiohttp.ClientSession | None = None  # its own pool, warmed before each burst

    def new_record(self, scenario: str, path: str, stream: bool, burst: int | None = None) -> dict:
        rid = f"chaos-{next(self.counter):06d}-{scenario}"
        rec = {"id": rid, "scenario": scenario, "path": path, "stream": stream, "burst": burst,
               "start": time.time() - self.t0, "end": None, "status": None, "outcome": None, "kind": None,
               "sent": None, "events": 0, "detail": None}
        self.records.append(rec)
        return rec

    def body(self, path: str, stream: bool, max_tokens: int) -> dict:
        prompt = self.rng.choice(PROMPTS) + f" (#{self.rng.randrange(10**6)})"
        body = {"model": MODEL_NAME, "max_tokens": max_tokens, "temperature": 1.0, "stream": stream}
        if path.endswith("chat/completions"):
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    async def run_request(self, rec: dict, coro_fn, *args) -> None:
        """One request under its deadline; the outcome lands in rec."""
        rec["start"] = time.time() - self.t0
        try:
            async with asyncio.timeout(self.cfg["deadline_s"]):
                await coro_fn(rec, *args)
        except TimeoutError:
            rec.update(outcome=Outcome.HUNG, kind="hung", detail=f"open after {self.cfg['deadline_s']} s "
                                                                  f"({rec['events']} events)")
        except Exception as e:  # noqa: BLE001 - any client-side failure is a finding, not a crash
            rec.update(outcome=Outcome.UNCLEAR, kind=f"client exception {type(e).__name__}", detail=str(e)[:200])
        rec["end"] = time.time() - self.t0

    # the three ways to talk to the gateway ---------------------------------------------------
    async def plain(self, rec: dict, body: dict, disconnect_after: float | None,
                    session: aiohttp.ClientSession | None = None) -> None:
        headers = {"x-request-id": rec["id"]}
        session = session or self.session
        try:
            async with asyncio.timeout(disconnect_after) if disconnect_after else contextlib.nullcontext():
                async with session.post(self.url + rec["path"], json=body, headers=headers,
                                        trace_request_ctx=rec) as r:
                    rec["status"] = r.status
                    data = await r.read()
        except TimeoutError:
            if disconnect_after is None:
                raise
            rec.update(outcome=Outcome.DISCONNECT, kind="client disconnect", detail=f"after {disconnect_after:.2f} s")
            return
        except aiohttp.ClientError as e:
            rec.update(outcome=Outcome.UNCLEAR, kind=f"connection error {type(e).__name__}", detail=str(e)[:200])
            return
        obj = parse_json(data)
        if r.status == 200 and isinstance(obj, dict) and obj.get("choices"):
            rec.update(outcome=Outcome.OK, kind="ok")
        elif r.status >= 400 and error_kind(r.status, obj):
            rec.update(outcome=Outcome.ERROR, kind=error_kind(r.status, obj), detail=obj["error"]["message"][:200])
        else:
            rec.update(outcome=Outcome.UNCLEAR, kind=f"{r.status} without an OpenAI error body",
                       detail=data[:200].decode(errors="replace"))

    async def stream(self, rec: dict, body: dict, close_after_events: int | None, close_after_s: float | None) -> None:
        headers = {"x-request-id": rec["id"]}
        sse = SSE()
        try:
            async with asyncio.timeout(close_after_s) if close_after_s else contextlib.nullcontext():
                async with self.session.post(self.url + rec["path"], json=body, headers=headers,
                                             trace_request_ctx=rec) as r:
                    rec["status"] = r.status
                    if r.status != 200:
                        obj = parse_json(await r.read())
                        kind = error_kind(r.status, obj)
                        rec.update(outcome=Outcome.ERROR if kind else Outcome.UNCLEAR,
                                   kind=kind or f"{r.status} without an OpenAI error body")
                        return
                    async for data in r.content.iter_any():
                        sse.feed(data)
                        rec["events"], rec["max_gap_s"] = sse.events, sse.max_gap
                        if close_after_events is not None and sse.events >= close_after_events and not sse.done:
                            r.close()  # the client leaves mid-stream
                            rec.update(outcome=Outcome.DISCONNECT, kind="client disconnect",
                                       detail=f"after {sse.events} events")
                            return
        except TimeoutError:
            if close_after_s is None:
                raise
            rec.update(outcome=Outcome.DISCONNECT, kind="client disconnect",
                       detail=f"after {close_after_s:.2f} s, {sse.events} events")
            return
        except aiohttp.ClientError as e:
            if sse.error:
                rec.update(outcome=Outcome.ERROR, kind=sse.error)
            else:
                rec.update(outcome=Outcome.UNCLEAR, kind=f"connection error {type(e).__name__}",
                           detail=f"{str(e)[:160]} after {sse.events} events")
            return
        self._stream_end(rec, sse, slow=False)

    async def slow_stream(self, rec: dict, body: dict, stall_after_bytes: int | None, stall_s: float) -> None:
        """A raw HTTP/1.1 client with a small receive buffer that reads a little at a time."""
        cfg = self.cfg
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        writer = None
        try:
            await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=cfg["slow_read_bytes"])
            payload = json.dumps(body).encode()
            writer.write(f"POST {rec['path']} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                         f"x-request-id: {rec['id']}\r\nConnection: close\r\n\r\n".encode() + payload)
            await writer.drain()
            rec["sent"] = time.time() - self.t0
            data = bytearray()
            reset = None
            while True:
                try:
                    chunk = await reader.read(cfg["slow_read_bytes"])
                except ConnectionError as e:
                    reset = e
                    break
                if not chunk:
                    break
                data += chunk
                if stall_after_bytes is not None and len(data) >= stall_after_bytes:
                    stall_after_bytes = None
                    await asyncio.sleep(stall_s)
                await asyncio.sleep(cfg["slow_read_pause_s"])
        except ConnectionError as e:
            sock.close()
            rec.update(outcome=Outcome.UNCLEAR, kind=f"connection error {type(e).__name__}", detail=str(e)[:200])
            return
        finally:
            if writer is not None:
                writer.close()
        head, _, rest = bytes(data).partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        try:
            rec["status"] = int(lines[0].split()[1])
        except (IndexError, ValueError):
            rec.update(outcome=Outcome.SLOW_DROPPED if reset or not data else Outcome.UNCLEAR,
                       kind="slow reader disconnected" if reset or not data else "no HTTP status line",
                       detail=f"{len(data)} bytes before the connection ended")
            return
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.decode().partition(":") for ln in lines[1:])}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            content, complete = dechunk(rest)
        else:
            content = rest[:int(headers.get("content-length", len(rest)))]
            complete = len(content) == int(headers.get("content-length", len(rest)))
        if rec["status"] != 200:
            kind = error_kind(rec["status"], parse_json(content))
            rec.update(outcome=Outcome.ERROR if kind else Outcome.UNCLEAR,
                       kind=kind or f"{rec['status']} without an OpenAI error body")
            return
        sse = SSE()
        sse.feed(content + b"\n")
        rec["events"] = sse.events
        if not complete and not sse.error and not sse.done:
            rec.update(outcome=Outcome.SLOW_DROPPED, kind="slow reader disconnected",
                       detail=f"{sse.events} events, {len(data)} bytes{', reset' if reset else ''}")
            return
        self._stream_end(rec, sse, slow=True)

    @staticmethod
    def _stream_end(rec: dict, sse: SSE, slow: bool) -> None:
        if sse.error:
            rec.update(outcome=Outcome.ERROR, kind=sse.error)
        elif sse.done:
            rec.update(outcome=Outcome.OK, kind="ok")
        elif slow:
            rec.update(outcome=Outcome.SLOW_DROPPED, kind="slow reader disconnected",
                       detail=f"{sse.events} events, no [DONE]")
        else:
            rec.update(outcome=Outcome.UNCLEAR, kind="stream ended without [DONE] or an error event",
                       detail=f"after {sse.events} events")

    # workers ---------------------------------------------------------------------------------
    async def slow_worker(self) -> None:
        cfg, rng = self.cfg, self.rng
        while not self.stopping.is_set():
            path = rng.choice(["/v1/completions", "/v1/chat/completions"])
            body = self.body(path, True, rng.randint(*cfg["max_tokens_stream"]))
            rec = self.new_record("slow", path, True)
            stall = rng.random() < cfg["slow_stall_share"]
            await self.run_request(rec, self.slow_stream, body, rng.randint(512, 4096) if stall else None,
                                   rng.uniform(*cfg["slow_stall_s"]))
            await asyncio.sleep(rng.uniform(0, cfg["think_s"]))

    async def stream_worker(self) -> None:
        cfg, rng = self.cfg, self.rng
        while not self.stopping.is_set():
            path = rng.choice(["/v1/completions", "/v1/chat/completions"])
            max_tokens = rng.randint(*cfg["max_tokens_stream"])
            body = self.body(path, True, max_tokens)
            if rng.random() < cfg["disconnect_share"]:
                rec = self.new_record("disconnect", path, True)
                if rng.random() < 0.5:
                    await self.run_request(rec, self.stream, body, rng.randint(1, max_tokens), None)
                else:
                    await self.run_request(rec, self.stream, body, None, rng.uniform(0.01, 1.0))
            else:
                rec = self.new_record("stream", path, True)
                await self.run_request(rec, self.stream, body, None, None)
            await asyncio.sleep(rng.uniform(0, cfg["think_s"]))

    async def plain_worker(self) -> None:
        cfg, rng = self.cfg, self.rng
        while not self.stopping.is_set():
            path = rng.choice(["/v1/completions", "/v1/chat/completions"])
            body = self.body(path, False, rng.randint(*cfg["max_tokens_plain"]))
            if rng.random() < cfg["disconnect_share"] / 2:
                rec = self.new_record("disconnect", path, False)
                await self.run_request(rec, self.plain, body, rng.uniform(0.01, 0.5))
            else:
                rec = self.new_record("plain", path, False)
                await self.run_request(rec, self.plain, body, None)
            await asyncio.sleep(rng.uniform(0, cfg["think_s"]))

    async def warm_burst_pool(self, size: int) -> None:
        """Open `size` keep-alive connections to the gateway (GET /health at once), so that a burst
        measures the gateway's answer, not this client opening connections: a client with a pool."""
        async def one() -> None:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with self.burst_session.get(self.url + "/health") as r:
                    await r.read()
        await asyncio.gather(*(one() for _ in range(size)))

    def burst(self, index: int, size: int) -> None:
        for _ in range(size):
            path = "/v1/completions"
            rec = self.new_record("burst", path, False, burst=index)
            body = self.body(path, False, self.cfg["max_tokens_burst"])
            self.spawn(self.run_request(rec, self.plain, body, None, self.burst_session))

    async def _on_sent(self, session, ctx, params) -> None:
        ctx.trace_request_ctx["sent"] = time.time() - self.t0  # the request's last byte is written

    def trace_config(self) -> aiohttp.TraceConfig:
        tc = aiohttp.TraceConfig()
        tc.on_request_chunk_sent.append(self._on_sent)
        return tc

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

