"""What an operator's convenience costs the server at concurrency 64, A against B:

- logging: the default logs (a line per request, a stats line every 10 s) against
  `--disable-log-requests --log-stats-interval 0`;
- dashboard: a dashboard page open (a client reading /dashboard/stream throughout) against none.

    .venv/bin/python bench/experiments/settings_cost.py logging|dashboard [--models tiny-llama,smollm2-135m] [--rounds 3]

The two settings alternate, round after round, on the same model folder and workload as
bench/serving.py (128 tokens in, 128 out, streamed), so the machine's drift lands on both. Writes
bench/results/<experiment>_cost.{md,png,json}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from types import SimpleNamespace

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/, above experiments/
sys.path.insert(0, BENCH)

from models import MODELS  # noqa: E402
from harness import run_scalellm, write_table  # noqa: E402

# experiment -> {setting: (server flags, whether a dashboard page is open)}
EXPERIMENTS = {
    "logging": {"logs on (default)": ((), False),
                "logs off": (("--disable-log-requests", "--log-stats-interval", "0"), False)},
    "dashboard": {"dashboard open": ((), True), "no dashboard": ((), False)},
}


def measure(settings: dict, models: list[str], rounds: int, concurrency: int, waves: int) -> dict:
    args = SimpleNamespace(input_len=128, output_len=128, concurrency=[concurrency], min_requests=16, waves=waves)
    out: dict = {}
    for name in models:
        folder = MODELS[name]()
        runs = out[name] = {label: [] for label in settings}
        for r in range(rounds):
            for label, (flags, viewer) in settings.items():
                print(f"{name} round {r + 1}/{rounds}: {label}", flush=True)
                s = run_scalellm(folder, args, flags, viewer=viewer)[concurrency]
                runs[label].append({"tok_s": s["output_throughput"], "e2e_p50_ms": s["e2e_ms"]["median"],
                                    "cpu_ms_per_token": s["cpu_ms_per_token"]})
    return out


def report(experiment: str, results: dict, concurrency: int) -> str:
    a, b = EXPERIMENTS[experiment]
    lines = [f"# {experiment.capitalize()} cost at concurrency {concurrency}", "",
             f"Output tok/s of ScaleLLM's server, {a} against {b}, alternating round by round "
             f"(`.venv/bin/python bench/experiments/settings_cost.py {experiment}`). Spread: min-max over the rounds.", "",
             "| model | setting | rounds (tok/s) | mean tok/s | spread | E2E p50 ms (mean) | CPU ms/token (mean) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for name, runs in results.items():
        for label, rows in runs.items():
            tok = [r["tok_s"] for r in rows]
            lines.append(f"| {name} | {label} | {', '.join(f'{t:.0f}' for t in tok)} | {statistics.mean(tok):.1f} | "
                         f"{min(tok):.0f}-{max(tok):.0f} | {statistics.mean(r['e2e_p50_ms'] for r in rows):.0f} | "
                         f"{statistics.mean(r['cpu_ms_per_token'] for r in rows):.2f} |")
        on, off = (statistics.mean(r["tok_s"] for r in runs[k]) for k in (a, b))
        lines.append(f"| {name} | {a} / {b} | | {on / off:.3f}x | | | |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (name, runs) in zip(axes[0], results.items()):
        for i, (label, rows) in enumerate(runs.items()):
            tok = [r["tok_s"] for r in rows]
            ax.bar(i, statistics.mean(tok), color=f"C{i}", alpha=0.6)
            ax.scatter([i] * len(tok), tok, color="black", s=12, zorder=3)
        ax.set_xticks(range(len(runs)), list(runs))
        ax.set_title(name)
        ax.set_ylabel("output tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=sorted(EXPERIMENTS))
    ap.add_argument("--models", default="tiny-llama,smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--waves", type=int, default=3, help="requests per run = waves x concurrency")
    args = ap.parse_args()
    results = measure(EXPERIMENTS[args.experiment], args.models.split(","), args.rounds, args.concurrency, args.waves)
    write_table(f"{args.experiment}_cost", report(args.experiment, results, args.concurrency), results,
                lambda path: plot(results, path), show=True)


if __name__ == "__main__":
    main()
