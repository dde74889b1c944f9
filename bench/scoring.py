"""Scoring check: EleutherAI's lm-evaluation-harness on our server against its own transformers backend.

    .venv/bin/python bench/scoring.py [--api-batch-size 1] [--num-fewshot 0] [--block-size N] [--timeout 900]

One multiple-choice task of 50 four-choice questions (bench/scoring_task/, written by
bench/scoring_items.py) is run twice on the same float32 weights (bench/models.py smollm2_f32: the
bundled GGUF dequantized):

1. `lm_eval --model local-completions` against ScaleLLM's /v1/completions (started here with
   --quantization none --dtype float32). For each (question, choice) pair lm_eval sends the question's
   and the choice's token ids with echo: true, logprobs: 1, max_tokens: 1 and sums the choice tokens'
   echoed logprobs (see the findings at the end of this docstring);
2. `lm_eval --model hf` (transformers, float32, CPU) on the same folder.

The check passes when, item by item, both pick the same choice (argmax loglikelihood), except where
the two best choices lie within --tie (1e-4) of each other, and no choice's loglikelihood differs by
more than --max-abs-diff. Results: bench/results/scoring.md (table, commands, date, CPU) and
scoring.png (our loglikelihoods against transformers'); the exit status is 1 when the check fails.

The harness lives in its own virtual environment, .lm-eval-venv (created and filled here when absent;
see ensure_lm_eval), and runs offline: HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1; the task's data file is
named relative to the repository root, where lm_eval is run.

What local-completions sends and reads for a loglikelihood request (lm_eval 0.4.13,
lm_eval/models/openai_completions.py and api_models.py): a POST of
{"model": <model=>, "prompt": [[ids...], ...] (one token-id list per pair, batch_size of them),
"temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": true}; from each choice
(sorted by "index", one per prompt) it reads logprobs.token_logprobs[ctxlen:-1] (summed) and
logprobs.top_logprobs[ctxlen:-1] (dicts; greedy when each token's logprob equals max(top.values())):
the [:-1] drops the one generated token, so the list must hold every prompt token and then it.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, ROOT)

from models import smollm2_f32  # noqa: E402
from scoring_items import OUT as ITEMS_PATH, render as render_items  # noqa: E402
from harness import LOGS, PY, Proc  # noqa: E402

LM_EVAL_VENV = os.path.join(ROOT, ".lm-eval-venv")  # outside bench/, which tools walk for sources
LM_EVAL_PY = os.path.join(LM_EVAL_VENV, "bin", "python")
LM_EVAL = os.path.join(LM_EVAL_VENV, "bin", "lm_eval")
LM_EVAL_VERSION = "0.4.13"
TRANSFORMERS_VERSION = "5.25.0"  # the project's own (.venv), so both sides load the folder alike
TORCH_VERSION = "2.13.0"  # pip finds the CPU build on this machine; a plain `torch` pulls CUDA wheels
INSTALLED = os.path.join(LM_EVAL_VENV, ".scalellm-installed")  # written once every install step has passed
INSTALL_CMDS = [
    ["{py}", "-m", "venv", LM_EVAL_VENV],
    [LM_EVAL_PY, "-m", "pip", "install", "-q", f"torch=={TORCH_VERSION}"],
    [LM_EVAL_PY, "-m", "pip", "install", "-q", f"lm_eval[api,hf]=={LM_EVAL_VERSION}",
     f"transformers=={TRANSFORMERS_VERSION}", f"torch=={TORCH_VERSION}"],
]
from scoring_report import TASK, command_output, cpu_summary, fmt_cmd, plot, rel, write_report  # noqa: E402
TASK_DIR = os.path.join(BENCH, "scoring_task")
NAME = "scalellm-scoring"  # --served-model-name; lm_eval's model= must be one of the server's names
OUT_DIR = os.path.join(BENCH, ".cache", "lm-eval")
RESULTS = os.path.join(BENCH, "results")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": os.path.join(OUT_DIR, "datasets"), "TOKENIZERS_PARALLELISM": "false"}


def ensure_lm_eval() -> dict[str, str]:
    """lm-evaluation-harness (API and transformers backends) in its own venv, installed once; returns the
    versions the run uses."""
    if not os.path.exists(INSTALLED):
        cmds = [[sys.executable if c == "{py}" else c for c in cmd] for cmd in INSTALL_CMDS]
        for cmd in cmds:
            if cmd[2] == "venv" and os.path.exists(LM_EVAL_PY):
                continue  # an earlier install stopped part way: pip finishes it in place
            print("  $", " ".join(rel(c) if c.startswith(ROOT) else c for c in cmd), flush=True)
            subprocess.check_call(cmd, timeout=1800)
        with open(INSTALLED, "w") as f:
            f.write("".join(" ".join(c) + "\n" for c in cmds))
    out = subprocess.check_output([LM_EVAL_PY, "-c", "import importlib.metadata as m, json; print(json.dumps("
                                   "{k: m.version(k) for k in ('lm_eval', 'transformers', 'torch', 'datasets')}))"],
                                  timeout=120)
    return json.loads(out)


def ensure_items() -> None:
    text = render_items()
    try:
        with open(ITEMS_PATH) as f:
            if f.read() == text:
                return
    except FileNotFoundError:
        pass
    with open(ITEMS_PATH, "w") as f:
        f.write(text)
    print(f"  rewrote {rel(ITEMS_PATH)} from bench/scoring_items.py")


def post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def preflight(url: str, folder: str) -> list[str]:
    """Send what lm_eval sends for one batch of two (context, continuation) pairs and check the answer has
    the shape lm_eval's parser needs; the problems found (none: it will parse)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    prompts = [tok("Question: What is the capital of France?\nAnswer: Paris", add_special_tokens=False).input_ids,
               tok("The sky is", add_special_tokens=False).input_ids]
    body = {"model": NAME, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    status, out = post(url + "/v1/completions", body)
    if status != 200:
        return [f"HTTP {status}: {str(out)[:500]}"]
    problems = []
    choices = sorted(out.get("choices", []), key=lambda c: c.get("index", -1))
    if [c.get("index") for c in choices] != [0, 1]:
        problems.append(f"choices' indexes are {[c.get('index') for c in choices]}, not [0, 1]")
    for c, ids in zip(choices, prompts):
        lp = c.get("logprobs") or {}
        tl, top = lp.get("token_logprobs"), lp.get("top_logprobs")
        if not isinstance(tl, list) or len(tl) != len(ids) + 1:
            problems.append(f"choice {c.get('index')}: token_logprobs has "
                            f"{len(tl) if isinstance(tl, list) else tl!r} entries, not {len(ids)} prompt + 1 generated")
            continue
        if tl[0] is not None or any(not isinstance(x, (int, float)) for x in tl[1:]):
            problems.append(f"choice {c.get('index')}: token_logprobs should be [null, numbers...]: {tl[:4]}...")
        if not isinstance(top, list) or len(top) != len(tl) or any(not isinstance(t, dict) or not t for t in top[1:]):
            problems.append(f"choice {c.get('index')}: top_logprobs should be one non-empty dict per token "
                            f"(first may be null): {str(top)[:200]}")
    return problems


def run_lm_eval(label: str, model: str, model_args: str, extra: list[str], timeout: float) -> dict:
    """One lm_eval run (its own process group, killed on timeout); the per-choice results and the run's."""
    out = os.path.join(OUT_DIR, label)
    for old in glob.glob(os.path.join(out, "**", "*.json*"), recursive=True):
        os.remove(old)
    cmd = [LM_EVAL, "run", "--model", model, "--model_args", model_args, *extra, "--tasks", TASK,
           "--include_path", rel(TASK_DIR), "--log_samples", "--output_path", rel(out)]
    log_path = os.path.join(LOGS, f"lm_eval-{label}.log")
    print(f"  $ {' '.join(rel(c) if c.startswith(ROOT) else c for c in cmd)}  (log: {rel(log_path)})", flush=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **OFFLINE}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"lm_eval ({label}) still running after {timeout:.0f} s; see {rel(log_path)}")
        finally:
            if proc.poll() is None:  # interrupted while waiting
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.monotonic() - start
    if rc != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"lm_eval ({label}) exited {rc}; last lines of {rel(log_path)}:\n{tail}")
    with open(log_path) as f:  # lm_eval's own time stamps (whole seconds) around its requests
        stamps = [line[:19] for line in f if "Running loglikelihood requests" in line or "Saving results" in line]
    try:
        t0, t1 = (datetime.datetime.strptime(s, "%Y-%m-%d:%H:%M:%S") for s in (stamps[0], stamps[-1]))
        requests_s = (t1 - t0).total_seconds()
    except (IndexError, ValueError):
        requests_s = math.nan
    samples = glob.glob(os.path.join(out, "**", f"samples_{TASK}_*.jsonl"), recursive=True)
    results = glob.glob(os.path.join(out, "**", "results_*.json"), recursive=True)
    if len(samples) != 1 or len(results) != 1:
        raise RuntimeError(f"lm_eval ({label}): expected one samples and one results file under {rel(out)}")
    items = {}
    with open(samples[0]) as f:
        for line in f:
            s = json.loads(line)
            pairs = [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]
            items[s["doc_id"]] = {"doc": s["doc"], "target": int(s["target"]), "pairs": pairs,
                                  "ll": [float(r[0][0]) for r in s["resps"]],
                                  "greedy": [r[0][1] in (True, "True") for r in s["resps"]]}
    with open(results[0]) as f:
        metrics = json.load(f)["results"][TASK]
    return {"cmd": cmd, "wall_s": wall, "requests_s": requests_s, "items": items, "acc": metrics["acc,none"],
            "acc_norm": metrics["acc_norm,none"], "samples": rel(samples[0])}


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def compare(ours: dict, hf: dict, tie: float, max_abs: float) -> dict:
    problems, rows = [], []
    if sorted(ours["items"]) != sorted(hf["items"]):
        problems.append(f"different items: {sorted(ours['items'])} vs {sorted(hf['items'])}")
    agree = ties = 0
    diffs = []
    for doc_id in sorted(set(ours["items"]) & set(hf["items"])):
        a, b = ours["items"][doc_id], hf["items"][doc_id]
        if a["pairs"] != b["pairs"]:
            problems.append(f"item {doc_id}: the two runs scored different (context, continuation) pairs")
            continue
        d = [abs(x - y) if math.isfinite(x) and math.isfinite(y) else math.inf for x, y in zip(a["ll"], b["ll"])]
        diffs += d
        pick_a, pick_b = argmax(a["ll"]), argmax(b["ll"])
        gap_b = sorted(b["ll"])[-1] - sorted(b["ll"])[-2]
        gap_a = sorted(a["ll"])[-1] - sorted(a["ll"])[-2]
        if pick_a == pick_b:
            verdict = "same"
            agree += 1
        elif min(gap_a, gap_b) < tie:
            verdict = "tie"
            ties += 1
        else:
            verdict = "DIFFERENT"
            problems.append(f"item {doc_id}: we pick choice {pick_a}, transformers {pick_b} "
                            f"(its top-two gap {gap_b:.3g}; ours {gap_a:.3g})")
        rows.append({"id": doc_id, "question": a["doc"]["question"], "target": a["target"], "ours": pick_a,
                     "hf": pick_b, "verdict": verdict, "max_abs_diff": max(d), "ll_ours": a["ll"], "ll_hf": b["ll"],
                     "greedy_ours": a["greedy"], "greedy_hf": b["greedy"]})
    worst = max(diffs) if diffs else math.inf
    if worst > max_abs:
        problems.append(f"max |loglikelihood difference| {worst:.3g} > {max_abs:g}")
    greedy_diff = sum(ga != gb for r in rows for ga, gb in zip(r["greedy_ours"], r["greedy_hf"]))
    return {"items": len(rows), "choices": len(diffs), "agree": agree, "ties": ties,
            "different": sum(r["verdict"] == "DIFFERENT" for r in rows), "max_abs_diff": worst,
            "mean_abs_diff": sum(diffs) / len(diffs) if diffs else math.inf, "greedy_flags_differ": greedy_diff,
            "problems": problems, "rows": rows, "passed": not problems}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--api-batch-size", type=int, default=1,
                    help="lm_eval's batch_size for local-completions: prompts per request (default 1)")
    ap.add_argument("--tie", type=float, default=1e-4,
                    help="a different pick is allowed where the two best choices are closer than this")
    ap.add_argument("--max-abs-diff", type=float, default=1e-2,
                    help="largest allowed |loglikelihood difference| of any choice")
    ap.add_argument("--num-fewshot", type=int, default=0,
                    help="questions with their answers before each one (drawn from the other 49, the same for both "
                         "runs); longer prompts whose four choices share KV blocks, so with --block-size 16 the "
                         "server's prefix cache serves part of each echoed prompt")
    ap.add_argument("--block-size", type=int, default=None,
                    help="the server's --block-size (its default: 128 on the CPU)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed to each lm_eval run")
    ap.add_argument("--server-timeout", type=float, default=300, help="seconds allowed to the server's start-up")
    ap.add_argument("--results", default=RESULTS, help="folder for scoring.md and scoring.png")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: the server is stopped
    os.environ.update({k: v for k, v in OFFLINE.items() if k.endswith("OFFLINE")})  # this process and the server

    print("lm-evaluation-harness venv", flush=True)
    versions = ensure_lm_eval()
    versions["scalellm torch"] = command_output([PY, "-c", "import torch; print(torch.__version__)"])
    print(f"  {versions}")
    ensure_items()
    folder = smollm2_f32()
    os.makedirs(LOGS, exist_ok=True)
    os.makedirs(OUT_DIR, exist_ok=True)

    server_cmd = [PY, "-m", "scalellm.server", "--model", folder, "--quantization", "none", "--dtype", "float32",
                  "--port", "{port}", "--served-model-name", NAME,
                  *(["--block-size", str(args.block_size)] if args.block_size else [])]
    shots = ["--num_fewshot", str(args.num_fewshot)]
    print(f"ScaleLLM server: {fmt_cmd(server_cmd)}", flush=True)
    start = time.monotonic()
    server = Proc("scoring-scalellm", server_cmd, timeout=args.server_timeout)
    server_start = time.monotonic() - start
    server_cmd = [c.replace("{port}", str(server.port)) for c in server_cmd]
    try:
        problems = preflight(server.url, folder)
        if problems:
            print("the server's answer to lm_eval's loglikelihood request would not parse:", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
            return 1
        model_args = (f"base_url={server.url}/v1/completions,model={NAME},tokenizer={rel(folder)},"
                      "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=2,"
                      "timeout=120")
        print("lm_eval local-completions against ScaleLLM", flush=True)
        ours = run_lm_eval("scalellm", "local-completions", model_args,
                           ["--batch_size", str(args.api_batch_size), *shots], args.timeout)
    finally:
        server.stop()
    print(f"  acc {ours['acc']:.2f}  acc_norm {ours['acc_norm']:.2f}  {ours['wall_s']:.1f} s", flush=True)

    print("lm_eval hf (transformers, float32, CPU)", flush=True)
    hf = run_lm_eval("hf", "hf", f"pretrained={rel(folder)},dtype=float32",
                     ["--device", "cpu", "--batch_size", "1", *shots], args.timeout)
    print(f"  acc {hf['acc']:.2f}  acc_norm {hf['acc_norm']:.2f}  {hf['wall_s']:.1f} s", flush=True)

    cmp_ = compare(ours, hf, args.tie, args.max_abs_diff)
    cpu, flags = cpu_summary()
    dirty = " (with uncommitted changes)" if command_output(["git", "status", "--porcelain", "--untracked-files=no"]) else ""
    data = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": cpu, "cpu_flags": flags,
            "versions": versions, "commit": (command_output(["git", "rev-parse", "--short", "HEAD"]) or "unknown") + dirty,
            "folder": folder, "offline": OFFLINE, "num_fewshot": args.num_fewshot, "tie": args.tie, "max_abs": args.max_abs_diff,
            "api_batch_size": args.api_batch_size,
            "server_cmd": server_cmd, "server_start_s": server_start, "argv": sys.argv[1:],
            "ours": ours, "hf": hf, "comparison": cmp_}
    os.makedirs(args.results, exist_ok=True)
    png = os.path.join(args.results, "scoring.png")
    plot(cmp_, png)
    md = os.path.join(args.results, "scoring.md")
    with open(md, "w") as f:
        f.write(write_report(data, png))
    print(f"same choice {cmp_['agree']}/{cmp_['items']}, ties {cmp_['ties']}, different {cmp_['different']}; "
          f"max |diff| {cmp_['max_abs_diff']:.3g}, mean {cmp_['mean_abs_diff']:.3g}")
    print(f"wrote {rel(md)} and {rel(png)}: {'PASS' if cmp_['passed'] else 'FAIL'}")
    for p in cmp_["problems"]:
        print(f"  - {p}", file=sys.stderr)
    return 0 if cmp_["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
