"""Speculative decoding under load: ScaleLLM vs vLLM (CPU build), each with and without speculation.

    .venv/bin/python bench/speculative.py [--repeats 2] [--concurrency 1,4,16,64] [--num-requests 4,8,16,64] [--draft]
    .venv/bin/python bench/speculative.py --configs scalellm-off,vllm-off --concurrency 1,4 --num-requests 2,4 \\
        --repeats 1 --copy-checks 2 --out-dir bench/.cache/spec_smoke                           # smoke

Model: the bundled SmolLM2-135M-Instruct (bfloat16 folder, bench/models.py), chat template kept. Workloads:
  - grounded: chat prompts (a system prompt asking for exact copies, then "Copy the following text:" and a
    passage of ~150-200 tokens of plain English: consecutive sentences of a short story whose names and
    details are drawn with a fixed seed; bench/spec_prompts.py); greedy, stopping at EOS (max_tokens = the
    passage's length + 32). The model's reply repeats the passage, which is what n-gram prompt lookup
    drafts from;
  - random: bench/serving.py's workload (128 random-token prompt tokens, 128 output tokens, ignore_eos).
Configurations (--configs): scalellm-off, scalellm-ngram, vllm-off, vllm-ngram; n-gram speculation is
--speculative-config NGRAM below on both servers. --draft adds a draft-model pair on the 75-layer
SmolLM2-135M (bench/models.py smollm2_deep: 45 extra layers that leave the outputs unchanged, 2.2x the
weights) as the target and the 135M model as the draft, at --draft-concurrency: scalellm-deep-off,
scalellm-deep-draft, vllm-deep-off, vllm-deep-draft.

Each server is started once per repeat and runs every workload at every concurrency (closed loop, tools/loadgen,
streamed). Before the cells it answers --copy-checks grounded prompts (not streamed), whose replies are kept:
the report gives how closely they copy the passage and whether speculation changed them. Each cell: min(c, 4)
warm-up requests on prompts of their own, then the spec-decode counters of the server's /metrics
(vllm:spec_decode_num_{drafts,draft_tokens,accepted_tokens}_total) and its process tree's CPU time are read,
then the measured requests, then both again: mean acceptance length = 1 + accepted / drafts over the
measured requests. Repeats interleave: even repeats run the configurations in the listed order, odd ones in
reverse (off/on, on/off, ...). A server that fails to start is recorded with its error and not retried.
Results: bench/results/<out>.md, .json and .png (bench/speculative_report.py).
"""
from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(1, ROOT)  # tools.loadgen

from models import DEFAULT_KV_GIB, smollm2_bf16, smollm2_deep  # noqa: E402
from harness import (LOGS, NAME, VLLM_VENV, Proc, ensure_vllm, loadgen, scalellm_cmd, tree_cpu_seconds,  # noqa: E402
                     vllm_cmd, vllm_env)
from serving_report import cpu_flags  # noqa: E402
from spec_prompts import SYSTEM, grounded_prompts  # noqa: E402
from speculative_report import write_report  # noqa: E402

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
MAIN_CONFIGS = ("scalellm-off", "scalellm-ngram", "vllm-off", "vllm-ngram")
DRAFT_CONFIGS = ("scalellm-deep-off", "scalellm-deep-draft", "vllm-deep-off", "vllm-deep-draft")
IOMP = os.path.join(VLLM_VENV, "lib", "libiomp5.so")


# ---------------------------------------------------------------- copy checks

def copy_score(passage: str, reply: str) -> dict:
    reply = reply.strip().strip('"').strip()
    m = difflib.SequenceMatcher(None, passage, reply, autojunk=False)
    return {"similarity": round(m.ratio(), 4), "exact": reply == passage,
            "common_prefix_chars": len(os.path.commonprefix([passage, reply]))}


async def _ask(url: str, prompts: list[dict]) -> list[dict]:
    import aiohttp

    from tools.loadgen.client import request_body, send

    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for p in prompts:
            body = request_body("chat", NAME, p["prompt"], p["max_tokens"], False, False, p["body"])
            r = await send(session, url + "/v1/chat/completions", body, True, {}, keep_text=True)
            row = {"ok": r.ok, "error": r.error, "reply": r.text, "output_tokens": r.output_tokens,
                   "finish_reason": r.finish_reason, "seconds": r.e2e}
            if r.ok and r.text is not None:
                row.update(copy_score(p["passage"], r.text))
            out.append(row)
    return out


