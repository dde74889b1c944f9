"""Structured outputs under load: the cost of JSON-schema constraints, ScaleLLM vs vLLM (CPU build).

    .venv/bin/python bench/structured.py [--concurrency 1 16 64] [--repeats 3] [--new-schemas]
    .venv/bin/python bench/structured.py --concurrency 1 16 --repeats 1 --num-requests 8 --skip-vllm   # smoke

Experiment 1 (throughput): the bundled SmolLM2-135M-Instruct (bfloat16 folder built by bench/models.py, the
one bench/serving.py serves), chat endpoint, streamed, greedy, closed loop at each concurrency, in three
configurations:
  - ScaleLLM constrained: each request carries response_format json_schema (strict), round robin over the
    SCHEMAS below (every field bounded, so replies close by themselves; max_tokens is only a safety cap);
  - ScaleLLM unconstrained: the same prompt templates, no response_format; output length pinned with
    ignore_eos and max_tokens = the median reply length, per schema, of a constrained calibration pass on
    the same server (printed and written to the report), so both sides generate comparable token counts;
  - vLLM constrained: the same requests as ScaleLLM constrained, vLLM's default structured-output backend.
Each repeat starts each server once (the order of the servers and of ScaleLLM's two configurations flips
from one repeat to the next) and runs every configuration at every concurrency. Every prompt starts with a
fresh random ticket number, so no run reuses another run's prompt prefix. Constrained replies are parsed
and validated (jsonschema) against their schema; ScaleLLM's mask ms per step comes from /metrics deltas
(scalellm:grammar_mask_seconds_total / scalellm:grammar_mask_steps_total).

Experiment 2 (--new-schemas, ScaleLLM only): 16 streams run steadily; then 16 requests with new,
never-seen schemas of 200 properties each (property names unique per request) arrive at once. The running
streams' inter-token latencies inside that window are compared with the same-length window of a phase
without the new-schema requests. `--mixed-prefill-tokens 0 128` runs it on the default server and on one
whose steps carry at most 128 prompt tokens while streams decode, interleaved.

Results: bench/results/structured.md, .json and .png (a later run of one experiment keeps the other's
section from the JSON).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import statistics
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(1, ROOT)  # tools.loadgen

import aiohttp  # noqa: E402
import jsonschema  # noqa: E402
import numpy as np  # noqa: E402

from models import MODELS  # noqa: E402
from harness import MAX_MODEL_LEN, NAME, PY, VLLM_PY, Proc, ensure_vllm  # noqa: E402
from structured_report import write_report  # noqa: E402
from tools.loadgen.client import request_body, send  # noqa: E402
from tools.loadgen.report import summarize  # noqa: E402


def _s(max_len: int) -> dict:
    return {"type": "string", "minLength": 1, "maxLength": max_len}


def _i(lo: int, hi: int) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _e(*values: str) -> dict:
    return {"type": "string", "enum": list(values)}


def _obj(**props) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


_B = {"type": "boolean"}
CITIES = ["Lyon", "Porto", "Graz", "Bergen", "Leeds", "Turin", "Ghent", "Cork", "Kassel", "Malaga"]
# name -> (schema, prompt template); {x} is filled from the list after it
SCHEMAS: dict[str, tuple[dict, str, list[str]]] = {
    "person": (_obj(name=_s(24), age=_i(18, 99),
                    email={"type": "string", "pattern": r"^[a-z]{2,12}\.[a-z]{2,12}@example\.(com|org)$"},
                    job=_e("teacher", "nurse", "engineer", "baker", "pilot", "lawyer", "farmer", "artist"),
                    member=_B, languages={"type": "array", "minItems": 1, "maxItems": 3,
                                          "items": _e("en", "fr", "de", "es", "it", "pt")}),
               "Invent a person who lives in {x}: name, age, e-mail, job, club membership and languages.", CITIES),
    "order": (_obj(order_id={"type": "string", "pattern": r"^ORD-[0-9]{6}$"}, customer=_s(24),
                   items={"type": "array", "minItems": 1, "maxItems": 3,
                          "items": _obj(sku={"type": "string", "pattern": r"^[A-Z]{3}-[0-9]{3}$"}, name=_s(20),
                                        quantity=_i(1, 10), unit_price_cents=_i(1, 100000))},
                   currency=_e("EUR", "USD", "GBP", "JPY"), paid=_B),
              "Invent an online order from a shop that sells {x}, with one to three items.",
              ["books", "tea", "bicycles", "shoes", "garden tools", "toys", "lamps", "cheese"]),
    "settings": (_obj(theme=_e("light", "dark", "system"), language=_e("en", "fr", "de", "es", "it", "ja"),
                      font_size=_e("small", "medium", "large"), density=_e("compact", "comfortable"),
                      start_page=_e("home", "inbox", "calendar", "files"),
                      notifications=_obj(email=_B, sms=_B, push=_B, digest=_e("never", "daily", "weekly")),
                      privacy=_e("public", "friends", "private"), autosave_minutes=_i(1, 60)),
                 "Choose the settings of a mail app for a user who {x}.",
                 ["works at night", "reads on a small phone", "hates notifications", "travels a lot",
                  "shares a family computer", "writes in French"]),
    "address_book": (_obj(owner=_s(24), contacts={"type": "array", "minItems": 1, "maxItems": 2, "items": _obj(
        name=_s(24), phone={"type": "string", "pattern": r"^\+[0-9]{8,12}$"},
        address=_obj(street=_s(32), city=_s(20), postcode={"type": "string", "pattern": r"^[0-9]{5}$"},
                     country=_e("FR", "DE", "ES", "IT", "GB", "US")))}),
                     "Write a small address book for someone from {x}, with one or two contacts.", CITIES),
}
NAMES = list(SCHEMAS)
VALIDATORS = {k: jsonschema.Draft202012Validator(s) for k, (s, _, _) in SCHEMAS.items()}


def prompt(kind: str, fill: random.Random, ticket: random.Random) -> str:
    """The schema's request in words, after a random ticket number (no prompt prefix shared across runs)."""
    _, template, words = SCHEMAS[kind]
    return f"Ticket {ticket.randrange(16 ** 8):08x}. " + template.format(x=fill.choice(words)) + " Answer in JSON."


