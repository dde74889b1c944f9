"""The gateway's Prometheus metrics: its own requests by replica and status, and each replica's state
and load read at scrape time."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily

disable_created_metrics()


class _ReplicaCollector:
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
        self.registry = CollectorRegistry()
        self.registry.register(_ReplicaCollector(gateway))
        self.requests = Counter("scalellm_gateway:requests", "Requests by the replica that answered and status",
                                ["replica", "status"], registry=self.registry)
        self.retries = Counter("scalellm_gateway:retries", "Requests sent again to another replica",
                               registry=self.registry)

    def count(self, replica: str, status: int) -> None:
        self.requests.labels(replica, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
