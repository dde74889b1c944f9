"""The report of bench/chaos.py: the markdown (bench/results/chaos.md), the plot (chaos.png) and the
least-squares RSS slope."""
from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("ok", "client disconnect", "slow reader disconnected", "503", "other error", "unclear failure", "hung")
COLORS = {"ok": "tab:green", "client disconnect": "tab:gray", "slow reader disconnected": "tab:olive",
          "503": "tab:orange", "other error": "tab:purple", "unclear failure": "tab:red", "hung": "black"}


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return None
    return 60.0 * sum((t - mx) * (v - my) for t, v in points) / sxx


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{1000 * s:.1f}"


def _pf(ok: bool) -> str:
    return "**PASS**" if ok else "**FAIL**"


def _evidence_row(e: dict) -> str:
    g = e.get("gateway")
    gw = "no line" if not g else (f"{g.get('replica', '?')} status {g.get('status', '?')} after "
                                   f"{g.get('seconds', '?')} s" + (f"; mid-stream failure: {g['midstream_failure']}"
                                                                   if g.get("midstream_failure") else ""))
    reps = ", ".join(e["replica_lines"]) or "none"
    return (f"| `{e['id']}` | {e['path']} | {e['start_s']:.1f} | {e['events']} | {e['kind']} | "
            f"{(e.get('detail') or '').replace('|', '/')} | {gw} | {reps} |")


def command(cfg: dict) -> str:
    """The command line that repeats this run."""
    cmd = f".venv/bin/python bench/chaos.py --minutes {cfg['minutes']:g}"
    if cfg["kill_every_s"] != 120:
        cmd += f" --kill-every {cfg['kill_every_s']:g}"
    if cfg["burst_every_s"] != 60:
        cmd += f" --burst-every {cfg['burst_every_s']:g}"
    if cfg["burst_first_s"] != cfg["burst_every_s"] / 2:
        cmd += f" --burst-first {cfg['burst_first_s']:g}"
    if cfg["deadline_s"] != 60:
        cmd += f" --deadline {cfg['deadline_s']:g}"
    if cfg["seed"]:
        cmd += f" --seed {cfg['seed']}"
    return cmd


def slow_readers(sr: dict) -> str:
    """The paragraph on the streams that the replicas disconnected for reading too slowly."""
    seen = ", ".join(f"{v} {k}" for k, v in sr["reclassified_from"].items())
    by_proc = ", ".join(f"{p} {v}" for p, v in sorted(sr["replica_logged_by_process"].items()))
    metrics = ", ".join(f"{n} {'-' if v is None else f'{v:g}'}" for n, v in sr["metrics_at_end"].items())
    return (f"Slow readers disconnected: **{sr['requests']}** requests ended so. The replicas logged "
            f"{sr['replica_logged']} slow-reader disconnects ({by_proc or 'none'}"
            + (f"; {sr['replica_logged_without_id']} without a request line to name its x-request-id"
               if sr["replica_logged_without_id"] else "") + "). "
            + (f"Through the gateway the client saw {seen}: the replica dropped the gateway's connection, "
               f"not the client's ({sr['gateway_midstream_failures']} of them logged by the gateway as the replica "
               "failing mid-stream); these are counted here from the replicas' logs. " if seen else "")
            + ("None of the streams reached that: a replica's limit counts only what waits in its own buffer, "
               "which fills only once the kernel's socket buffers are full, and on 127.0.0.1 those take megabytes "
               "(measured: about 3 MB into a socket whose reader reads nothing), the gateway's buffers on top; far "
               "more than any of these streams. " if not sr["replica_logged"] else "")
            + f"`scalellm:slow_readers_disconnected_total` summed over the replicas at the end: "
            f"**{sr['metrics_at_end_sum']:g}** ({metrics or 'not read'}); a killed replica's counter restarts at 0 "
            "with its new process, so this sum leaves out what its earlier incarnations counted.")


