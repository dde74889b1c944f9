"""The operator's log: a line per API request (`scalellm.requests`), and a stats line every few
seconds while the server is busy (`scalellm.stats`)."""
from __future__ import annotations

import asyncio
import logging
import time

from scalellm.server.metrics import RequestRecord

request_log = logging.getLogger("scalellm.requests")
stats_log = logging.getLogger("scalellm.stats")


def request_line(method: str, path: str, status: int, outcome: str, seconds: float,
                 record: RequestRecord | None, message: str | None, client_id: str | None = None) -> str:
    """`POST /v1/completions 200 finished cmpl-...: prompt 12, output 16 tokens, finish length, TTFT
    0.105 s, E2E 0.523 s`; an error adds its message, a client's (or gateway's) x-request-id its
    `[x-request-id ID]` (a router's retries of one request share it)."""
    head = f"{method} {path} {status} {outcome}"
    if client_id:
        head += f" [x-request-id {client_id[:100]}]"
    if record is not None:
        ttft = f"{record.ttft:.3f} s" if record.ttft is not None else "-"
        finish = ",".join(sorted(set(record.finish_reasons))) or "-"
        head += (f" {record.request_id}: prompt {record.prompt_tokens}, output {record.output_tokens} tokens, "
                 f"finish {finish}, TTFT {ttft}, E2E {seconds:.3f} s")
    else:
        head += f" in {seconds:.3f} s"
    if message:
        head += f": {message[:300]}"
    return head


async def log_stats(server, interval: float) -> None:
    """While requests run or tokens moved since the last line, log what the engine is doing, like
    vLLM's periodic line; an idle server stays quiet."""
    metrics = server.metrics
    last_prompt, last_generated = metrics.totals()
    last_time = time.monotonic()
    last_spec = (0, 0, 0)
    while True:
        await asyncio.sleep(interval)
        if server.engine is None:
            continue
        s = server.engine.engine.stats()
        prompt, generated = metrics.totals()
        now = time.monotonic()
        busy = s["num_running"] or s["num_waiting"] or prompt != last_prompt or generated != last_generated
        if busy:
            dt = now - last_time
            queries = s["prefix_cache_queries"]
            hit_rate = 100.0 * s["prefix_cache_hits"] / queries if queries else 0.0
            stats_log.info("running %d, waiting %d requests; prompt %.1f tok/s, generation %.1f tok/s; "
                           "KV cache %.1f%% used; prefix-cache hit rate %.1f%%; %d preemptions",
                           s["num_running"], s["num_waiting"], (prompt - last_prompt) / dt,
                           (generated - last_generated) / dt, 100.0 * s["kv_cache_usage"], hit_rate,
                           s["num_preemptions"])
            if "spec_num_drafts" in s:
                drafts = s["spec_num_drafts"] - last_spec[0]
                accepted = s["spec_num_accepted_tokens"] - last_spec[2]
                proposed = s["spec_num_draft_tokens"] - last_spec[1]
                stats_log.info("speculative decoding: mean acceptance length %.2f, accepted %d of %d draft "
                               "tokens (%.1f%%) in %d drafts", 1 + accepted / drafts if drafts else 1.0, accepted,
                               proposed, 100.0 * accepted / proposed if proposed else 0.0, drafts)
        if "spec_num_drafts" in s:
            last_spec = (s["spec_num_drafts"], s["spec_num_draft_tokens"], s["spec_num_accepted_tokens"])
        last_prompt, last_generated, last_time = prompt, generated, now
