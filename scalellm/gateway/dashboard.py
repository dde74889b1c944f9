"""The gateway's dashboard: the server's page, one card per replica side by side, totals on top.

Each second, while a page is open, the gateway reads every replica's /dashboard/snapshot (its own
latest point) and adds the replica's state from the health checks and the gateway's in-flight count.
A replica that does not answer is shown as unreachable at once; the health checks take it out of
rotation within `down_after` x the health interval.
"""
from __future__ import annotations

import asyncio
import time

import aiohttp

from scalellm.server.dashboard import LiveStream


class GatewayDashboard(LiveStream):
    def __init__(self, gateway):
        super().__init__()
        self.gateway = gateway

    def info(self) -> dict:
        g = self.gateway
        return {"kind": "gateway", "model": ", ".join(sorted(g.replicas.known_models())) or "gateway",
                "state": "serving" if g.replicas.routable() else "no replica",
                "flags": {"policy": g.router.policy, "pool_threshold": g.router.pool_threshold}}

    async def _replica_point(self, url: str) -> dict | None:
        try:
            async with self.gateway.session.get(url + "/dashboard/snapshot", headers=self.gateway.replicas.headers,
                                                timeout=aiohttp.ClientTimeout(total=0.8)) as r:
                body = await r.json() if r.status == 200 else None
            point = body.get("point") if isinstance(body, dict) else None
            return point if isinstance(point, dict) else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None

    async def next_point(self) -> dict:
        replicas = [r for r in self.gateway.replicas.replicas.values() if r.state != "removed"]
        snapshots = await asyncio.gather(*(self._replica_point(r.url) for r in replicas))
        cards = []
        for r, p in zip(replicas, snapshots):
            state = r.state if p is not None or r.state != "healthy" else "unreachable"
            cards.append({"url": r.url, "pool": r.pool, "state": state, "in_flight": r.in_flight, "point": p})
        live = [p for p in snapshots if p]

        def total(key: str) -> float:
            return sum(p.get(key) or 0.0 for p in live)
        errors: dict[str, float] = {}
        for p in live:
            for k, v in (p.get("errors") or {}).items():
                errors[k] = errors.get(k, 0.0) + v
        return {"t": time.time(), "state": self.info()["state"], "tokens_per_s": total("tokens_per_s"),
                "prompt_tokens_per_s": total("prompt_tokens_per_s"), "requests_per_s": total("requests_per_s"),
                "finished": total("finished"), "running": total("running"), "waiting": total("waiting"),
                "kv_usage": total("kv_usage") / len(live) if live else 0.0, "preemptions": total("preemptions"),
                "errors": errors, "prefix_hit_rate": None, "latency": {}, "stages_ms": {}, "replicas": cards}
