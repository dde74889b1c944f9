"""The analysis of a chaos run (bench/chaos.py): from the client's records, the processes' logs, the
RSS samples and the end state to the summary that chaos_report writes and `must_show` judges."""
from __future__ import annotations

import collections

import chaos_report
from chaos_load import Outcome
from chaos_logs import duplicated_work, gateway_lines, replica_lines, slow_readers
from chaos_procs import SLOW_READERS

RSS_SLOPE_LIMIT = 5.0  # MB/min
BURST_503_P50_LIMIT = 0.050  # s


def timeline_class(r: dict) -> str:
    if r["outcome"] == Outcome.ERROR:
        return "503" if r["status"] == 503 else "other error"
    return r["outcome"]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def rss_slopes(rss: list[dict], services: dict, duration: float, t0: float) -> dict:
    """MB/min by least squares per process over the last 8 minutes (a shorter run: its last 80%). A
    replica killed in that window restarted with a fresh series: its slope covers its longest
    uninterrupted stretch in the window (from 10 s after it was ready again: loading the model is no
    trend), and only a process whose stretch is the whole window counts for the threshold."""
    window = min(8 * 60.0, 0.8 * duration)
    lo = duration - window
    out = {}
    for name, svc in services.items():
        ready = {i["index"]: (i["ready"] or i["started"]) - t0 + 10.0 for i in svc["incarnations"]}
        segments = collections.defaultdict(list)
        for p in rss:
            if p["process"] == name and max(lo, ready[p["incarnation"]]) <= p["t"] <= duration:
                segments[p["incarnation"]].append((p["t"], p["mb"]))
        if not segments:
            continue
        inc, pts = max(segments.items(), key=lambda kv: (kv[1][-1][0] - kv[1][0][0], kv[0]))
        span = pts[-1][0] - pts[0][0]
        whole = len(segments) == 1 and pts[0][0] - lo <= 10.0
        out[name] = {"slope_mb_per_min": chaos_report.slope_per_minute(pts), "incarnation": inc,
                     "from_s": pts[0][0], "to_s": pts[-1][0], "span_s": span, "samples": len(pts),
                     "segments_in_window": len(segments), "whole_window": whole,
                     "first_mb": pts[0][1], "last_mb": pts[-1][1], "max_mb": max(mb for _, mb in pts)}
    return {"window_s": window, "from_s": lo, "processes": out}


def classify_slow_readers(recs: list[dict], dropped: list[dict], gw: dict[str, dict]) -> dict:
    """Mark as "slow reader disconnected" each request that a replica disconnected for reading too
    slowly (`dropped`, from its log) and that the client saw fail: through the gateway, the replica drops
    the gateway's connection, and the client gets what the gateway makes of that (an SSE error event
    `replica_failed` after what was buffered, or a closed connection), not the replica's disconnect.
    What the client saw stays in the record's `client_saw`. Returns the counts for the summary."""
    ids = {d["id"] for d in dropped if d["id"]}
    saw = collections.Counter()
    for r in recs:
        if r["id"] in ids and r["outcome"] in (Outcome.ERROR, Outcome.UNCLEAR):
            r["client_saw"] = f"{r['outcome']}: {r['kind']}"
            saw[r["client_saw"]] += 1
            r.update(outcome=Outcome.SLOW_DROPPED, kind="slow reader disconnected",
                     detail=f"a replica disconnected it as a slow reader; the client saw {r['kind']}"
                            + (f" ({r['detail']})" if r["detail"] else ""))
    by_id = {r["id"]: r for r in recs}
    return {
        "requests": sum(r["outcome"] == Outcome.SLOW_DROPPED for r in recs),
        "replica_logged": len(dropped),
        "replica_logged_by_process": dict(collections.Counter(d["process"] for d in dropped)),
        "replica_logged_without_id": sum(d["id"] is None for d in dropped),
        "replica_logged_by_client_outcome": dict(collections.Counter(
            by_id[d["id"]]["outcome"] if d["id"] in by_id else "no client record" for d in dropped)),
        "reclassified_from": dict(saw),
        "gateway_midstream_failures": sum(1 for i in ids if gw.get(i, {}).get("midstream_failure")),
    }


