"""Prometheus metrics: engine state read at scrape time, latencies observed as requests run.

Every series carries a model_name label, as vLLM's do (dashboards key on it). The engine gauges are
also exported under vLLM's names, so routers built for vLLM can read our load.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

disable_created_metrics()  # no `_created` series beside every counter and histogram

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


STAGES = ("parse", "tokenize", "queue", "prefill", "decode", "detokenize", "write")


@dataclass
class RequestRecord:
    """What one generation request did, for its log line and its outcome."""
    request_id: str
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    outcome: str = "finished"  # finished | aborted (the client left) | slow_reader (disconnected) | error


class _EngineCollector:
    def __init__(self, stats, model_name):
        self.stats = stats
        self.model_name = model_name

    def collect(self):
        s = self.stats()
        if s is None:
            return
        label = [self.model_name()]
        gauges = (("num_requests_running", "Sequences in the running batch", s["num_running"]),
                  ("num_requests_waiting", "Sequences waiting to be scheduled", s["num_waiting"]),
                  ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use", s["kv_cache_usage"]))
        for prefix in ("scalellm", "vllm"):
            for name, doc, value in gauges:
                family = GaugeMetricFamily(f"{prefix}:{name}", doc, labels=["model_name"])
                family.add_metric(label, value)
                yield family
        family = GaugeMetricFamily("scalellm:model_weight_bytes", "Bytes of model weights held in memory "
                                   "(quantized blocks as stored; dense projections count their packed copy too)",
                                   labels=["model_name"])
        family.add_metric(label, s.get("weight_bytes", 0))
        yield family
        counters = (("prefix_cache_queries", "Prompt tokens looked up in the prefix cache", s["prefix_cache_queries"]),
                    ("prefix_cache_hits", "Prompt tokens found in the prefix cache", s["prefix_cache_hits"]),
                    ("num_preemptions", "Sequences preempted for lack of KV blocks", s["num_preemptions"]),
                    ("engine_steps", "Engine steps that ran the model", s["steps"]),
                    ("engine_step_forward_seconds", "Time those steps spent in the model runner (step inputs and "
                     "forward pass) and sampling", s["step_forward_seconds"]),
                    ("engine_step_served_seconds", "Time those steps took as served, from each step's start to "
                     "the hand-over of its output (scheduling, bookkeeping and waiting for the event loop "
                     "included)", s["step_served_seconds"]),
                    ("grammar_mask_seconds", "Time steps spent computing and applying grammar token masks "
                     "(structured outputs, forced tool calls)", s.get("grammar_mask_seconds", 0.0)),
                    ("grammar_mask_steps", "Steps that computed grammar token masks", s.get("grammar_mask_steps", 0)),
                    ("grammars_compiled", "Distinct output constraints compiled (cache misses)",
                     s.get("grammars_compiled", 0)))
        for name, doc, value in counters:
            family = CounterMetricFamily(f"scalellm:{name}", doc, labels=["model_name"])
            family.add_metric(label, value)
            yield family
        if "spec_num_drafts" in s:
            yield from _spec_decode_counters(s, label)
        lora = s.get("lora_info")
        if lora is not None:  # vLLM's: the adapters in use, in the labels; the value is when it was read
            family = GaugeMetricFamily("vllm:lora_requests_info", "LoRA adapters of running and waiting requests",
                                       labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
            family.add_metric([str(lora["max_lora"]), ",".join(lora["running"]), ",".join(lora["waiting"])],
                              time.time())
            yield family
        for prefix in ("scalellm", "vllm"):  # the KV cache's shape, as vLLM's cache_config_info reports it
            family = GaugeMetricFamily(f"{prefix}:cache_config_info", "KV-cache configuration (in the labels)",
                                       labels=["model_name", "block_size", "num_gpu_blocks"])
            family.add_metric([*label, str(s["block_size"]), str(s["num_blocks"])], 1.0)
            yield family


def _spec_decode_counters(s: dict, label: list[str]):
    """Speculative decoding's counters, in vLLM's names (mean acceptance length: 1 + accepted / drafts)."""
    for name, doc, key in (("num_drafts", "Steps in which a sequence verified drafts", "spec_num_drafts"),
                           ("num_draft_tokens", "Draft tokens proposed and verified", "spec_num_draft_tokens"),
                           ("num_accepted_tokens", "Draft tokens the target model accepted",
                            "spec_num_accepted_tokens")):
        family = CounterMetricFamily(f"vllm:spec_decode_{name}", doc, labels=["model_name"])
        family.add_metric(label, s[key])
        yield family
    family = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                 "Draft tokens accepted, by their position in the draft", labels=["model_name", "position"])
    for position, value in enumerate(s["spec_accepted_per_pos"]):
        family.add_metric([*label, str(position)], value)
    yield family


class Metrics:
    def __init__(self, stats, model_name: str = ""):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r = self.registry
        m = ["model_name"]
        r.register(_EngineCollector(stats, lambda: self.model_name))
        self._ttft = Histogram("scalellm:time_to_first_token_seconds", "Time to first token", m, buckets=LATENCY_BUCKETS,
                               registry=r)
        self._itl = Histogram("scalellm:inter_token_latency_seconds", "Time between streamed tokens", m,
                              buckets=ITL_BUCKETS, registry=r)
        self._e2e = Histogram("scalellm:e2e_request_latency_seconds", "End-to-end request latency", m,
                              buckets=LATENCY_BUCKETS, registry=r)
        self._queue = Histogram("scalellm:request_queue_time_seconds", "Time from arrival to first schedule", m,
                                buckets=LATENCY_BUCKETS, registry=r)
        self._prompt_tokens = Counter("scalellm:prompt_tokens", "Prompt tokens processed", m, registry=r)
        self._generation_tokens = Counter("scalellm:generation_tokens", "Tokens generated", m, registry=r)
        self._finished = Counter("scalellm:request_success", "Finished choices (sequences) by finish reason "
                                 "(stop, length, abort)", m + ["finished_reason"], registry=r)
        self._requests = Counter("scalellm:requests", "HTTP requests by outcome (finished, aborted, slow_reader, error, "
                                 "rejected, ok) and status", m + ["outcome", "status"], registry=r)
        self._stage_seconds = Counter("scalellm:request_stage_seconds", "Request time spent in each stage "
                                      "(parse, tokenize, queue, prefill, decode, detokenize, write)",
                                      m + ["stage"], registry=r)
        self._stage_requests = Counter("scalellm:stage_requests", "Requests whose stages are in "
                                       "request_stage_seconds", m, registry=r)
        self._constrained = Counter("scalellm:structured_output_requests", "Requests whose output is constrained, "
                                    "by kind (json, json_object, regex, choice, grammar, structural_tag)",
                                    m + ["kind"], registry=r)
        self._slow_readers = Counter("scalellm:slow_readers_disconnected", "Streams whose client fell too far "
                                     "behind reading: disconnected and their requests aborted", m, registry=r)
        self._engine_failures = Counter("scalellm:engine_request_failures", "Requests ended because handling "
                                        "them raised in the engine step, by stage", m + ["stage"], registry=r)
        self.bind(model_name)

    def bind(self, model_name: str) -> None:
        """Label every series with this model name from now on (the name is known once loaded)."""
        self.model_name = model_name
        self.ttft, self.itl, self.e2e, self.queue = (h.labels(model_name) for h in
                                                     (self._ttft, self._itl, self._e2e, self._queue))
        self.prompt_tokens = self._prompt_tokens.labels(model_name)
        self.generation_tokens = self._generation_tokens.labels(model_name)
        self.stage_requests = self._stage_requests.labels(model_name)
        self._stage_children = {name: self._stage_seconds.labels(model_name, name) for name in STAGES}

    def count_finished(self, reason: str, choices: int = 1) -> None:
        self._finished.labels(self.model_name, reason).inc(choices)

    def count_constrained(self, kind: str) -> None:
        self._constrained.labels(self.model_name, kind).inc()

    def count_slow_reader(self) -> None:
        self._slow_readers.labels(self.model_name).inc()

    def count_engine_failure(self, stage: str) -> None:
        self._engine_failures.labels(self.model_name, stage).inc()

    def count_request(self, outcome: str, status: int) -> None:
        self._requests.labels(self.model_name, outcome, str(status)).inc()

    def totals(self) -> tuple[float, float]:
        """(prompt tokens, generated tokens) so far."""
        label = {"model_name": self.model_name}
        get = self.registry.get_sample_value
        return get("scalellm:prompt_tokens_total", label) or 0.0, get("scalellm:generation_tokens_total", label) or 0.0

    def add_stages(self, stages: dict[str, float]) -> None:
        for name, seconds in stages.items():
            self._stage_children[name].inc(seconds)
        self.stage_requests.inc()

    def tracker(self, num_choices: int, stages: dict[str, float], record: RequestRecord) -> Tracker:
        return Tracker(self, num_choices, stages, record)

    async def track(self, batches, num_choices: int, stages: dict[str, float], record: RequestRecord):
        """Pass batches of (prompt index, delta) through, recording them (see Tracker)."""
        tracker = Tracker(self, num_choices, stages, record)
        try:
            async for batch in batches:
                tracker.observe(batch, time.monotonic())
                yield batch
        finally:
            tracker.close()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Tracker:
    """One request's latencies, token counts, finish reasons and the engine's stage times, recorded in the
    metrics and in the request's record as its batches of (prompt index, delta) arrive."""

    def __init__(self, metrics: Metrics, num_choices: int, stages: dict[str, float], record: RequestRecord):
        self.metrics, self.num_choices, self.stages, self.record = metrics, num_choices, stages, record
        self.start = time.monotonic()
        self.last: dict[tuple[int, int], float] = {}

    def observe(self, batch, now: float) -> None:
        m, record, last = self.metrics, self.record, self.last
        for i, d in batch:
            if d.replayed:  # generated elsewhere before a resume
                continue
            key = (i, d.index)
            previous = last.get(key)
            if previous is not None:
                m.itl.observe(now - previous)
            else:
                m.ttft.observe(now - self.start)
                if record.ttft is None:
                    record.ttft = now - self.start
                if d.index == 0:
                    m.prompt_tokens.inc(d.num_prompt_tokens)
                    record.prompt_tokens += d.num_prompt_tokens
                if d.queue_time is not None:
                    m.queue.observe(d.queue_time)
            last[key] = now
            m.generation_tokens.inc(len(d.token_ids))
            record.output_tokens += len(d.token_ids)
            if d.finish_reason is not None:
                record.finish_reasons.append(d.finish_reason)
                m.count_finished(d.finish_reason)
                if d.timings is not None:
                    # a request's choices run side by side: its time in a stage is its slowest choice's
                    t, stages = d.timings, self.stages
                    for name, value in (("queue", t.queue), ("prefill", t.prefill), ("decode", t.decode),
                                        ("detokenize", t.detokenize)):
                        stages[name] = max(stages.get(name, 0.0), value)

    def close(self) -> None:
        m = self.metrics
        m.e2e.observe(time.monotonic() - self.start)
        unfinished = self.num_choices - len(self.record.finish_reasons)
        if unfinished > 0:
            m.count_finished("abort", unfinished)
