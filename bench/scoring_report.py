"""bench/scoring.py's report: the markdown table, the commands, the CPU, and the plot."""
from __future__ import annotations

import math
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "scalellm_scoring"


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def command_output(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_summary() -> tuple[str, str]:
    info = dict(line.split(":", 1) for line in command_output(["lscpu"]).splitlines() if ":" in line)
    model = info.get("Model name", "unknown CPU").strip()
    flags = info.get("Flags", "").split()
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
    present = [f for f in wanted if f in flags]
    absent = [f for f in wanted if f not in flags]
    return model, (f"{len(flags)} flags; SIMD/matrix: {' '.join(present) or 'none of the listed'}"
                   f"{'; absent: ' + ' '.join(absent) if absent else ''}")


def fmt_cmd(cmd: list[str]) -> str:
    return " ".join(rel(c) if c.startswith(ROOT) else (f"'{c}'" if "," in c or " " in c else c) for c in cmd)


def write_report(data: dict, png: str) -> str:
    cmp_, ours, hf = data["comparison"], data["ours"], data["hf"]
    lines = [
        "# Scoring: lm-evaluation-harness on ScaleLLM vs its transformers backend",
        "",
        f"{data['date']}; {data['cpu']} ({os.cpu_count()} cores); {data['cpu_flags']}.",
        f"Versions: {', '.join(f'{k} {v}' for k, v in data['versions'].items())}; commit {data['commit']}.",
        "",
        f"Task `{TASK}` (bench/scoring_task/, 50 four-choice questions from bench/scoring_items.py; "
        f"{cmp_['choices']} loglikelihood requests per run), {data['num_fewshot']}-shot, on the same float32 weights "
        f"({rel(data['folder'])}: the bundled GGUF dequantized). Verdict: **{'PASS' if cmp_['passed'] else 'FAIL'}**"
        f" (same argmax choice on every item except top-two gaps < {data['tie']:g}; every |difference| "
        f"<= {data['max_abs']:g}).",
        "",
        "| run | acc | acc_norm | requests | lm_eval wall time (s) | of which requests (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| ScaleLLM server (local-completions, batch {data['api_batch_size']}) | {ours['acc']:.2f} | "
        f"{ours['acc_norm']:.2f} | {cmp_['choices']} | {ours['wall_s']:.1f} | {ours['requests_s']:.0f} |",
        f"| transformers (lm_eval hf, CPU, batch 1) | {hf['acc']:.2f} | {hf['acc_norm']:.2f} | {cmp_['choices']} | "
        f"{hf['wall_s']:.1f} | {hf['requests_s']:.0f} |",
        "",
        "| comparison | value |",
        "| --- | ---: |",
        f"| items compared | {cmp_['items']} |",
        f"| same choice | {cmp_['agree']} |",
        f"| different choice within the tie tolerance | {cmp_['ties']} |",
        f"| different choice (failures) | {cmp_['different']} |",
        f"| max abs loglikelihood difference | {cmp_['max_abs_diff']:.3g} |",
        f"| mean abs loglikelihood difference | {cmp_['mean_abs_diff']:.3g} |",
        f"| is_greedy flags that differ (informational) | {cmp_['greedy_flags_differ']} |",
        "",
        f"Wall times are whole lm_eval runs (start-up, model or tokenizer load, {cmp_['choices']} requests), "
        "the request phase from lm_eval's own log time stamps (whole seconds); the server's start-up "
        f"({data['server_start_s']:.1f} s) is in neither. Both share this machine's cores with whatever else runs.",
        "",
    ]
    if cmp_["problems"]:
        lines += ["Problems:", ""] + [f"- {p}" for p in cmp_["problems"]] + [""]
    lines += ["Commands (from the repository root; the lm_eval ones with "
              + " ".join(f"{k}={v}" for k, v in data["offline"].items() if k != "HF_DATASETS_CACHE") + "):", "", "```",
              f".venv/bin/python {' '.join(['bench/scoring.py', *data['argv']])}",
              fmt_cmd(data["server_cmd"]), fmt_cmd(ours["cmd"]), fmt_cmd(hf["cmd"]), "```", "",
              f"![loglikelihoods]({os.path.basename(png)})", "",
              "Per item (choice picked by each; the right one is `target`):", "",
              "| id | question | target | ScaleLLM | transformers | max abs diff | verdict |",
              "| ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in cmp_["rows"]:
        lines.append(f"| {r['id']} | {r['question']} | {r['target']} | {r['ours']} | {r['hf']} | "
                     f"{r['max_abs_diff']:.2g} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def plot(cmp_: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [x for r in cmp_["rows"] for x in r["ll_hf"]]
    ys = [y for r in cmp_["rows"] for y in r["ll_ours"]]
    bad = [r["verdict"] == "DIFFERENT" for r in cmp_["rows"] for _ in r["ll_hf"]]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.6))
    finite = [v for v in xs + ys if math.isfinite(v)] or [0.0]
    lo, hi = min(finite) - 1, max(finite) + 1
    ax.plot([lo, hi], [lo, hi], color="0.7", lw=1, zorder=0, label="y = x")
    ax.scatter([x for x, b in zip(xs, bad) if not b], [y for y, b in zip(ys, bad) if not b], s=12,
               label="item picks the same choice")
    if any(bad):
        ax.scatter([x for x, b in zip(xs, bad) if b], [y for y, b in zip(ys, bad) if b], s=16, color="red",
                   label="item picks a different choice")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("transformers loglikelihood (lm_eval hf)")
    ax.set_ylabel("ScaleLLM loglikelihood (lm_eval local-completions)")
    ax.set_title(f"{len(xs)} (question, choice) loglikelihoods")
    ax.legend(loc="upper left", fontsize=8)
    diffs = sorted(abs(y - x) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y))
    bx.plot(range(len(diffs)), [max(d, 1e-9) for d in diffs], lw=1.5)
    bx.set_yscale("log")
    bx.set_xlabel("choices, sorted")
    bx.set_ylabel("|ScaleLLM - transformers| (floored at 1e-9)")
    bx.set_title(f"max {cmp_['max_abs_diff']:.2g}, mean {cmp_['mean_abs_diff']:.2g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
