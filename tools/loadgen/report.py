"""Summaries of a run: latency percentiles, throughput, errors, and a table for people."""
from __future__ import annotations

from collections import Counter

import numpy as np

from tools.loadgen.client import Result

PERCENTILES = (("mean", None), ("median", 50), ("p90", 90), ("p99", 99))


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {name: float("nan") for name, _ in PERCENTILES}
    arr = np.asarray(values) * 1000.0  # milliseconds
    return {name: float(arr.mean() if q is None else np.percentile(arr, q)) for name, q in PERCENTILES}


def summarize(results: list[Result], wall_seconds: float) -> dict:
    ok = [r for r in results if r.ok]
    errors = Counter(str(r.status) if r.status is not None else (r.error or "error").split(":")[0]
                     for r in results if not r.ok)
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results),
        "completed": len(ok),
        "errors": dict(errors),
        "duration_s": wall_seconds,
        "request_throughput": len(ok) / wall_seconds if wall_seconds else 0.0,
        "output_throughput": output_tokens / wall_seconds if wall_seconds else 0.0,
        "total_output_tokens": output_tokens,
        "total_prompt_tokens": sum(r.prompt_tokens for r in ok),
        "ttft_ms": _stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _stats([x for r in ok for x in r.itls]),
        "e2e_ms": _stats([r.e2e for r in ok if r.e2e is not None]),
    }


def format_table(summary: dict, title: str = "") -> str:
    lines = [f"== {title} ==" if title else "=" * 40]
    lines.append(f"requests: {summary['completed']}/{summary['requests']} ok in {summary['duration_s']:.2f} s"
                 + (f", errors {summary['errors']}" if summary["errors"] else ""))
    lines.append(f"request throughput: {summary['request_throughput']:.2f} req/s   "
                 f"output throughput: {summary['output_throughput']:.1f} tok/s")
    lines.append(f"{'metric (ms)':<12}" + "".join(f"{name:>10}" for name, _ in PERCENTILES))
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        lines.append(f"{key[:-3].upper():<12}" + "".join(f"{summary[key][n]:>10.2f}" for n, _ in PERCENTILES))
    stages = summary.get("stages_ms")
    if stages:
        lines.append("where an average request's time went (server's own instrumentation, ms):")
        lines.append("  " + "  ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    return "\n".join(lines)