def copy_check(url: str, prompts: list[dict]) -> list[dict]:
    """Greedy, not streamed: the replies to the check prompts, scored against their passages."""
    return asyncio.run(_ask(url, prompts))


# ---------------------------------------------------------------- metrics

_SPEC = re.compile(r'^vllm:spec_decode_num_(drafts|draft_tokens|accepted_tokens)_total(?:\{[^}]*\})? (\S+)$', re.M)


def spec_counters(url: str) -> dict[str, float] | None:
    """The spec-decode counters of the server's /metrics, summed over label sets; None if it has none."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
            text = r.read().decode()
    except OSError:
        return None
    found: dict[str, float] = {}
    for name, value in _SPEC.findall(text):
        found[name] = found.get(name, 0.0) + float(value)
    return found or None


def spec_delta(before: dict | None, after: dict | None) -> dict | None:
    if not after:
        return None
    d = {k: after.get(k, 0.0) - (before or {}).get(k, 0.0) for k in ("drafts", "draft_tokens", "accepted_tokens")}
    d["acceptance_length"] = 1 + d["accepted_tokens"] / d["drafts"] if d["drafts"] else None
    d["acceptance_rate"] = d["accepted_tokens"] / d["draft_tokens"] if d["draft_tokens"] else None
    return d


# ---------------------------------------------------------------- configurations and servers

def configs(args) -> dict[str, dict]:
    """id -> {system, spec (None: off), folder, concurrency, label, cmd, env}."""
    small, out = smollm2_bf16(), {}
    deep = smollm2_deep() if any("deep" in c for c in args.configs) else None
    draft = {"model": small, "num_speculative_tokens": args.num_speculative_tokens}
    ngram = {**NGRAM, "num_speculative_tokens": args.num_speculative_tokens}
    for cid in args.configs:
        system = "ScaleLLM" if cid.startswith("scalellm") else "vLLM"
        folder = deep if "-deep-" in cid else small
        spec = ngram if cid.endswith("ngram") else draft if cid.endswith("-draft") else None
        flags = ["--speculative-config", json.dumps(spec)] if spec else []
        if system == "ScaleLLM":
            cmd, env = scalellm_cmd(folder, args.kv_gib, *flags), {}
        else:
            cmd, env = vllm_cmd(folder) + flags, vllm_env(args.vllm_bind, args.kv_gib)
            if args.vllm_iomp:
                env["LD_PRELOAD"] = IOMP
        kind = "off" if spec is None else spec.get("method", "draft")
        out[cid] = {"system": system, "spec": spec, "folder": folder, "kind": kind,
                    "target": "smollm2-135m-deep" if folder == deep else "smollm2-135m",
                    "num_requests": args.draft_num_requests if folder == deep else args.num_requests,
                    "concurrency": args.draft_concurrency if folder == deep else args.concurrency,
                    "label": f"{system} {'deep ' if folder == deep else ''}{kind}", "cmd": cmd, "env": env}
    return out


def start_error(log_path: str, exc: Exception) -> str:
    """The most telling line of a failed start's log (the last error-looking one), else the exception."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [x.rstrip() for x in f if x.strip()]
    except OSError:
        lines = []
    hits = [x for x in lines if re.search(r"Error|error:|Exception|not supported|unsupported|refus", x)]
    return (hits[-1] if hits else lines[-1] if lines else str(exc))[-1000:]


