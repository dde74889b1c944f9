"""The live dashboard: `GET /dashboard` (one self-contained page) fed by `GET /dashboard/stream` (SSE).

About once a second, while at least one page is open, a sampler reads the same counters /metrics
exports (through the registry, not the text) and turns the difference from earlier samples into what
the page draws: tokens and requests per second, latency percentiles and histograms over a sliding
window, the time per request stage, the KV cache. Nothing runs per request beyond what the metrics
already do; with no page open nothing runs at all. `GET /dashboard/snapshot` gives the latest point as
JSON (the gateway's page reads its replicas through it).
"""
from __future__ import annotations

import abc
import asyncio
import json
import logging
import math
import os
import time
from collections import deque

from aiohttp import web

from scalellm.server.metrics import STAGES

log = logging.getLogger("scalellm.server")
HISTORY = 300  # one point a second: the last five minutes
WINDOW = 60  # seconds the percentiles and histograms cover
RATE_WINDOW = 10  # seconds the headline rates average over
PAGE = os.path.join(os.path.dirname(__file__), "static", "dashboard.html")
LATENCIES = {"ttft": "scalellm:time_to_first_token_seconds", "itl": "scalellm:inter_token_latency_seconds",
             "e2e": "scalellm:e2e_request_latency_seconds"}


def read_counters(registry) -> dict:
    """The metrics' current values: totals, per-label counts and histogram buckets."""
    out: dict = {"requests": {}, "stages": {}, "buckets": {k: [] for k in LATENCIES}, "gauges": {}}
    names = {v: k for k, v in LATENCIES.items()}
    for family in registry.collect():
        for s in family.samples:
            name, labels = s.name, s.labels
            if name in ("scalellm:generation_tokens_total", "scalellm:prompt_tokens_total",
                        "scalellm:stage_requests_total", "scalellm:prefix_cache_queries_total",
                        "scalellm:prefix_cache_hits_total", "scalellm:num_preemptions_total",
                        "scalellm:grammar_mask_seconds_total", "scalellm:grammar_mask_steps_total",
                        "scalellm:structured_output_requests_total", "vllm:spec_decode_num_drafts_total",
                        "vllm:spec_decode_num_accepted_tokens_total"):
                key = name.split(":")[1].removesuffix("_total")
                out[key] = out.get(key, 0.0) + s.value
            elif name == "scalellm:requests_total":
                key = (labels["outcome"], labels["status"])
                out["requests"][key] = out["requests"].get(key, 0.0) + s.value
            elif name == "scalellm:request_stage_seconds_total":
                out["stages"][labels["stage"]] = out["stages"].get(labels["stage"], 0.0) + s.value
            elif name.endswith("_bucket") and name[:-7] in names:
                out["buckets"][names[name[:-7]]].append((float(labels["le"]), s.value))
            elif name in ("scalellm:num_requests_running", "scalellm:num_requests_waiting",
                          "scalellm:kv_cache_usage_perc"):
                out["gauges"][name.split(":")[1]] = s.value
    for k, rows in out["buckets"].items():  # one model: merge label sets by bound
        merged: dict[float, float] = {}
        for le, v in rows:
            merged[le] = merged.get(le, 0.0) + v
        out["buckets"][k] = sorted(merged.items())
    return out


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of cumulative (bound, count) buckets, interpolated within its bucket (seconds)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    target = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= target:
            if math.isinf(bound):
                return lower_bound
            share = (target - lower_count) / (count - lower_count) if count > lower_count else 0.0
            return lower_bound + share * (bound - lower_bound)
        lower_bound, lower_count = bound, count
    return lower_bound


