"""Reading the logs of a chaos run (bench/chaos.py): the replicas' request lines (one per generation
request, with its x-request-id), for work done twice; their slow-reader disconnects; and the gateway's
line per request, its retries and its mid-stream failures."""
from __future__ import annotations

import collections
import datetime
import itertools
import re

_TS = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "
_REQ_LINE = re.compile(_TS + r"\w+ scalellm\.requests: (\w+) (\S+) (\d+) (\w+)(?: \[x-request-id ([^\]]+)\])?"
                       r"(?: (\S+): prompt (\d+), output (\d+) tokens, .*E2E ([\d.]+) s)?")
_GW_LINE = re.compile(_TS + r"\w+ scalellm\.gateway: (\S+) (\w+) (\S+) -> (\S+) (\d+) in ([\d.]+) s")
_GW_RETRY = re.compile(_TS + r"\w+ scalellm\.gateway: (\S+): replica (\S+) (\w+) \((\w+)\); trying another")
_GW_MIDSTREAM = re.compile(_TS + r"\w+ scalellm\.gateway: (\S+): replica (\S+) failed mid-stream: (.*)")
_GW_RESUMED = re.compile(_TS + r"\w+ scalellm\.gateway: (\S+): replica (\S+) failed mid-stream; resuming on another")
_SLOW_READER = re.compile(_TS + r"\w+ scalellm\.server: (\S+): the client reads too slowly \((.*)\); disconnecting it")


def _ts(text: str) -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def replica_lines(services: dict, t0: float) -> list[dict]:
    """Every generation request line of every replica incarnation, with its interval (relative to t0)."""
    out = []
    for name, s in services.items():
        if not name.startswith("replica"):
            continue
        for inc in s["incarnations"]:
            with open(inc["log"], errors="replace") as f:
                for line in f:
                    m = _REQ_LINE.match(line)
                    if not m or m.group(10) is None:  # no E2E: rejected before it was admitted
                        continue
                    end = _ts(m.group(1)) - t0
                    out.append({"process": f"{name}#{inc['index']}", "pid": inc["pid"], "id": m.group(6),
                                "rid": m.group(7), "path": m.group(3), "status": int(m.group(4)), "outcome": m.group(5),
                                "output_tokens": int(m.group(9)), "start": end - float(m.group(10)), "end": end})
    return out


def slow_readers(services: dict, t0: float, lines: list[dict]) -> list[dict]:
    """Every stream a replica disconnected because its reader fell behind (its `... the client reads too
    slowly (...); disconnecting it` warning), with the x-request-id that its request line (in `lines`,
    from replica_lines) gives the same request id."""
    client_id = {(ln["process"], ln["rid"]): ln["id"] for ln in lines}
    out = []
    for name, s in services.items():
        if not name.startswith("replica"):
            continue
        for inc in s["incarnations"]:
            process = f"{name}#{inc['index']}"
            with open(inc["log"], errors="replace") as f:
                for line in f:
                    m = _SLOW_READER.match(line)
                    if m:
                        out.append({"process": process, "t": _ts(m.group(1)) - t0, "rid": m.group(2),
                                    "id": client_id.get((process, m.group(2))), "why": m.group(3)})
    return out


def duplicated_work(lines: list[dict], tolerance: float = 0.005) -> tuple[list[dict], int]:
    """Pairs of lines with one x-request-id on two replica processes whose intervals overlap (by more
    than the logs' millisecond rounding). Also: how many lines carried no x-request-id."""
    by_id = collections.defaultdict(list)
    missing = 0
    for ln in lines:
        if ln["id"] is None:
            missing += 1
        else:
            by_id[ln["id"]].append(ln)
    dups = []
    for rid, group in by_id.items():
        for a, b in itertools.combinations(group, 2):
            if a["process"] != b["process"] and min(a["end"], b["end"]) - max(a["start"], b["start"]) > tolerance:
                dups.append({"id": rid, "a": a, "b": b, "overlap_s": min(a["end"], b["end"]) - max(a["start"], b["start"])})
    return dups, missing


def gateway_lines(services: dict, t0: float) -> dict[str, dict]:
    """The gateway's final line per x-request-id (replica, status, seconds), mid-stream failures, and the
    streams it resumed elsewhere (from which replica, when)."""
    out: dict[str, dict] = {}
    for inc in services["gateway"]["incarnations"]:
        with open(inc["log"], errors="replace") as f:
            for line in f:
                m = _GW_LINE.match(line)
                if m:
                    out.setdefault(m.group(2), {}).update(replica=m.group(5), status=int(m.group(6)),
                                                          seconds=float(m.group(7)), end=_ts(m.group(1)) - t0)
                    continue
                m = _GW_RESUMED.match(line)
                if m:
                    out.setdefault(m.group(2), {}).setdefault("resumed", []).append(
                        {"t": _ts(m.group(1)) - t0, "replica": m.group(3)})
                    continue
                m = _GW_MIDSTREAM.match(line)
                if m:
                    out.setdefault(m.group(2), {}).update(midstream_failure=m.group(4)[:200])
                    continue
                m = _GW_RETRY.match(line)
                if m:
                    out.setdefault(m.group(2), {}).setdefault("retries", []).append(
                        {"t": _ts(m.group(1)) - t0, "replica": m.group(3), "why": f"{m.group(4)} ({m.group(5)})"})
    return out
