"""Which replica gets a request.

Load is the gateway's own count of requests in flight on each replica, taken at dispatch and released
on every exit path (answered, failed, or the client gone).

- round_robin: each routable replica in turn.
- least_load: the fewest in flight (ties: the one sent the fewest requests so far).
- power_of_two: the less loaded of two picked at random (the default: near least_load's balance
  without every request reading every replica).
- session: a consistent hash of the session header on a ring of virtual nodes, moving on along the
  ring past replicas loaded above (1 + epsilon) times the mean, so one hot session cannot swamp one
  replica; no header: power_of_two.
- cache_aware: the prompt text (the rendered conversation for chat) cut into fixed-size chunks, each
  chunk's hash chained to the one before, so a hash names the whole prefix up to it. An index maps
  hashes to the replicas that were sent that prefix. Among replicas within `load_bound` requests of
  the least loaded, the one holding the longest prefix wins; with no match, or when the load is
  imbalanced beyond that bound, least_load.

Pools (the paper's concurrency-aware routing): with replicas labelled pool=latency and
pool=throughput, requests go to the latency pool while the gateway's total in flight is below the
threshold, and to the throughput pool from there on; a pool with no routable replica falls back to all.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from collections import OrderedDict

from scalellm.gateway.replicas import Replica

POLICIES = ("round_robin", "least_load", "power_of_two", "session", "cache_aware")


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def prefix_hashes(text: str, chunk_chars: int) -> list[int]:
    """Chained hashes of the text's whole chunks: the i-th names the first (i + 1) chunks."""
    hashes, previous = [], b""
    data = text.encode()
    for start in range(0, len(data) - chunk_chars + 1, chunk_chars):
        h = hashlib.blake2b(previous + data[start:start + chunk_chars], digest_size=8).digest()
        hashes.append(int.from_bytes(h, "little"))
        previous = h
    return hashes


class Router:
    def __init__(self, policy: str = "power_of_two", pool_threshold: int = 64, chunk_chars: int = 256,
                 load_bound: int = 8, session_epsilon: float = 0.25, index_size: int = 1 << 18, seed: int | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.pool_threshold = pool_threshold
        self.chunk_chars = chunk_chars
        self.load_bound = load_bound
        self.session_epsilon = session_epsilon
        self.index_size = index_size
        self.index: OrderedDict[int, set[str]] = OrderedDict()  # prefix hash -> replica URLs, LRU
        self._turn = itertools.count()
        self._rng = random.Random(seed)
        self._ring: tuple[tuple[str, ...], list[int], list[str]] | None = None

    def pool_candidates(self, replicas: list[Replica], total_in_flight: int) -> list[Replica]:
        pools = {r.pool for r in replicas}
        if not pools & {"latency", "throughput"}:
            return replicas
        wanted = "latency" if total_in_flight < self.pool_threshold else "throughput"
        chosen = [r for r in replicas if r.pool == wanted]
        return chosen or replicas

    def choose(self, replicas: list[Replica], total_in_flight: int, prompt_text: str | None = None,
               session: str | None = None) -> Replica:
        """One of `replicas` (routable, serving the model, none tried yet; at least one)."""
        candidates = self.pool_candidates(replicas, total_in_flight)
        if len(candidates) == 1:
            chosen = candidates[0]
        elif self.policy == "round_robin":
            chosen = candidates[next(self._turn) % len(candidates)]
        elif self.policy == "least_load":
            chosen = self._least(candidates)
        elif self.policy == "session" and session is not None:
            chosen = self._session(candidates, session)
        elif self.policy == "cache_aware" and prompt_text:
            return self._cache_aware(candidates, prompt_text)
        else:
            chosen = self._power_of_two(candidates)
        return chosen

    @staticmethod
    def _least(candidates: list[Replica]) -> Replica:
        """The fewest in flight; among those, the one sent the fewest requests so far."""
        return min(candidates, key=lambda r: (r.in_flight, r.requests))

    def _power_of_two(self, candidates: list[Replica]) -> Replica:
        a, b = self._rng.sample(candidates, 2)
        return a if a.in_flight <= b.in_flight else b

    def _session(self, candidates: list[Replica], session: str) -> Replica:
        urls = tuple(sorted(r.url for r in candidates))
        if self._ring is None or self._ring[0] != urls:
            points = sorted((_hash(f"{url}#{v}".encode()), url) for url in urls for v in range(64))
            self._ring = (urls, [p for p, _ in points], [u for _, u in points])
        _, keys, owners = self._ring
        by_url = {r.url: r for r in candidates}
        mean = sum(r.in_flight for r in candidates) / len(candidates)
        limit = int((1 + self.session_epsilon) * mean) + 1
        start = bisect.bisect(keys, _hash(session.encode()))
        for i in range(len(keys)):
            replica = by_url[owners[(start + i) % len(keys)]]
            if replica.in_flight < limit:
                return replica
        return self._least(candidates)

    def _cache_aware(self, candidates: list[Replica], prompt_text: str) -> Replica:
        hashes = prefix_hashes(prompt_text, self.chunk_chars)
        low = min(r.in_flight for r in candidates)
        eligible = {r.url: r for r in candidates if r.in_flight <= low + self.load_bound}
        chosen = None
        for h in reversed(hashes):  # the longest cached prefix first
            holders = self.index.get(h)
            if holders:
                matching = [eligible[u] for u in holders if u in eligible]
                if matching:
                    chosen = min(matching, key=lambda r: r.in_flight)
                    break
        if chosen is None:
            chosen = self._least(list(eligible.values()))
        for h in hashes:
            holders = self.index.get(h)
            if holders is None:
                holders = self.index[h] = set()
            else:
                self.index.move_to_end(h)
            holders.add(chosen.url)
        while len(self.index) > self.index_size:
            self.index.popitem(last=False)
        return chosen