def response_format(kind: str) -> dict:
    return {"response_format": {"type": "json_schema",
                                "json_schema": {"name": kind, "schema": SCHEMAS[kind][0], "strict": True}}}


def check(kind: str, text: str | None) -> tuple[bool, bool]:
    """(parses as JSON, validates against its schema)."""
    try:
        instance = json.loads(text or "")
    except ValueError:
        return False, False
    return True, VALIDATORS[kind].is_valid(instance)


_METRIC = re.compile(r"^scalellm:(grammar_mask_seconds|grammar_mask_steps|engine_steps|grammars_compiled)_total"
                     r"(?:\{[^}]*\})? (\S+)$", re.M)


async def scrape(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    try:
        async with session.get(base + "/metrics") as r:
            return {k: float(v) for k, v in _METRIC.findall(await r.text())} if r.status == 200 else {}
    except aiohttp.ClientError:
        return {}


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900),
                                 connector=aiohttp.TCPConnector(limit=0))


async def closed_loop(base: str, bodies: list[dict], warm: list[dict], c: int) -> dict:
    """Warm-up (concurrently), then `bodies` through `c` workers; the summary plus replies and /metrics deltas."""
    url = base + "/v1/chat/completions"
    async with _session() as session:
        await asyncio.gather(*(send(session, url, b, True, {}) for b in warm))
        before = await scrape(session, base)
        results: list = [None] * len(bodies)
        todo = iter(range(len(bodies)))

        async def worker():
            for i in todo:
                results[i] = await send(session, url, bodies[i], True, {}, keep_text=True)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        wall = time.perf_counter() - start
        after = await scrape(session, base)
    s = summarize(results, wall)
    s["delta"] = {k: after[k] - before.get(k, 0.0) for k in after}
    s["results"] = results
    return s


