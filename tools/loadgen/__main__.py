"""Load generator for OpenAI-compatible servers.

    python -m tools.loadgen --url http://127.0.0.1:8000 --concurrency 64 --num-requests 256 \\
        --input-len 128 --output-len 128 [--json out.json]

Closed loop (--concurrency N) or open loop (--request-rate R, Poisson arrivals); streaming by default.
Latencies follow vLLM's definitions: TTFT to the first streamed text, ITL between text chunks,
TPOT = (E2E - TTFT) / (output tokens - 1).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import re
import sys
import time

import aiohttp
from tqdm import tqdm

from tools.loadgen.client import Result, request_body, send
from tools.loadgen.report import format_table, summarize
from tools.loadgen.workload import RequestSpec, ServerTokenizer, file_workload, load_tokenizer, random_workload

_STAGE = re.compile(r'^scalellm:request_stage_seconds_total\{[^}]*stage="(\w+)"[^}]*\} (\S+)$', re.M)
_FINISHED = re.compile(r'^scalellm:stage_requests_total(?:\{[^}]*\})? (\S+)$', re.M)
_ENGINE = re.compile(r'^scalellm:engine_(steps|step_forward_seconds|step_served_seconds)_total(?:\{[^}]*\})? (\S+)$',
                     re.M)


async def scrape_stages(session: aiohttp.ClientSession, base: str) -> tuple[dict[str, float], float] | None:
    """ScaleLLM's per-stage time counters, if the server exposes them."""
    try:
        async with session.get(base + "/metrics") as r:
            text = await r.text() if r.status == 200 else ""
    except aiohttp.ClientError:
        return None
    finished = _FINISHED.search(text)
    if not finished:
        return None
    stages = {k: float(v) for k, v in _STAGE.findall(text)}
    stages.update({f"engine_{k}": float(v) for k, v in _ENGINE.findall(text)})
    return stages, float(finished.group(1))


async def run(args, specs: list[RequestSpec], warm: list[RequestSpec]) -> dict:
    base = args.url.rstrip("/")
    url = base + ("/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    chat = args.endpoint == "chat"
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        models = itertools.cycle(args.model.split(",") if args.model else [None])  # several: in turn

        def body(spec: RequestSpec) -> dict:
            return request_body(args.endpoint, next(models), spec.prompt, spec.max_tokens, args.stream,
                                args.ignore_eos, spec.extra)

        if warm:
            await asyncio.gather(*(send(session, url, body(s), chat, headers) for s in warm))
        before = await scrape_stages(session, base)
        results: list[Result] = []
        bar = tqdm(total=args.num_requests, desc="requests", disable=args.quiet, leave=False)
        start = time.perf_counter()
        deadline = start + args.duration if args.duration else float("inf")
        counter = iter(range(args.num_requests))

        def next_spec() -> RequestSpec | None:
            if time.perf_counter() >= deadline:
                return None
            i = next(counter, None)
            return None if i is None else specs[i % len(specs)]

        async def record(spec: RequestSpec) -> None:
            results.append(await send(session, url, body(spec), chat, headers))
            bar.update(1)

        if args.request_rate:
            rng = random.Random(args.seed)
            tasks = []
            sem = asyncio.Semaphore(args.concurrency or 1 << 30)

            async def limited(spec):
                async with sem:
                    await record(spec)
            while (spec := next_spec()) is not None:
                tasks.append(asyncio.create_task(limited(spec)))
                await asyncio.sleep(rng.expovariate(args.request_rate))
            await asyncio.gather(*tasks)
        else:
            async def worker():
                while (spec := next_spec()) is not None:
                    await record(spec)
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - start
        bar.close()
        after = await scrape_stages(session, base)
    summary = summarize(results, wall)
    summary["config"] = {k: v for k, v in vars(args).items() if k not in ("api_key",)}
    if before and after and after[1] > before[1]:
        n = after[1] - before[1]
        delta = {k: after[0].get(k, 0.0) - before[0].get(k, 0.0) for k in after[0]}
        steps = delta.pop("engine_steps", 0.0)
        forward, served = delta.pop("engine_step_forward_seconds", 0.0), delta.pop("engine_step_served_seconds", 0.0)
        summary["stages_ms"] = {k: 1000.0 * v / n for k, v in delta.items()}
        if steps > 0:  # the engine's steps during the run: the forward pass alone, and as served
            summary["step_ms"] = {"steps": steps, "forward": 1000.0 * forward / steps, "served": 1000.0 * served / steps}
    return summary


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.loadgen", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback)")
    ap.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    ap.add_argument("--model", default=None, help="model name to send (default: the server's first); several, "
                    "comma-separated (a base model and LoRA adapters), go to requests in turn")
    ap.add_argument("--api-key", default=None)
    mode = ap.add_argument_group("load shape")
    mode.add_argument("--concurrency", type=int, default=1, help="closed loop: requests kept in flight "
                      "(with --request-rate: a cap on in-flight requests)")
    mode.add_argument("--request-rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    mode.add_argument("--num-requests", type=int, default=None,
                      help="requests to send after warm-up (default 64, or unbounded with --duration)")
    mode.add_argument("--duration", type=float, default=None, help="stop issuing requests after this many seconds")
    mode.add_argument("--warmup", type=int, default=2, help="requests sent first and not counted")
    mode.add_argument("--no-stream", dest="stream", action="store_false", help="non-streaming requests")
    mode.add_argument("--request-timeout", type=float, default=600.0)
    wl = ap.add_argument_group("workload")
    wl.add_argument("--input-len", type=int, default=128)
    wl.add_argument("--output-len", type=int, default=128)
    wl.add_argument("--tokenizer", default=None, help="model folder or GGUF whose tokenizer builds exact-length "
                    "prompts (default: the server's own, through its /tokenize and /detokenize)")
    wl.add_argument("--token-id-prompts", action="store_true",
                    help="send random token ids as prompts (completions only; no tokenizer needed)")
    wl.add_argument("--prompts-file", default=None, help="JSONL with {\"prompt\", \"max_tokens\"} per line, and "
                    "optionally \"body\": more request fields (e.g. response_format)")
    wl.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                    help="let requests stop at EOS (default: ignore_eos so lengths are exact)")
    wl.add_argument("--seed", type=int, default=0)
    out = ap.add_argument_group("output")
    out.add_argument("--json", default=None, help="write the summary as JSON here")
    out.add_argument("--quiet", action="store_true", help="no progress bar or table")
    args = ap.parse_args(argv)
    if args.num_requests is None:
        args.num_requests = 64 if args.duration is None else 1 << 30
    if args.num_requests < 1:
        ap.error("--num-requests must be at least 1")
    if args.endpoint == "chat" and args.token_id_prompts:
        ap.error("--endpoint chat needs text prompts: drop --token-id-prompts")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prompts_file:
        specs = file_workload(args.prompts_file, args.output_len)
        warm = [specs[i % len(specs)] for i in range(args.warmup)]
    else:
        if args.token_id_prompts:
            tokenizer = None
        elif args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer)
        else:
            tokenizer = ServerTokenizer(args.url, args.model.split(",")[0] if args.model else None, args.api_key)
        count = min(args.num_requests, 1024)
        specs = random_workload(tokenizer, count + args.warmup, args.input_len, args.output_len, args.seed)
        specs, warm = specs[:count], specs[count:]  # warm-up prompts share no prefix with measured ones
    summary = asyncio.run(run(args, specs, warm))
    if not args.quiet:
        print(format_table(summary, f"{args.url} c={args.concurrency} rate={args.request_rate}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