def _finite(x):
    """JSON that JavaScript can parse: infinities and NaN (a flag like --shutdown-grace inf) as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _json(obj) -> bytes:
    return json.dumps(_finite(obj), allow_nan=False).encode()


def _delta_buckets(now: list, then: list) -> list[tuple[float, float]]:
    before = dict(then)
    return [(le, v - before.get(le, 0.0)) for le, v in now]


class LiveStream(abc.ABC):
    """One point a second to every open page, and nothing while none is open. Subclasses say what a
    point and the page's header info are."""

    def __init__(self):
        self.points: deque[dict] = deque(maxlen=HISTORY)
        self.viewers: set[asyncio.Queue] = set()
        self._task: asyncio.Task | None = None

    @abc.abstractmethod
    def info(self) -> dict:
        """The page's header: model, state, flags."""

    @abc.abstractmethod
    async def next_point(self) -> dict:
        """The point to send now."""

    async def _run(self) -> None:
        try:
            while self.viewers:
                try:
                    point = await self.next_point()
                    data = _json({"point": point, "info": self.info()})
                except Exception:  # one bad point must not stop the page for good
                    log.exception("dashboard sample failed")
                    await asyncio.sleep(1.0)
                    continue
                self.points.append(point)
                for q in list(self.viewers):
                    if q.qsize() < 5:  # a viewer that stopped reading gets no backlog
                        q.put_nowait(data)
                await asyncio.sleep(1.0)
        finally:
            self._task = None

    def _watch(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self.viewers.add(q)
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        return q

    # -- handlers --------------------------------------------------------------------------------
    async def page(self, request: web.Request) -> web.Response:
        return web.FileResponse(PAGE, headers={"Cache-Control": "no-cache"})

    async def snapshot(self, request: web.Request) -> web.Response:
        point = self.points[-1] if self.points and self._task is not None else await self.next_point()
        return web.Response(body=_json({"point": point, "info": self.info()}), content_type="application/json")

    async def stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        q = self._watch()
        try:
            history = _json({"history": list(self.points), "info": self.info()})
            await resp.write(b"event: history\ndata: " + history + b"\n\n")
            while True:
                data = await q.get()
                await resp.write(b"data: " + data + b"\n\n")
        except ConnectionResetError:
            pass
        finally:
            self.viewers.discard(q)
        return resp


class Dashboard(LiveStream):
    """The server's points, from its metrics registry and engine."""

    def __init__(self, server):
        super().__init__()
        self.server = server
        self.samples: deque[tuple[float, dict]] = deque(maxlen=HISTORY + 1)

    def info(self) -> dict:
        s = self.server
        e = s.engine.engine if s.engine else None
        base = {"kind": "server", "model": s.model_name, "state": s.state, "flags": s.flags}
        if e is not None:
            base.update(dtype=str(e.loaded.dtype).replace("torch.", ""), device=e.config.device,
                        threads=e.num_threads, max_model_len=e.max_model_len,
                        kv_blocks=e.block_manager.num_blocks, block_size=e.block_manager.block_size)
        return base

    async def next_point(self) -> dict:
        return self.sample()

    def sample(self) -> dict:
        """One point: the state now and the rates since earlier samples."""
        now = time.monotonic()
        c = read_counters(self.server.metrics.registry)
        self.samples.append((now, c))
        point = {"t": time.time(), "state": self.server.state}

        def back(seconds: float):
            for t, old in self.samples:
                if now - t <= seconds + 0.5:
                    return t, old
            return self.samples[0]
        t_rate, r = back(RATE_WINDOW)
        dt = now - t_rate

        def rate(key: str) -> float:
            return (c.get(key, 0.0) - r.get(key, 0.0)) / dt if dt > 0.5 else 0.0
        finished = sum(v for (outcome, _), v in c["requests"].items() if outcome == "finished")
        finished_then = sum(v for (outcome, _), v in r["requests"].items() if outcome == "finished")
        point["tokens_per_s"], point["prompt_tokens_per_s"] = rate("generation_tokens"), rate("prompt_tokens")
        point["requests_per_s"] = (finished - finished_then) / dt if dt > 0.5 else 0.0
        point["finished"] = finished
        g = c["gauges"]
        point["running"], point["waiting"] = g.get("num_requests_running", 0.0), g.get("num_requests_waiting", 0.0)
        point["kv_usage"] = g.get("kv_cache_usage_perc", 0.0)
        point["preemptions"] = c.get("num_preemptions", 0.0)
        point["errors"] = {f"{status} {outcome}": v for (outcome, status), v in c["requests"].items()
                           if int(status) >= 400 or outcome in ("error", "aborted")}
        _, w = back(WINDOW)
        queries = c.get("prefix_cache_queries", 0.0) - w.get("prefix_cache_queries", 0.0)
        hits = c.get("prefix_cache_hits", 0.0) - w.get("prefix_cache_hits", 0.0)
        point["prefix_hit_rate"] = hits / queries if queries else None
        mask_steps = c.get("grammar_mask_steps", 0.0) - r.get("grammar_mask_steps", 0.0)
        mask_seconds = c.get("grammar_mask_seconds", 0.0) - r.get("grammar_mask_seconds", 0.0)
        point["mask_ms_per_step"] = 1000.0 * mask_seconds / mask_steps if mask_steps else None
        point["constrained"] = c.get("structured_output_requests", 0.0)
        drafts = c.get("spec_decode_num_drafts", 0.0) - w.get("spec_decode_num_drafts", 0.0)
        accepted = c.get("spec_decode_num_accepted_tokens", 0.0) - w.get("spec_decode_num_accepted_tokens", 0.0)
        point["spec_acceptance_length"] = 1.0 + accepted / drafts if drafts else None
        point["latency"] = {}
        for k in LATENCIES:
            window = _delta_buckets(c["buckets"][k], w["buckets"][k])
            point["latency"][k] = {"p50": quantile(window, 0.5), "p90": quantile(window, 0.9),
                                   "p99": quantile(window, 0.99), "count": window[-1][1] if window else 0,
                                   "histogram": [(le if math.isfinite(le) else None, v) for le, v in window]}
        _, p = self.samples[-2] if len(self.samples) > 1 else self.samples[-1]
        done = c.get("stage_requests", 0.0) - p.get("stage_requests", 0.0)
        point["stages_ms"] = {st: 1000.0 * (c["stages"].get(st, 0.0) - p["stages"].get(st, 0.0)) / done
                              if done else 0.0 for st in STAGES}
        return point
