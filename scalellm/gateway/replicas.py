"""The replicas behind the gateway: where they come from, whether they are fit to serve, their load.

A replica is routable when its last health check answered 200 and it is not ejected. Health checks
run every `interval` seconds against /health (503 with status "draining" or "loading": not routable;
`down_after` consecutive failures, each a refused connection or no answer within `check_timeout`, take
a healthy replica out) and read the replica's models from /v1/models on each check that passes, so a
replica that starts serving another model is routed by its new list. Passive checks: a refused
connection ejects a replica at once, `eject_after` consecutive failures (5xx answers, connections lost)
eject it; an ejected replica is probed again after `eject_seconds` (half-open) and re-admitted when its
health check passes.

Sources: `--replica URL[,pool=NAME]` (a host name that resolves to several addresses becomes one
replica per address, re-resolved every `dns_interval` seconds: a Kubernetes headless Service), and a
replicas file (one `URL[,pool=NAME]` per line, re-read when it changes). A replica that no source lists
any more is drained: it gets nothing new, is forgotten once its requests are done, and only a source
listing it again brings it back (never a health check or probe that was under way).

Each replica has a `name` for metric labels: the URL as configured (for a host name that expands to
several addresses, that name's URL), so label values never come from DNS answers or clients.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import aiohttp

log = logging.getLogger("scalellm.gateway")


@dataclass
class Replica:
    url: str
    pool: str | None = None
    name: str = ""  # the metric label: the URL as configured (defaults to url)
    sources: set = field(default_factory=set)  # flag | file | dns:HOST | launch: every source listing it
    state: str = "unknown"  # unknown | healthy | loading | draining | down | ejected | removed
    cards: dict = field(default_factory=dict)  # model id -> its /v1/models card
    in_flight: int = 0
    failures: int = 0  # consecutive 5xx or connection errors of requests
    failed_checks: int = 0  # consecutive failed health checks
    ejected_until: float = 0.0
    requests: int = 0
    errors: int = 0
    pid: int | None = None  # a replica the gateway launched

    def __post_init__(self):
        self.name = self.name or self.url

    @property
    def source(self) -> str:
        return ",".join(sorted(self.sources))

    @property
    def routable(self) -> bool:
        return self.state == "healthy"

    @property
    def models(self) -> frozenset[str]:
        return frozenset(self.cards)

    def serves(self, model: str | None) -> bool:
        return model is None or model in self.cards

    def describe(self) -> dict:
        return {"url": self.url, "pool": self.pool, "source": self.source, "state": self.state,
                "models": sorted(self.models), "in_flight": self.in_flight, "requests": self.requests,
                "errors": self.errors, "consecutive_failures": self.failures, "pid": self.pid}


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'http://h:8000,pool=latency' -> ('http://h:8000', 'latency')."""
    url, *options = [part.strip() for part in spec.split(",")]
    pool = None
    for option in options:
        key, _, value = option.partition("=")
        if key != "pool" or not value:
            raise ValueError(f"unknown replica option {option!r} in {spec!r} (only pool=NAME)")
        pool = value
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"replica must be an http(s) URL, got {url!r}")
    return url.rstrip("/"), pool


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class ReplicaSet:
    def __init__(self, specs: list[str] = (), replicas_file: str | None = None, interval: float = 2.0,
                 eject_after: int = 3, eject_seconds: float = 5.0, dns_interval: float = 10.0,
                 resolver=None, down_after: int = 2, check_timeout: float = 3.0):
        self.replicas: dict[str, Replica] = {}
        self.specs = [parse_spec(s) for s in specs]
        self.replicas_file = replicas_file
        self.interval = interval
        self.eject_after = eject_after
        self.eject_seconds = eject_seconds
        self.down_after = down_after  # consecutive failed health checks that take a healthy replica out
        self.check_timeout = check_timeout
        self.dns_interval = dns_interval
        self.resolver = resolver or _resolve
        self._file_mtime: tuple | None = None  # (mtime, size, content hash) of the file last read
        self._tasks: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None
        self.headers: dict[str, str] = {}  # sent with health checks (the replicas' API key)

    # -- membership ------------------------------------------------------------------------------
    def add(self, url: str, pool: str | None, source: str, name: str | None = None) -> Replica:
        replica = self.replicas.get(url)
        if replica is None:
            replica = self.replicas[url] = Replica(url, pool, name or url)
            log.info("replica added: %s%s (%s)", url, f" pool={pool}" if pool else "", source)
        elif replica.state == "removed":  # back before it was forgotten: keep its in-flight count
            replica.state = "unknown"
            replica.sources.clear()
            log.info("replica added again: %s (%s)", url, source)
        replica.sources.add(source)
        replica.pool = pool
        return replica

    def remove(self, url: str) -> None:
        replica = self.replicas.get(url)
        if replica is not None and replica.state != "removed":
            replica.state = "removed"
            log.info("replica removed: %s (drained: %d in flight)", url, replica.in_flight)

    def routable(self, model: str | None = None) -> list[Replica]:
        return [r for r in self.replicas.values() if r.routable and r.serves(model)]

    def known_models(self) -> set[str]:
        return {m for r in self.replicas.values() if r.state not in ("removed",) for m in r.models}

    def _sync(self, source: str, wanted: dict[str, tuple[str | None, str]]) -> None:
        """`wanted`: url -> (pool, name), everything `source` lists now."""
        for url, (pool, name) in wanted.items():
            self.add(url, pool, source, name)
        for url, replica in list(self.replicas.items()):
            if source in replica.sources and url not in wanted:
                replica.sources.discard(source)
                if not replica.sources:
                    self.remove(url)

    async def refresh_dns(self) -> None:
        """Replicas named by IP address (or localhost) as given; each other host name as one replica
        per address it resolves to (a failed lookup keeps the replicas it gave last time)."""
        static: dict[str, tuple[str | None, str]] = {}
        by_name: dict[str, list] = {}
        for url, pool in self.specs:
            parts = urlsplit(url)
            if _is_ip(parts.hostname) or parts.hostname == "localhost":
                static[url] = (pool, url)
            else:
                by_name.setdefault(f"dns:{parts.hostname}", []).append((url, parts, pool))
        self._sync("flag", static)
        for source, entries in by_name.items():
            wanted: dict[str, tuple[str | None, str]] = {}
            try:
                for spec_url, parts, pool in entries:
                    for address in await self.resolver(parts.hostname, parts.port or 80):
                        host = f"[{address}]" if ":" in address else address
                        netloc = f"{host}:{parts.port}" if parts.port else host
                        wanted[urlunsplit((parts.scheme, netloc, parts.path, "", ""))] = (pool, spec_url)
            except OSError as e:
                log.warning("cannot resolve %s: %s (keeping its replicas)", source[4:], e)
                continue
            self._sync(source, wanted)

    async def refresh_file(self) -> None:
        if not self.replicas_file:
            return
        try:
            st = os.stat(self.replicas_file)
            with open(self.replicas_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            if self._file_mtime is not None:
                log.warning("cannot read replicas file %s (%s); keeping its replicas", self.replicas_file, e)
                self._file_mtime = None
            return
        version = (st.st_mtime_ns, st.st_size, hash(text))
        if version == self._file_mtime:
            return
        self._file_mtime = version
        wanted: dict[str, tuple[str | None, str]] = {}
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                try:
                    url, pool = parse_spec(line)
                except ValueError as e:
                    log.warning("%s: %s", self.replicas_file, e)
                    continue
                wanted[url] = (pool, url)
        log.info("replicas file %s: %d replica(s)", self.replicas_file, len(wanted))
        self._sync("file", wanted)

    # -- health ----------------------------------------------------------------------------------
    async def check(self, replica: Replica) -> None:
        now = time.monotonic()
        if replica.state == "ejected" and now < replica.ejected_until:
            return
        await self._check(replica, now)

    def _current(self, replica: Replica) -> bool:
        """False once the replica left its sources (or was forgotten) while a check of it ran."""
        return replica.state != "removed" and self.replicas.get(replica.url) is replica

    async def _probe(self, replica: Replica) -> tuple[int, dict, dict | None]:
        """/health's status and body, and the /v1/models cards when it is serving."""
        async with self._session.get(replica.url + "/health") as r:
            status = r.status
            body = await r.json(content_type=None) if r.status == 503 else {}
        if status != 200:
            return status, body if isinstance(body, dict) else {}, None
        async with self._session.get(replica.url + "/v1/models", headers=self.headers) as r:
            if r.status != 200:
                raise ValueError(f"/v1/models answered {r.status}")
            return status, body, {m["id"]: m for m in (await r.json())["data"]}

    async def _check(self, replica: Replica, now: float) -> None:
        try:
            status, body, cards = await self._probe(replica)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as e:
            if self._current(replica):
                self._check_failed(replica, now, e)
            return
        replica.failed_checks = 0
        if not self._current(replica):
            return
        if cards is not None and cards.keys() != replica.cards.keys() and replica.cards:
            log.info("replica %s now serves %s", replica.url, ", ".join(sorted(cards)))
        if cards is not None:
            replica.cards = cards
        if replica.state == "ejected" and replica.ejected_until > now:
            return  # a request failed on it while the check ran: the ejection stands
        if status == 200:
            if replica.state != "healthy":
                log.info("replica %s is healthy (models: %s)", replica.url, ", ".join(sorted(replica.models)))
            replica.state, replica.failures = "healthy", 0
        else:
            replica.state = body.get("status", "down")

    def _check_failed(self, replica: Replica, now: float, e: Exception) -> None:
        replica.failed_checks += 1
        if replica.state == "ejected":
            replica.ejected_until = now + self.eject_seconds
        elif replica.failed_checks >= self.down_after or replica.state != "healthy":
            if replica.state != "down":
                log.warning("replica %s is down (%d failed health check(s): %s %s)", replica.url,
                            replica.failed_checks, e.__class__.__name__, e)
            replica.state = "down"

    def report(self, replica: Replica, ok: bool, connection_error: bool = False) -> None:
        """Passive health: a request's outcome on this replica (`connection_error`: it refused the connection)."""
        if ok:
            replica.failures = 0
            return
        replica.errors += 1
        replica.failures += 1
        if replica.state == "healthy" and (connection_error or replica.failures >= self.eject_after):
            replica.state = "ejected"
            replica.ejected_until = time.monotonic() + self.eject_seconds
            why = "connection refused" if connection_error else f"{replica.failures} consecutive errors"
            log.warning("replica %s ejected (%s); probing again in %.0f s", replica.url, why, self.eject_seconds)

    async def _health_loop(self) -> None:
        while True:
            replicas = [r for r in self.replicas.values() if r.state != "removed"]
            await asyncio.gather(*(self.check(r) for r in replicas), return_exceptions=True)
            for url, r in list(self.replicas.items()):  # forget drained replicas
                if r.state == "removed" and r.in_flight == 0:
                    del self.replicas[url]
            await asyncio.sleep(self.interval)

    async def _source_loop(self) -> None:
        last_dns = 0.0
        while True:
            try:
                if time.monotonic() - last_dns >= self.dns_interval:
                    last_dns = time.monotonic()
                    await self.refresh_dns()
                await self.refresh_file()
            except Exception:  # one bad refresh must not end discovery for good
                log.exception("refreshing the replicas failed")
            await asyncio.sleep(min(1.0, self.dns_interval))

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.check_timeout)
        self._session = aiohttp.ClientSession(timeout=timeout)
        await self.refresh_dns()
        await self.refresh_file()
        self._tasks = [asyncio.create_task(self._health_loop()), asyncio.create_task(self._source_loop())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()


async def _resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})