def run_cell(p: Proc, cfg: dict, workload: str, c: int, num: int, prompts: dict, args) -> dict:
    folder, w = cfg["folder"], min(c, 4)
    if workload == "grounded":
        files = {}
        for part, rows in (("warm", prompts[c]["warm"]), ("run", prompts[c]["run"])):
            files[part] = os.path.join(LOGS, f"spec_grounded_c{c}_{part}.jsonl")
            with open(files[part], "w") as f:
                f.writelines(json.dumps({k: r[k] for k in ("prompt", "max_tokens", "body")}) + "\n" for r in rows)
        extra = ("--endpoint", "chat", "--no-ignore-eos", "--warmup", "0")
        loadgen(p.url, folder, c, w, args, (*extra, "--prompts-file", files["warm"]))
        measure = (*extra, "--prompts-file", files["run"])
    else:  # bench/serving.py's prompts (seed c); the warm-up ones from another seed
        loadgen(p.url, folder, c, w, args, ("--warmup", "0", "--seed", str(100_000 + c)))
        measure = ("--warmup", "0")
    before, cpu = spec_counters(p.url), tree_cpu_seconds(p.proc.pid)
    s = loadgen(p.url, folder, c, num, args, measure)
    s["cpu_ms_per_token"] = 1000 * (tree_cpu_seconds(p.proc.pid) - cpu) / max(1, s["total_output_tokens"])
    s["spec"] = spec_delta(before, spec_counters(p.url))
    s.pop("config", None)
    s["mean_output_tokens"] = s["total_output_tokens"] / max(1, s["completed"])
    acc = (s["spec"] or {}).get("acceptance_length")
    print(f"      {workload:<8} c={c:<3} {s['output_throughput']:7.1f} tok/s  TPOT p50 {s['tpot_ms']['median']:7.2f} "
          f"p99 {s['tpot_ms']['p99']:7.2f} ms  TTFT p50 {s['ttft_ms']['median']:7.1f} ms  "
          f"{s['mean_output_tokens']:.0f} tok/req  accept len {acc if acc is None else round(acc, 2)}  "
          f"errors {s['errors']}", flush=True)
    return s


