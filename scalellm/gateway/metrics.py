"""The gateway's Prometheus metrics: its own requests by replica, model and status; the latency its
clients see (end to end, time to first token, gaps between streamed events) by replica and model; and
each replica's state and load read at scrape time.

Label values are bounded: `replica` is the replica's configured name (Replica.name), `model` one of the
replicas' model ids or "other" (no model, or one no replica serves), `status` a common status code or
its class ("4xx"); nothing a client or an upstream answer sends becomes a label as is.
"""
from __future__ import annotations

from bisect import bisect_left
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from scalellm.server.metrics import ITL_BUCKETS, LATENCY_BUCKETS  # the server's buckets: the two sides compare bucket by bucket

disable_created_metrics()

OTHER = "other"
NO_REPLICA = "-"  # answered by the gateway itself (bad input, unknown model, no replica, at capacity)
_STATUSES = frozenset({200, 400, 401, 403, 404, 408, 413, 422, 429, 499, 500, 502, 503, 504})


def status_label(status: int) -> str:
    return str(status) if status in _STATUSES else f"{status // 100}xx"


class _Series:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: list[float]):
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class LoopHistogram:
    """A labeled histogram observed from the event loop's thread alone: an observation is a bisect and
    two additions (prometheus_client's Histogram takes a lock per call; this one runs per streamed event)."""

    def __init__(self, name: str, documentation: str, labelnames: list[str], buckets, registry):
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.bounds = [b for b in buckets if b != float("inf")]
        self.series: dict[tuple[str, ...], _Series] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Series:
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = _Series(self.bounds)
        return series

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, s in list(self.series.items()):
            cumulative = list(accumulate(s.counts))
            buckets = [(floatToGoString(b), n) for b, n in zip(self.bounds, cumulative)]
            family.add_metric(list(values), buckets + [("+Inf", cumulative[-1])], s.sum)
        yield family


class _Count:
    __slots__ = ("value",)

    def __init__(self):
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopCounter:
    """A labeled counter incremented from the event loop's thread alone (no lock per increment)."""

    def __init__(self, name: str, documentation: str, labelnames: list[str], registry):
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.series: dict[tuple[str, ...], _Count] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Count:
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = _Count()
        return series

    def collect(self):
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, c in list(self.series.items()):
            family.add_metric(list(values), c.value)
        yield family


class _ReplicaCollector:
    """Gauges of the replicas known now (by address: a replica that leaves leaves these series too)."""

    def __init__(self, gateway):
        self.gateway = gateway

    def collect(self):
        g = self.gateway
        up = GaugeMetricFamily("scalellm_gateway:replica_routable", "1 when the replica gets new requests",
                               labels=["replica", "state"])
        load = GaugeMetricFamily("scalellm_gateway:replica_in_flight", "Requests in flight on the replica",
                                 labels=["replica"])
        for r in g.replicas.replicas.values():
            up.add_metric([r.url, r.state], 1.0 if r.routable else 0.0)
            load.add_metric([r.url], r.in_flight)
        yield up
        yield load
        yield GaugeMetricFamily("scalellm_gateway:in_flight", "Requests admitted and not yet answered",
                                value=g.in_flight)
        yield GaugeMetricFamily("scalellm_gateway:queued", "Requests waiting for admission", value=len(g._queue))


class GatewayMetrics:
    def __init__(self, gateway):
        self.registry = r = CollectorRegistry()
        r.register(_ReplicaCollector(gateway))
        labels = ["replica", "model"]
        self.requests = LoopCounter("scalellm_gateway:requests", "Requests by the replica that answered, model and "
                                    "status", [*labels, "status"], r)
        self.retries = Counter("scalellm_gateway:retries", "Requests sent again to another replica", registry=r)
        self.e2e = LoopHistogram("scalellm_gateway:e2e_request_latency_seconds",
                                 "Generation requests from arrival at the gateway to their last byte",
                                 labels, LATENCY_BUCKETS, r)
        self.ttft = LoopHistogram("scalellm_gateway:time_to_first_token_seconds",
                                  "From arrival at the gateway to the first token forwarded (a whole answer's "
                                  "first byte when not streamed)", labels, LATENCY_BUCKETS, r)
        self.resumed = LoopCounter("scalellm_gateway:streams_resumed", "Streams continued on another replica after "
                                   "theirs failed mid-stream, by the replica that failed", labels, r)
        self.resume_gap = LoopHistogram("scalellm_gateway:resume_gap_seconds", "The pause a resumed stream's "
                                        "client saw: from its last event before the cut to the first after, by the "
                                        "replica that took over", labels, LATENCY_BUCKETS, r)
        self.itl = LoopHistogram("scalellm_gateway:inter_token_latency_seconds",
                                 "Gaps between the stream chunks forwarded after the first token",
                                 labels, ITL_BUCKETS, r)

    def count(self, replica: str, model: str, status: int) -> None:
        self.requests.labels(replica, model, status_label(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
