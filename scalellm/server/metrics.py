"""Prometheus metrics: engine state read at scrape time, latencies observed as requests run."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


STAGES = ("parse", "tokenize", "queue", "prefill", "decode", "detokenize", "write")


class _EngineCollector:
    def __init__(self, stats):
        self.stats = stats

    def collect(self):
        s = self.stats()
        if s is None:
            return
        yield GaugeMetricFamily("scalellm:num_requests_running", "Sequences in the running batch",
                                value=s["num_running"])
        yield GaugeMetricFamily("scalellm:num_requests_waiting", "Sequences waiting to be scheduled",
                                value=s["num_waiting"])
        yield GaugeMetricFamily("scalellm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use",
                                value=s["kv_cache_usage"])
        yield CounterMetricFamily("scalellm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  value=s["prefix_cache_queries"])
        yield CounterMetricFamily("scalellm:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                  value=s["prefix_cache_hits"])
        yield CounterMetricFamily("scalellm:num_preemptions", "Sequences preempted for lack of KV blocks",
                                  value=s["num_preemptions"])


class Metrics:
    def __init__(self, stats):
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(_EngineCollector(stats))
        self.ttft = Histogram("scalellm:time_to_first_token_seconds", "Time to first token", buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("scalellm:inter_token_latency_seconds", "Time between streamed tokens",
                             buckets=_ITL, registry=r)
        self.e2e = Histogram("scalellm:e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=_LATENCY, registry=r)
        self.queue = Histogram("scalellm:request_queue_time_seconds", "Time from arrival to first schedule",
                               buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("scalellm:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("scalellm:generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("scalellm:requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.stage_seconds = Counter("scalellm:request_stage_seconds", "Request time spent in each stage "
                                     "(parse, tokenize, queue, prefill, decode, detokenize, write)", ["stage"],
                                     registry=r)
        self.stage_requests = Counter("scalellm:stage_requests", "Requests whose stages are in "
                                      "request_stage_seconds", registry=r)
        self._stage_children = {name: self.stage_seconds.labels(name) for name in STAGES}

    def add_stages(self, stages: dict[str, float]) -> None:
        for name, seconds in stages.items():
            self._stage_children[name].inc(seconds)
        self.stage_requests.inc()

    async def track(self, batches, num_choices: int, stages: dict[str, float]):
        """Pass batches of (prompt index, delta) through, recording latencies, token counts, outcomes
        and the engine's stage times."""
        start = time.monotonic()
        last: dict[tuple[int, int], float] = {}
        finished = 0
        try:
            async for batch in batches:
                now = time.monotonic()
                for i, d in batch:
                    key = (i, d.index)
                    previous = last.get(key)
                    if previous is not None:
                        self.itl.observe(now - previous)
                    else:
                        self.ttft.observe(now - start)
                        if d.index == 0:
                            self.prompt_tokens.inc(d.num_prompt_tokens)
                        if d.queue_time is not None:
                            self.queue.observe(d.queue_time)
                    last[key] = now
                    self.generation_tokens.inc(len(d.token_ids))
                    if d.finish_reason is not None:
                        finished += 1
                        self.requests.labels(d.finish_reason).inc()
                        if d.timings is not None:
                            t = d.timings
                            for name, value in (("queue", t.queue), ("prefill", t.prefill), ("decode", t.decode),
                                                ("detokenize", t.detokenize)):
                                stages[name] = stages.get(name, 0.0) + value
                yield batch
        finally:
            self.e2e.observe(time.monotonic() - start)
            if finished < num_choices:
                self.requests.labels("abort").inc(num_choices - finished)

    def render(self) -> bytes:
        return generate_latest(self.registry)