def markdown(s: dict, png: str) -> str:
    cfg = s["config"]
    must = s["must_show"]
    n_rep = cfg["replicas"]
    steady = cfg["stream_workers"] + cfg["plain_workers"] + cfg["slow_workers"]
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = " with uncommitted changes" if _git("status", "--porcelain", "--untracked-files=no") else ""
    judged = {n: p for n, p in s["rss_slopes"]["processes"].items() if p["whole_window"]}
    slopes = [p["slope_mb_per_min"] for p in judged.values() if p["slope_mb_per_min"] is not None]
    replicas_end = {n: e for n, e in s["end_state"].items() if n.startswith("replica")}
    b503 = s["burst_503"]
    killed = sorted({k["replica"] for k in s["kills"]})
    spared = [f"replica{i}" for i in range(n_rep) if f"replica{i}" not in killed]
    rss_measured = (f"max {max(slopes):+.2f} MB/min ({', '.join(judged)})" if slopes else
                    "no process ran the whole window")
    lines = [
        "# Chaos: the gateway over three replicas under hostile load",
        "",
        f"`{command(cfg)}` on {s['date']} (commit {commit}{dirty}), "
        f"{os.cpu_count()} cores; load {s['duration_s']:.0f} s, wall time {s['wall_s']:.0f} s in all (model build, "
        "start-up, the requests' tail, the settle and shutdown included). CPU used during the load, in cores: "
        + ", ".join(f"{n} {c:.2f}" for n, c in s["cpu_cores"].items())
        + f"; the machine's 1-minute load average {s['loadavg_1min']['start']:.1f} at the start of the load and "
        f"{s['loadavg_1min']['end']:.1f} at its end (other jobs on the machine included).",
        "",
        f"Gateway (`--max-in-flight {cfg['gateway_max_in_flight']} --max-queue {cfg['gateway_max_queue']} "
        f"--health-interval {cfg['health_interval_s']:g} --eject-seconds {cfg['eject_seconds']:g}`) over {n_rep} "
        "replicas of the tiny random-weight test llama (`--dtype float32 --max-model-len 512 --kv-cache-memory 64MB "
        f"--block-size 16 --num-threads 1 --max-num-seqs {cfg['replica_max_num_seqs']} --max-queue-len "
        f"{cfg['replica_max_queue_len']} --max-stream-buffer-bytes {cfg['replica_max_stream_buffer_bytes']}`: a "
        "stream whose reader leaves more unread is disconnected), all on 127.0.0.1. Steady load: closed-loop "
        "clients, each pausing up to "
        f"{cfg['think_s']:g} s between requests, on /v1/completions and /v1/chat/completions: {cfg['stream_workers']} "
        f"streaming (max_tokens {cfg['max_tokens_stream'][0]}-{cfg['max_tokens_stream'][1]}; "
        f"{cfg['disconnect_share']:.0%} of their requests close the connection after a random number of events or a "
        f"random delay), {cfg['plain_workers']} non-streamed (max_tokens {cfg['max_tokens_plain'][0]}-"
        f"{cfg['max_tokens_plain'][1]}; {cfg['disconnect_share'] / 2:.0%} closed after a random delay) and "
        f"{cfg['slow_workers']} slow reader (streams read through a 4 KiB receive buffer, {cfg['slow_read_bytes']} "
        f"bytes every {cfg['slow_read_pause_s']:g} s, {cfg['slow_stall_share']:.0%} of them stalled once for "
        f"{cfg['slow_stall_s'][0]:g}-{cfg['slow_stall_s'][1]:g} s). A burst of {cfg['burst_factor']}x the steady "
        f"concurrency ({cfg['burst_factor'] * steady} non-streamed requests, max_tokens {cfg['max_tokens_burst']}) "
        f"every {cfg['burst_every_s']:g} s from {cfg['burst_first_s']:g} s, on keep-alive "
        "connections opened just before (a client with a warm pool); "
        f"one replica SIGKILLed every {cfg['kill_every_s']:g} s and restarted on its port "
        f"(in turn: {', '.join(killed) or 'none in this run'}; never killed: {', '.join(spared) or 'none'}, so "
        "their RSS series span the whole run). Every request has its own x-request-id and a "
        f"{cfg['deadline_s']:g} s deadline.",
        "",
        "## Must-show",
        "",
        "| requirement | threshold | measured | result |",
        "|---|---|---|---|",
        f"| hung requests | 0 | {len(s['hung'])} | {_pf(must['no_hung_requests'])} |",
        f"| duplicated work (one request generating on two live replicas at once) | 0 | {s['duplicated_count']} "
        f"(from {s['replica_request_lines']} replica request lines, {s['replica_lines_without_id']} without an "
        f"x-request-id) | {_pf(must['no_duplicated_work'])} |",
        f"| failures without a clear OpenAI error (body or SSE error event) | 0 | {s['unclear_count']} | "
        f"{_pf(must['every_failure_has_a_clear_error'])} |",
        "| every replica idle at the end (/load: running, waiting, KV usage, in flight) | all 0 | "
        + "; ".join(f"{n}: " + (f"{e['load'].get('num_requests_running')}, {e['load'].get('num_requests_waiting')}, "
                                f"{e['load'].get('kv_cache_usage')}, {e['load'].get('in_flight')}"
                                if "load" in e else e.get("error", "?")) for n, e in replicas_end.items())
        + f" | {_pf(must['replicas_idle_at_end'])} |",
        f"| RSS slope per process over the last {s['rss_slopes']['window_s'] / 60:.1f} min | < 5 MB/min | "
        f"{rss_measured} | {_pf(must['rss_slope_below_5_mb_per_min'])} |",
        f"| time to a 503 during bursts, p50 (p99) | p50 < 50 ms | {_ms(b503['p50_s'])} ms ({_ms(b503['p99_s'])} ms), "
        f"{b503['count']} 503s | {_pf(must['burst_503_p50_below_50ms'])} |",
        f"| streamed requests failed by a kill (the gateway resumes them on another replica) | 0 | "
        f"{s['streams_failed_by_kills']} ({s['streams_resumed']['count']} resumed; client gap p50 "
        f"{_ms(s['streams_resumed']['client_gap_p50_s'])} ms, p99 {_ms(s['streams_resumed']['client_gap_p99_s'])} ms) "
        f"| {_pf(must['no_stream_failed_by_a_kill'])} |",
        "",
        "Per kill below.",
        "",
        "## Requests",
        "",
        f"{s['requests']} requests, {s['completed']} completed.",
        "",
        slow_readers(s["slow_readers"]),
        "",
        "| scenario | " + " | ".join(CLASSES[:3]) + " | error | unclear failure | hung |",
        "|---|" + "---:|" * 6,
    ]
    for scen, c in s["by_scenario"].items():
        lines.append(f"| {scen} | " + " | ".join(str(c.get(k, 0)) for k in
                                               ("ok", "client disconnect", "slow reader disconnected", "error",
                                                "unclear failure", "hung")) + " |")
    lines += ["", "### Errors by kind", "", "Clear errors (status and OpenAI error type/code; `stream` = an SSE error "
              "event after a 200):", "", "| kind | count |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in s["errors_by_kind"].items()] or ["| none | 0 |"]
    lines += ["", "Failures without a clear error:", "", "| kind | count |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in s["unclear_by_kind"].items()] or ["| none | 0 |"]
    head = ("| x-request-id | path | started at s | events | outcome | detail | gateway log | replica lines |\n"
            "|---|---|---:|---:|---|---|---|---|")
    if s["hung"]:
        lines += ["", f"### Hung requests ({len(s['hung'])}, first 20)", "", head]
        lines += [_evidence_row(e) for e in s["hung"][:20]]
    if s["unclear"]:
        lines += ["", f"### Failures without a clear error ({s['unclear_count']}, first 20)", "", head]
        lines += [_evidence_row(e) for e in s["unclear"][:20]]
    lines += ["", "## Duplicated work", "",
              "From the replicas' own request lines (`[x-request-id ID]`, the line's time is the end and end - E2E "
              "the start): two lines with one id on two replica processes whose intervals overlap by more than 5 ms.",
              ""]
    if s["duplicated"]:
        lines += ["| x-request-id | first | second | overlap s |", "|---|---|---|---:|"]
        for d in s["duplicated"][:20]:
            a, b = d["a"], d["b"]
            lines.append(f"| `{d['id']}` | {a['process']} {a['start']:.2f}-{a['end']:.2f} s ({a['status']} "
                         f"{a['outcome']}) | {b['process']} {b['start']:.2f}-{b['end']:.2f} s ({b['status']} "
                         f"{b['outcome']}) | {d['overlap_s']:.3f} |")
    else:
        lines.append("None." if s["replica_request_lines"] and not s["replica_lines_without_id"] else
                     "Not countable: the replicas' request lines carry no x-request-id.")
    lines += ["", "## Replica kills", "",
              "Each kill waits (at most 5 s) until the replica's /load shows two requests running, so that it hits "
              "work in flight.", "",
              "The last column counts the gateway's log lines `ID: replica URL <what> (<error>); trying another` for the "
              "killed replica until it was ready again: requests sent to another replica after this one went away "
              "(`lost` after the request reached it, `refused` before). Streams the killed replica was serving "
              "are resumed on another (the gateway's `failed mid-stream; resuming on another` lines).", "",
              "| at s | replica | running on it | pid -> new pid | ready again after s | streams in flight (all replicas) "
              "| streams resumed elsewhere | streams failed by the kill | gateway retries elsewhere |",
              "|---:|---|---:|---|---:|---:|---:|---|---|"]
    for k in s["kills"]:
        kinds: dict[str, int] = {}
        for f in k["streams_failed"]:
            kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
        failed = f"{len(k['streams_failed'])}" + (" (" + ", ".join(f"{v} {n}" for n, v in kinds.items()) + ")"
                                                  if kinds else "")
        restart = k.get("restart_error", "-") if k.get("restart_s") is None else f"{k['restart_s']:.1f}"
        retries = ", ".join(f"{v} {w}" for w, v in k.get("gateway_retries", {}).items()) or "0"
        lines.append(f"| {k['t']:.1f} | {k['replica']} | {k.get('running_at_kill', '?')} | {k['pid']} -> "
                     f"{k.get('new_pid', '-')} | {restart} | "
                     f"{k['in_flight_streams']} | {k.get('streams_resumed', 0)} | {failed} | {retries} |")
    if not s["kills"]:
        lines.append("| - | none | | | | | | | |")
    sr = s["streams_resumed"]
    lines += ["", f"Streams resumed: **{sr['count']}** ({', '.join(f'{v} {k}' for k, v in sr['outcomes'].items()) or 'none'}). "
              f"The pause their clients saw (each stream's longest wait between two events): p50 "
              f"{_ms(sr['client_gap_p50_s'])} ms, p99 {_ms(sr['client_gap_p99_s'])} ms, max {_ms(sr['client_gap_max_s'])} ms."]
    lines += ["", "## Bursts", "", "| at s | size | ok | 503 | other | 503 p50 ms | 503 p99 ms | ok p50 ms |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b in s["bursts"]:
        lines.append(f"| {b['t']:.1f} | {b['size']} | {b['ok']} | {b['503']} | {b['other']} | {_ms(b['p50_503_s'])} | "
                     f"{_ms(b['p99_503_s'])} | {_ms(b['ok_p50_s'])} |")
    lines += ["", f"All bursts: {b503['count']} 503s, p50 {_ms(b503['p50_s'])} ms, p99 {_ms(b503['p99_s'])} ms from "
              f"the moment the client started the request; from the moment its last byte was written: p50 "
              f"{_ms(b503['after_sent_p50_s'])} ms, p99 {_ms(b503['after_sent_p99_s'])} ms (the rest is the client "
              "writing the burst's other requests). The gateway's own 503s (admission refused): its log line comes "
              f"p50 {_ms(b503['gateway_503_logged_after_sent_p50_s'])} ms (p99 "
              f"{_ms(b503['gateway_503_logged_after_sent_p99_s'])} ms) after the client wrote the request, while it "
              f"times the request at p50 {_ms(b503['gateway_503_own_seconds_p50_s'])} ms itself: the rest is spent "
              "before its handler runs (accepting, reading and parsing, waiting for its event loop or for a core). "
              "By the 503's message:", "",
              "| message | count | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
    lines += [f"| {m} | {v['count']} | {_ms(v['p50_s'])} | {_ms(v['p99_s'])} |" for m, v in b503["by_message"].items()]
    lines += ["", "## End state", "",
              f"Read {cfg['settle_s']:g} s after the last request ended.", "",
              "| replica | /load running | waiting | KV usage | in flight | /metrics running / waiting / KV | idle |",
              "|---|---:|---:|---:|---:|---|---|"]
    for n, e in replicas_end.items():
        ld, m = e.get("load", {}), e.get("metrics", {})
        lines.append(f"| {n} | {ld.get('num_requests_running', '?')} | {ld.get('num_requests_waiting', '?')} | "
                     f"{ld.get('kv_cache_usage', '?')} | {ld.get('in_flight', '?')} | "
                     f"{m.get('num_requests_running', '?')} / {m.get('num_requests_waiting', '?')} / "
                     f"{m.get('kv_cache_usage_perc', '?')} | {'yes' if e.get('clean') else 'NO ' + e.get('error', '')} |")
    gw = s["end_state"].get("gateway", {})
    if gw and "error" not in gw:
        lines += ["", "The gateway's view then: " + "; ".join(f"{u} {v['state']}, {v['in_flight']} in flight"
                                                               for u, v in gw.items()) + "."]
    rs = s["rss_slopes"]
    lines += ["", "## RSS", "",
              f"VmRSS every {cfg['rss_interval_s']:g} s; slope by least squares over {rs['from_s']:.0f}-"
              f"{s['duration_s']:.0f} s (the last {rs['window_s'] / 60:.1f} min). A replica killed in that window "
              "starts a new series at its restart: its slope is over its longest uninterrupted stretch and is shown "
              "but not judged; the threshold applies to the processes that ran the whole window.", "",
              "| process | stretch (incarnation) | first MB | last MB | max MB | slope MB/min | judged |",
              "|---|---|---:|---:|---:|---:|---|"]
    for n, p in rs["processes"].items():
        slope = "-" if p["slope_mb_per_min"] is None else f"{p['slope_mb_per_min']:+.2f}"
        lines.append(f"| {n} | {p['from_s']:.0f}-{p['to_s']:.0f} s (#{p['incarnation']}, {p['segments_in_window']} "
                     f"in window) | {p['first_mb']:.0f} | {p['last_mb']:.0f} | {p['max_mb']:.0f} | {slope} | "
                     f"{'yes' if p['whole_window'] else 'no'} |")
    lines += ["", f"![RSS per process and request outcomes over time]({png})", "",
              f"Process logs: `{os.path.relpath(s['log_dir'], ROOT)}` (one file per process incarnation); every request: "
              "`requests.json` there.", ""]
    return "\n".join(lines)


def plot(raw: dict, s: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    names = sorted({p["process"] for p in raw["rss"]}, key=lambda n: (n != "gateway", n))
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for name in names:
        incs = sorted({p["incarnation"] for p in raw["rss"] if p["process"] == name})
        for i in incs:
            pts = [(p["t"], p["mb"]) for p in raw["rss"] if p["process"] == name and p["incarnation"] == i]
            ax1.plot([t for t, _ in pts], [mb for _, mb in pts], color=colors[name], label=name if i == incs[0] else None)
    for k in s["kills"]:
        for ax in (ax1, ax2):
            ax.axvline(k["t"], color="red", linestyle="--", linewidth=1)
        ax1.annotate(f"kill {k['replica']}", (k["t"], ax1.get_ylim()[1]), fontsize=7, color="red",
                     rotation=90, va="top", ha="right")
    for b in s["bursts"]:
        for ax in (ax1, ax2):
            ax.axvline(b["t"], color="gray", linestyle=":", linewidth=1)
    ax1.set_ylabel("RSS (MB)")
    ax1.set_title("RSS per process (red dashes: replica killed; grey dots: burst)")
    ax1.legend(fontsize=8, loc="lower right")
    width = s["timeline"]["bin_s"]
    bins = {float(k): v for k, v in s["timeline"]["bins"].items()}
    xs = sorted(bins)
    bottom = [0] * len(xs)
    for c in CLASSES:
        ys = [bins[x].get(c, 0) for x in xs]
        if any(ys):
            ax2.bar([x + width / 2 for x in xs], ys, width=width * 0.9, bottom=bottom, color=COLORS[c], label=c)
            bottom = [a + b for a, b in zip(bottom, ys)]
    ax2.set_ylim(0, 1.3 * max(bottom, default=1))  # room for the legend
    ax2.set_ylabel(f"requests ended per {width:g} s")
    ax2.set_xlabel("seconds since the load started")
    ax2.set_title("Request outcomes over time")
    ax2.legend(fontsize=8, loc="upper left", ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
