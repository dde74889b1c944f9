"""bench/quantized.py's results -> bench/results/quantized.md and quantized.png."""
from __future__ import annotations

import os
import statistics

SERVERS = ["ScaleLLM", "llama.cpp"]


def _values(data: dict, key: str, pick) -> list[float]:
    return [pick(rep[key]) for rep in data["repeats"] if key in rep]


def _cell(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    mid = statistics.median(values)
    return f"{mid:.{digits}f}" if len(values) == 1 else f"{mid:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(data: dict) -> dict:
    c1, c_hi = min(data["config"]["concurrency"]), max(data["config"]["concurrency"])
    out = {}
    for fmt in data["files"]:
        for server in SERVERS:
            key = f"{server}|{fmt}"
            out[key] = {
                "tpot": _values(data, key, lambda r: r["runs"][str(c1)]["tpot_ms"]["median"]
                                if str(c1) in r["runs"] else r["runs"][c1]["tpot_ms"]["median"]),
                "tput": _values(data, key, lambda r: r["runs"][str(c_hi)]["output_throughput"]
                                if str(c_hi) in r["runs"] else r["runs"][c_hi]["output_throughput"]),
                "weights": _values(data, key, lambda r: r["weight_mib"]),
                "rss": _values(data, key, lambda r: r["rss_mib_after_load"]),
            }
    return out


def write_report(data: dict, folder: str) -> str:
    s = summarize(data)
    c1, c_hi = min(data["config"]["concurrency"]), max(data["config"]["concurrency"])
    n = len(data["repeats"])
    lines = ["# Quantized weights: ScaleLLM vs llama.cpp on the same GGUF files", "",
             f"SmolLM2-135M-Instruct, {data['config']['input_len']} tokens in / {data['config']['output_len']} out, "
             f"streamed; {n} repeat(s), median (min-max). llama.cpp: {data['llama_cpp']['package']}, "
             f"built with {' '.join(data['llama_cpp']['cmake'])}; llama-server -t 2 -np 64.", "",
             f"| format | server | c={c1} TPOT p50 (ms) | c={c_hi} output tok/s | weights (MiB) | RSS after load (MiB) |",
             "|---|---|---|---|---|---|"]
    for fmt in data["files"]:
        for server in SERVERS:
            v = s[f"{server}|{fmt}"]
            if not v["tpot"]:
                continue
            lines.append(f"| {fmt} | {server} | {_cell(v['tpot'], 2)} | {_cell(v['tput'])} | {_cell(v['weights'])} | "
                         f"{_cell(v['rss'])} |")
    lines += ["", "## Ratios (medians)", "",
              f"| format | ours / llama.cpp c={c1} TPOT | ours / llama.cpp c={c_hi} tok/s | ours: TPOT / bf16's | "
              f"ours: weights / bf16's held | ours: weights / bf16's one copy |", "|---|---|---|---|---|---|"]
    base = s.get("ScaleLLM|bf16")
    for fmt in data["files"]:
        ours, peer = s[f"ScaleLLM|{fmt}"], s[f"llama.cpp|{fmt}"]

        def ratio(a, b, digits=2):
            a, b = _median(a), _median(b)
            return "-" if a is None or not b else f"{a / b:.{digits}f}"
        one_copy = "-"
        if base and base["weights"] and ours["weights"]:
            # bf16's projections are held twice (packed for oneDNN and plain for the small-batch kernel); the
            # tied embedding once: a single copy of every weight is the parameter count times two bytes
            one_copy = f"{_median(ours['weights']) / data.get('bf16_one_copy_mib', _median(base['weights'])):.2f}"
        lines.append(f"| {fmt} | {ratio(ours['tpot'], peer['tpot'])} | {ratio(ours['tput'], peer['tput'])} | "
                     f"{ratio(ours['tpot'], base['tpot']) if base else '-'} | "
                     f"{ratio(ours['weights'], base['weights']) if base else '-'} | {one_copy} |")
    path = os.path.join(folder, "quantized.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(s, data, os.path.join(folder, "quantized.png"), c1, c_hi)
    return path


def _plot(s: dict, data: dict, path: str, c1: int, c_hi: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmts = list(data["files"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [("tpot", f"c={c1} TPOT p50 (ms, lower is better)"), ("tput", f"c={c_hi} output tok/s"),
              ("weights", "weights held (MiB)")]
    width = 0.38
    for ax, (key, title) in zip(axes, panels):
        for i, server in enumerate(SERVERS):
            vals = [_median(s[f"{server}|{f}"][key]) or 0 for f in fmts]
            ax.bar([x + (i - 0.5) * width for x in range(len(fmts))], vals, width, label=server)
        ax.set_xticks(range(len(fmts)), fmts)
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle("SmolLM2-135M-Instruct GGUF: ScaleLLM vs llama.cpp (same files, same machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