def analyse(raw: dict, cfg: dict) -> dict:
    recs = raw["records"]
    t0 = raw["t0"]
    services = raw["services"]
    gw = gateway_lines(services, t0)
    lines = replica_lines(services, t0)
    slow = classify_slow_readers(recs, slow_readers(services, t0, lines), gw)
    slow["metrics_at_end"] = {n: e["metrics"].get(SLOW_READERS) for n, e in raw["end_state"].items()
                              if n.startswith("replica") and isinstance(e.get("metrics"), dict)}
    slow["metrics_at_end_sum"] = sum(v or 0 for v in slow["metrics_at_end"].values())
    outcomes = collections.Counter(r["outcome"] for r in recs)
    by_scenario = collections.defaultdict(collections.Counter)
    for r in recs:
        by_scenario[r["scenario"]][r["outcome"]] += 1
    errors = collections.Counter(r["kind"] for r in recs if r["outcome"] == Outcome.ERROR)
    unclear = collections.Counter(r["kind"] for r in recs if r["outcome"] == Outcome.UNCLEAR)
    dups, missing_ids = duplicated_work(lines)
    replica_by_url = {s["url"]: name for name, s in services.items() if name.startswith("replica")}
    served_by = collections.defaultdict(set)
    for ln in lines:
        if ln["id"]:
            served_by[ln["id"]].add(ln["process"])

    def evidence(r: dict) -> dict:
        g = gw.get(r["id"], {})
        return {"id": r["id"], "scenario": r["scenario"], "path": r["path"], "start_s": round(r["start"], 2),
                "end_s": round(r["end"], 2), "kind": r["kind"], "detail": r["detail"], "events": r["events"],
                "gateway": {**g, "replica": replica_by_url.get(g.get("replica"), g.get("replica"))} if g else None,
                "replica_lines": sorted(served_by.get(r["id"], ()))}

    hung = [evidence(r) for r in recs if r["outcome"] == Outcome.HUNG]
    unclear_list = [evidence(r) for r in recs if r["outcome"] == Outcome.UNCLEAR]

    # streams a kill broke: streamed requests in flight at a kill moment that then failed, and that
    # the gateway had sent to the killed replica (when its log says where it went, last or before a resume)
    for k in raw["kills"]:
        failed = []
        for r in recs:
            if not r["stream"] or r["outcome"] not in (Outcome.ERROR, Outcome.UNCLEAR, Outcome.HUNG):
                continue
            if not (r["start"] <= k["t"] + 0.5 and r["end"] >= k["t"]):
                continue
            g = gw.get(r["id"], {})
            went = {g.get("replica"), *(x["replica"] for x in g.get("resumed", ()))}
            if not went & {None, "-", k["url"]}:
                continue
            failed.append({"id": r["id"], "outcome": r["outcome"], "kind": r["kind"]})
        k["streams_failed"] = failed
        until = k["t"] + (k.get("restart_s") or 0.0) + 2.0
        k["streams_resumed"] = sum(1 for g in gw.values() for x in g.get("resumed", ())
                                   if x["replica"] == k["url"] and k["t"] - 0.5 <= x["t"] <= until)
        k["in_flight_streams"] = sum(1 for r in recs if r["stream"] and r["start"] <= k["t"] <= r["end"])
        # requests the gateway sent elsewhere after this replica went away (its own log's words)
        until = k["t"] + (k.get("restart_s") or 0.0) + 2.0
        why = collections.Counter(x["why"] for g in gw.values() for x in g.get("retries", ())
                                  if x["replica"] == k["url"] and k["t"] - 0.5 <= x["t"] <= until)
        k["gateway_retries"] = dict(why)

    burst_rows = []
    all_503, after_sent, by_source = [], [], collections.defaultdict(list)
    to_gateway_line, gateway_own = [], []  # sent -> the gateway's log line for it; the gateway's own timing
    for b in raw["bursts"]:
        rs = [r for r in recs if r["burst"] == b["index"]]
        lat503 = [r["end"] - r["start"] for r in rs if r["status"] == 503]
        all_503 += lat503
        after_sent += [r["end"] - r["sent"] for r in rs if r["status"] == 503 and r["sent"] is not None]
        for r in rs:
            if r["status"] == 503:
                by_source[(r["detail"] or "no message")[:80]].append(r["end"] - r["start"])
                g = gw.get(r["id"], {})
                if "end" in g and r["sent"] is not None and g.get("replica") == "-":  # the gateway's own 503
                    to_gateway_line.append(g["end"] - r["sent"])
                    gateway_own.append(g["seconds"])
        burst_rows.append({**b, "ok": sum(r["outcome"] == Outcome.OK for r in rs), "503": len(lat503),
                           "other": sum(r["outcome"] != Outcome.OK and r["status"] != 503 for r in rs),
                           "p50_503_s": percentile(lat503, 0.5), "p99_503_s": percentile(lat503, 0.99),
                           "ok_p50_s": percentile([r["end"] - r["start"] for r in rs if r["outcome"] == Outcome.OK], 0.5)})
    slopes = rss_slopes(raw["rss"], services, raw["duration_s"], t0)
    cores = {}  # CPU each process used during the load, in cores (incarnations summed)
    for name in services:
        used = 0.0
        for inc in {p["incarnation"] for p in raw["rss"] if p["process"] == name}:
            pts = [p for p in raw["rss"] if p["process"] == name and p["incarnation"] == inc
                   and p["t"] <= raw["duration_s"] and p.get("cpu_s") is not None]
            if len(pts) > 1:
                used += pts[-1]["cpu_s"] - pts[0]["cpu_s"]
        cores[name] = used / raw["duration_s"]
    cores["client (this process)"] = raw["client_cpu_s"] / raw["duration_s"]
    judged = {n: p for n, p in slopes["processes"].items() if p["whole_window"]}
    replicas_end = {n: s for n, s in raw["end_state"].items() if n.startswith("replica")}
    p50_503 = percentile(all_503, 0.5)
    bin_s = 5.0 if raw["duration_s"] <= 900 else 15.0
    timeline = collections.defaultdict(collections.Counter)
    for r in recs:
        timeline[int(r["end"] // bin_s)][timeline_class(r)] += 1
    must = {
        "no_hung_requests": not hung,
        "no_duplicated_work": not dups and missing_ids == 0 and bool(lines),
        "every_failure_has_a_clear_error": not unclear_list,
        "replicas_idle_at_end": bool(replicas_end) and all(s.get("clean") for s in replicas_end.values()),
        "rss_slope_below_5_mb_per_min": bool(judged) and all(p["slope_mb_per_min"] < RSS_SLOPE_LIMIT
                                                             for p in judged.values()),
        "burst_503_p50_below_50ms": p50_503 is not None and p50_503 < BURST_503_P50_LIMIT,
        "no_stream_failed_by_a_kill": not any(k["streams_failed"] for k in raw["kills"]),
    }
    # the pause a resumed stream's client saw: its longest wait between two events
    resumed = [r for r in recs if r["stream"] and gw.get(r["id"], {}).get("resumed")]
    gaps = [r["max_gap_s"] for r in resumed if r.get("max_gap_s") is not None and r["outcome"] == Outcome.OK]
    return {
        "config": cfg, "duration_s": raw["duration_s"], "load_end_s": raw["load_end_s"],
        "requests": len(recs), "completed": outcomes[Outcome.OK], "outcomes": dict(outcomes),
        "slow_readers": slow,
        "by_scenario": {k: dict(v) for k, v in sorted(by_scenario.items())},
        "errors_by_kind": dict(errors.most_common()), "unclear_by_kind": dict(unclear.most_common()),
        "hung": hung, "unclear": unclear_list[:50], "unclear_count": len(unclear_list),
        "duplicated": dups[:50], "duplicated_count": len(dups), "replica_request_lines": len(lines),
        "replica_lines_without_id": missing_ids,
        "end_state": raw["end_state"], "kills": raw["kills"], "bursts": burst_rows,
        "burst_503": {"count": len(all_503), "p50_s": p50_503, "p99_s": percentile(all_503, 0.99),
                      "after_sent_p50_s": percentile(after_sent, 0.5), "after_sent_p99_s": percentile(after_sent, 0.99),
                      "gateway_503_logged_after_sent_p50_s": percentile(to_gateway_line, 0.5),
                      "gateway_503_logged_after_sent_p99_s": percentile(to_gateway_line, 0.99),
                      "gateway_503_own_seconds_p50_s": percentile(gateway_own, 0.5),
                      "by_message": {m: {"count": len(v), "p50_s": percentile(v, 0.5), "p99_s": percentile(v, 0.99)}
                                     for m, v in sorted(by_source.items(), key=lambda kv: -len(kv[1]))}},
        "streams_failed_by_kills": sum(len(k["streams_failed"]) for k in raw["kills"]),
        "streams_resumed": {"count": len(resumed), "ok": sum(r["outcome"] == Outcome.OK for r in resumed),
                            "outcomes": dict(collections.Counter(r["outcome"] for r in resumed)),
                            "client_gap_p50_s": percentile(gaps, 0.5), "client_gap_p99_s": percentile(gaps, 0.99),
                            "client_gap_max_s": max(gaps, default=None)},
        "rss_slopes": slopes,
        "cpu_cores": cores, "loadavg_1min": {"start": raw["loadavg"][0][0], "end": raw["loadavg"][-1][0]},
        "timeline": {"bin_s": bin_s, "bins": {str(b * bin_s): dict(c) for b, c in sorted(timeline.items())}},
        "must_show": must,
        "services": {n: {"url": s["url"], "incarnations": [{k: v for k, v in i.items()} for i in s["incarnations"]]}
                     for n, s in services.items()},
    }