def run_config(base: str, config: str, c: int, n: int, seed: int, args, pins: dict | None) -> dict:
    """One configuration at one concurrency. Prompts: the same fills for every configuration of a repeat and
    concurrency; tickets differ between ScaleLLM's two configurations (same server: no shared prefix)."""
    fill, ticket = random.Random(seed), random.Random(seed * 2 + (config == "unconstrained"))
    kinds = [NAMES[i % len(NAMES)] for i in range(n + len(NAMES))]
    bodies = []
    for kind in kinds:
        if config == "unconstrained":
            extra = {"max_tokens": pins[kind], "ignore_eos": True}
        else:
            extra = {"max_tokens": args.max_tokens, **response_format(kind)}
        bodies.append(request_body("chat", NAME, prompt(kind, fill, ticket), args.max_tokens, True, False, extra))
    # the last len(NAMES) bodies: the warm-up, one per schema at once (compiles any grammar not compiled yet)
    s = asyncio.run(closed_loop(base, bodies[:n], bodies[n:], c))
    results, delta = s.pop("results"), s.pop("delta")
    ok = [(k, r) for k, r in zip(kinds, results) if r.ok]
    s["tokens_per_request"] = statistics.fmean(r.output_tokens for _, r in ok) if ok else float("nan")
    s["stop_share"] = sum(r.finish_reason == "stop" for _, r in ok) / max(1, len(ok))
    s["sample_reply"] = ok[0][1].text[:400] if ok else None
    if config != "unconstrained":
        checks = [(k, *check(k, r.text)) for k, r in ok]
        s["parsed"], s["valid"] = sum(p for _, p, _ in checks), sum(v for _, _, v in checks)
        s["valid_share"] = s["valid"] / max(1, len(results))
        s["valid_by_schema"] = {k: [sum(v for kk, _, v in checks if kk == k), kinds[:n].count(k)] for k in NAMES}
        bad = [r.text for (k, r), (_, _, v) in zip(ok, checks) if not v]
        s["invalid_examples"] = [t[:300] for t in bad[:2]]
    steps = delta.get("grammar_mask_steps", 0.0)
    if delta:
        s["mask_steps"], s["engine_steps"] = steps, delta.get("engine_steps", 0.0)
        s["mask_ms_per_step"] = 1000 * delta.get("grammar_mask_seconds", 0.0) / steps if steps else 0.0
    return s


def calibrate(base: str, args) -> dict[str, int]:
    """Median constrained reply length per schema: what the unconstrained configuration is pinned to."""
    n = args.calibration_requests
    rng = random.Random(12345)
    kinds = [NAMES[i % len(NAMES)] for i in range(n)]
    bodies = [request_body("chat", NAME, prompt(k, rng, rng), args.max_tokens, True, False,
                           {"max_tokens": args.max_tokens, **response_format(k)}) for k in kinds]
    s = asyncio.run(closed_loop(base, bodies, [], min(16, n)))
    return {k: int(statistics.median([r.output_tokens for kk, r in zip(kinds, s["results"]) if kk == k and r.ok]
                                     or [args.max_tokens])) for k in NAMES}


def start_scalellm(folder: str, extra: list[str] = ()) -> Proc:
    return Proc("scalellm-structured", [PY, "-m", "scalellm.server", "--model", folder, "--port", "{port}",
                                        "--dtype", "bfloat16", "--served-model-name", NAME,
                                        "--max-model-len", str(MAX_MODEL_LEN), *extra])


def start_vllm(folder: str, bind: str) -> Proc:
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", **({"VLLM_CPU_OMP_THREADS_BIND": bind} if bind != "default" else {})}
    return Proc(f"vllm-structured-{bind}", [VLLM_PY, "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
                                            "--port", "{port}", "--host", "127.0.0.1", "--dtype", "bfloat16",
                                            "--served-model-name", NAME, "--max-model-len", str(MAX_MODEL_LEN)],
                env=env, timeout=600)


def _line(config: str, c: int, s: dict) -> str:
    extra = f"  valid {s['valid_share']:.0%}" if "valid_share" in s else ""
    if s.get("mask_steps"):
        extra += f"  mask {s['mask_ms_per_step']:.3f} ms/step"
    return (f"    {config:<13} c={c:<3} {s['output_throughput']:7.1f} tok/s {s['request_throughput']:6.2f} req/s  "
            f"TTFT p50 {s['ttft_ms']['median']:7.1f}  ITL p50 {s['itl_ms']['median']:6.1f} p99 {s['itl_ms']['p99']:7.1f}"
            f"  {s['tokens_per_request']:5.1f} tok/req  errors {s['errors'] or 0}{extra}")