def run_server(cid: str, cfg: dict, prompts: dict, checks: list[dict], args) -> dict:
    t0 = time.monotonic()
    p = Proc(f"spec-{cid}", cfg["cmd"], env=cfg["env"], timeout=900 if cfg["system"] == "vLLM" else 300)
    rep: dict = {"startup_s": time.monotonic() - t0, "log": p.log_path, "cells": {}}
    try:
        if "grounded" in args.workloads and checks:
            before = spec_counters(p.url)
            rep["copy_check"] = copy_check(p.url, checks)
            rep["copy_check_spec"] = spec_delta(before, spec_counters(p.url))
            for r in rep["copy_check"]:
                print(f"      copy check: similarity {r.get('similarity')} exact {r.get('exact')} "
                      f"{r['output_tokens']} tokens ({r['finish_reason']})", flush=True)
        for workload in args.workloads:
            rep["cells"][workload] = {}
            for c in cfg["concurrency"]:
                num = cfg["num_requests"][c]
                try:
                    rep["cells"][workload][c] = run_cell(p, cfg, workload, c, num, prompts, args)
                except subprocess.CalledProcessError as e:
                    rep["cells"][workload][c] = {"error": f"loadgen failed ({e.returncode}); see {p.log_path}"}
                    if p.proc.poll() is not None:
                        rep["error"] = f"server exited ({p.proc.returncode}): {start_error(p.log_path, e)}"
                        return rep
    finally:
        p.stop()
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=None, help=f"comma list of {', '.join(MAIN_CONFIGS + DRAFT_CONFIGS)} "
                    "(default: the first four, and the draft ones with --draft)")
    ap.add_argument("--draft", action="store_true", help="add the draft-model configurations (deep target)")
    ap.add_argument("--workloads", default="grounded,random")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--num-requests", default="4,8,16,64", help="measured requests per cell, one per concurrency "
                    "(or one number for all)")
    ap.add_argument("--draft-concurrency", default="1")
    ap.add_argument("--draft-num-requests", default="4", help="measured requests per cell of the draft configs")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--copy-checks", type=int, default=4, help="grounded prompts answered (not streamed) and "
                    "scored on each server before its cells")
    ap.add_argument("--input-len", type=int, default=128, help="random workload")
    ap.add_argument("--output-len", type=int, default=128, help="random workload")
    ap.add_argument("--kv-gib", type=int, default=DEFAULT_KV_GIB)
    ap.add_argument("--vllm-bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND (bench/serving.py's best here)")
    ap.add_argument("--vllm-iomp", action=argparse.BooleanOptionalAction, default=False,
                    help="LD_PRELOAD the vLLM venv's Intel OpenMP for every vLLM configuration (vLLM warns that "
                    "its speculation on CPU loses much without it)")
    ap.add_argument("--out", default="speculative", help="results name: <out-dir>/<out>.md, .json, .png")
    ap.add_argument("--out-dir", default=os.path.join(BENCH, "results"))
    args = ap.parse_args()
    args.configs = (args.configs.split(",") if args.configs else
                    list(MAIN_CONFIGS) + (list(DRAFT_CONFIGS) if args.draft else []))
    unknown = set(args.configs) - set(MAIN_CONFIGS + DRAFT_CONFIGS)
    if unknown:
        ap.error(f"unknown configurations: {', '.join(sorted(unknown))}")
    args.workloads = args.workloads.split(",")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.draft_concurrency = [int(c) for c in args.draft_concurrency.split(",")]
    args.num_requests = _per_c(ap, args.num_requests, args.concurrency)
    args.draft_num_requests = _per_c(ap, args.draft_num_requests, args.draft_concurrency)
    os.makedirs(LOGS, exist_ok=True)

    cfgs = configs(args)
    vllm_version = ensure_vllm() if any(c["system"] == "vLLM" for c in cfgs.values()) else "not run"
    from tools.loadgen.workload import load_tokenizer

    tok = load_tokenizer(smollm2_bf16())
    most = {}  # concurrency -> the most measured requests any configuration sends there
    for cfg in cfgs.values():
        for c in cfg["concurrency"]:
            most[c] = max(most.get(c, 0), cfg["num_requests"][c])
    cs = sorted(most)
    need = args.copy_checks + sum(min(c, 4) + most[c] for c in cs)
    pool = grounded_prompts(tok, need)
    checks, prompts, i = pool[:args.copy_checks], {}, args.copy_checks
    for c in cs:  # disjoint prompts per cell (and for its warm-up); the same ones on every server
        w, n = min(c, 4), most[c]
        prompts[c] = {"warm": pool[i:i + w], "run": pool[i + w:i + w + n]}
        i += w + n
    data = {"argv": _shell([sys.executable, *sys.argv]), "vllm_version": vllm_version, "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
            "config": {k: v for k, v in vars(args).items()}, "ngram": NGRAM,
            "configs": {cid: {**{k: v for k, v in cfg.items() if k not in ("cmd", "env")},
                              "command": _shell(cfg["cmd"], cfg["env"])} for cid, cfg in cfgs.items()},
            "grounded_stats": {"prompts": len(pool), "passage_tokens": [p["passage_tokens"] for p in pool],
                               "system_prompt": SYSTEM},
            "check_prompts": checks, "runs": {cid: [] for cid in cfgs}, "errors": {}}
    out_dir = args.out_dir
    for r in range(args.repeats):
        order = list(cfgs) if r % 2 == 0 else list(reversed(cfgs))
        for cid in order:
            if cid in data["errors"]:
                continue
            print(f"== repeat {r + 1}/{args.repeats}: {cfgs[cid]['label']} ({cid})", flush=True)
            try:
                rep = run_server(cid, cfgs[cid], prompts, checks, args)
            except (RuntimeError, TimeoutError) as e:
                log = os.path.join(LOGS, f"spec-{cid}.log")
                data["errors"][cid] = start_error(log, e)
                print(f"   failed to start: {data['errors'][cid]}", flush=True)
                continue
            rep["repeat"] = r
            data["runs"][cid].append(rep)
            if rep.get("error"):
                print(f"   {rep['error']}", flush=True)
            write_report(data, out_dir, args.out)  # after every server: a partial report survives an abort
    print(f"wrote {write_report(data, out_dir, args.out)}", flush=True)


def _shell(cmd: list[str], env: dict | None = None) -> str:
    """A command line as one would type it in the repository root."""
    line = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()) + " " + shlex.join(cmd)
    return line.strip().replace(ROOT + os.sep, "")


def _per_c(ap, text: str, cs: list[int]) -> dict[int, int]:
    nums = [int(x) for x in text.split(",")]
    if len(nums) == 1:
        nums *= len(cs)
    if len(nums) != len(cs):
        ap.error(f"--num-requests {text}: one count per concurrency ({cs}) or one for all")
    return dict(zip(cs, nums))


if __name__ == "__main__":
    main()