def throughput(folder: str, args) -> dict:
    cs = args.concurrency
    data: dict = {"concurrency": cs, "repeats": [], "pins": None}
    for r in range(args.repeats):
        print(f"== throughput: repeat {r + 1}/{args.repeats}", flush=True)
        rep: dict = {}
        servers = ["ScaleLLM"] + ([] if args.skip_vllm else ["vLLM"])
        if r % 2 and data["pins"]:
            servers.reverse()
        for server in servers:
            p = start_scalellm(folder) if server == "ScaleLLM" else start_vllm(folder, args.vllm_bind)
            try:
                if server == "ScaleLLM" and data["pins"] is None:
                    data["pins"] = calibrate(p.url, args)
                    print(f"  unconstrained max_tokens (ignore_eos) per schema: {data['pins']}", flush=True)
                configs = ["constrained", "unconstrained"] if server == "ScaleLLM" else ["constrained"]
                if r % 2:
                    configs.reverse()
                for c in cs:
                    n = args.num_requests or max(args.min_requests, args.waves * c)
                    n = -(-n // len(NAMES)) * len(NAMES)  # every schema equally often
                    for config in configs:
                        seed = 1_000_003 * r + c
                        s = run_config(p.url, config, c, n, seed, args, data["pins"])
                        rep.setdefault(f"{server} {config}", {})[c] = s
                        print(_line(f"{server[:5]} {config[:6]}", c, s), flush=True)
            finally:
                p.stop()
        data["repeats"].append(rep)
    return data


def big_schema(nonce: str, props: int) -> dict:
    """A schema nobody compiled before: `props` properties whose names carry `nonce`."""
    words = ["alpha", "bravo", "delta", "gamma", "sigma", "omega", "lumen", "vapor", "quartz", "ember"]
    kinds = [_s(12), _i(0, 1000), _B, _e("low", "mid", "high")]
    properties = {f"{words[i % len(words)]}_{nonce}_{i}": kinds[i % len(kinds)] for i in range(props)}
    return {"type": "object", "properties": properties, "required": list(properties)[:2], "additionalProperties": False}


async def new_schema_phase(base: str, args, inject: str | None, window: float | None, rng: random.Random) -> dict:
    """Steady streams; after `settle` s a window opens; with `inject` ("schema": new-schema requests; "plain":
    the same requests without a schema, generating as many tokens), they arrive at its start and it lasts until
    they all finished (at least --window-min s); without, it lasts `window` s."""
    url = base + "/v1/chat/completions"

    def steady_body() -> dict:
        extra = response_format(NAMES[0]) if args.steady == "schema" else {"ignore_eos": True}
        return request_body("chat", NAME, prompt(NAMES[0], rng, rng), args.steady_max_tokens, True, False, extra)

    async with _session() as session:
        before = await scrape(session, base)
        steady, stop_at = [], [float("inf")]

        async def worker():
            while time.perf_counter() < stop_at[0]:
                steady.append(await send(session, url, steady_body(), True, {}))
        workers = [asyncio.create_task(worker()) for _ in range(args.steady_streams)]
        await asyncio.sleep(args.settle)
        t0 = time.perf_counter()
        injected = []
        if inject:
            def extra() -> dict:
                if inject == "plain":
                    return {"ignore_eos": True}
                return {"response_format": {"type": "json_schema", "json_schema": {
                    "name": "form", "strict": True, "schema": big_schema(f"{rng.randrange(16 ** 8):08x}", args.props)}}}
            bodies = [request_body("chat", NAME, f"Ticket {rng.randrange(16 ** 8):08x}. Fill in the form.",
                                   args.inject_max_tokens, True, False, extra())
                      for _ in range(args.new_schema_requests)]
            injected = await asyncio.gather(*(send(session, url, b, True, {}) for b in bodies))
            t1 = max(time.perf_counter(), t0 + args.window_min)
        else:
            t1 = t0 + window
        await asyncio.sleep(max(0.0, t1 - time.perf_counter()))
        stop_at[0] = t1
        await asyncio.gather(*workers)
        after = await scrape(session, base)
    gaps = []
    for res in (x for x in steady if x.ok):
        t = res.start + res.ttft
        for gap in res.itls:
            t += gap
            if t0 <= t <= t1:
                gaps.append(gap)
    out = {"window_s": t1 - t0, "itl_ms": summarize([], 1)["itl_ms"], "itl_count": len(gaps),
           "grammars_compiled": after.get("grammars_compiled", 0) - before.get("grammars_compiled", 0)}
    if gaps:
        ms = 1000 * np.asarray(gaps)
        out["itl_ms"] = {"median": float(np.median(ms)), "p99": float(np.percentile(ms, 99)), "max": float(ms.max())}
    if inject:
        s = summarize(injected, t1 - t0)
        out["injected"] = {k: s[k] for k in ("completed", "errors", "ttft_ms", "e2e_ms")}
        out["injected"]["ttft_max_ms"] = 1000 * max((x.ttft for x in injected if x.ok), default=float("nan"))
    return out


def arm_flags(cap: int) -> list[str]:
    return ["--mixed-prefill-tokens", str(cap)] if cap else []


def new_schemas(folder: str, args) -> dict:
    """Each repeat runs every server setting (arm) in turn, a fresh server each, so drift hits all alike."""
    arms = {shlex.join(arm_flags(cap)) or "default": arm_flags(cap) for cap in args.mixed_prefill_tokens}
    data: dict = {"arms": {label: [] for label in arms}, "config": {k: getattr(args, k) for k in (
        "steady_streams", "steady", "steady_max_tokens", "new_schema_requests", "props", "inject_max_tokens",
        "settle", "window_min")}}
    for r, (label, flags) in ((r, arm) for r in range(args.repeats) for arm in arms.items()):
        print(f"== new schemas: repeat {r + 1}/{args.repeats}, server {label}", flush=True)
        p = start_scalellm(folder, flags)
        try:
            rng = random.Random(1000 + r)
            warm = [request_body("chat", NAME, prompt(NAMES[0], rng, rng), 8, True, False, response_format(NAMES[0]))]
            asyncio.run(closed_loop(p.url, [], warm, 1))  # compiles the steady schema
            with_new = asyncio.run(new_schema_phase(p.url, args, "schema", None, rng))
            plain = asyncio.run(new_schema_phase(p.url, args, "plain", None, rng))
            without = asyncio.run(new_schema_phase(p.url, args, None, with_new["window_s"], rng))
        finally:
            p.stop()
        rep = {"with new schemas": with_new, "same, no schema": plain, "without": without}
        for name, ph in rep.items():
            print(f"    {name:<17} window {ph['window_s']:5.1f} s  steady ITL p50 {ph['itl_ms']['median']:6.1f} "
                  f"p99 {ph['itl_ms']['p99']:7.1f} max {ph['itl_ms'].get('max', float('nan')):7.1f} ms "
                  f"({ph['itl_count']} gaps)  grammars compiled {ph['grammars_compiled']:.0f}", flush=True)
        data["arms"][label].append(rep)
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=None,
                    help="measured requests per run (default max(--min-requests, --waves x concurrency)); "
                         "rounded up to a multiple of the number of schemas")
    ap.add_argument("--waves", type=int, default=2)
    ap.add_argument("--min-requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=384, help="safety cap on constrained replies")
    ap.add_argument("--calibration-requests", type=int, default=32,
                    help="constrained requests whose median length per schema pins the unconstrained runs")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--vllm-bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND ('default': unset)")
    ap.add_argument("--skip-throughput", action="store_true", help="skip experiment 1")
    ap.add_argument("--new-schemas", action="store_true", help="run experiment 2 (ScaleLLM only)")
    ap.add_argument("--steady-streams", type=int, default=16)
    ap.add_argument("--steady", choices=["plain", "schema"], default="plain",
                    help="steady streams unconstrained (ignore_eos) or on the simple person schema")
    ap.add_argument("--steady-max-tokens", type=int, default=128)
    ap.add_argument("--new-schema-requests", type=int, default=16)
    ap.add_argument("--props", type=int, default=200, help="properties per new schema")
    ap.add_argument("--inject-max-tokens", type=int, default=32)
    ap.add_argument("--settle", type=float, default=6.0, help="seconds of steady load before the window")
    ap.add_argument("--window-min", type=float, default=5.0)
    ap.add_argument("--mixed-prefill-tokens", type=int, nargs="+", default=[0],
                    help="experiment 2's server settings, each run in every repeat (0: the server's default)")
    args = ap.parse_args()
    folder = MODELS["smollm2-135m"]()
    meta = {"command": shlex.join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT)
                                   else sys.executable, os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
            "vllm_version": "not run" if args.skip_vllm or args.skip_throughput else ensure_vllm(),
            "vllm_bind": args.vllm_bind, "max_tokens": args.max_tokens, "model_folder": folder}
    if not args.skip_throughput:
        path = write_report("throughput", {**meta, **throughput(folder, args)}, os.path.join(BENCH, "results"))
        print(f"wrote {path}", flush=True)
    if args.new_schemas:
        path = write_report("new_schemas", {**meta, **new_schemas(folder, args)}, os.path.join(BENCH, "results"))
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
