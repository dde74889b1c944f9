"""The engine's counters and gauges, read by /metrics, the stats log line and the dashboard."""
from __future__ import annotations


def engine_stats(engine) -> dict[str, float]:
    bm = engine.block_manager
    return {
        "num_running": len(engine.scheduler.running),
        "num_waiting": len(engine.scheduler.waiting),
        "kv_cache_usage": bm.usage,
        "kv_blocks_used": bm.num_used_blocks,
        "prefix_cache_queries": bm.prefix_queries,
        "prefix_cache_hits": bm.prefix_hits,
        "num_preemptions": engine.scheduler.num_preemptions,
        "block_size": bm.block_size,
        "num_blocks": bm.num_blocks,
        "weight_bytes": engine.weight_bytes,
        "steps": engine.num_steps,
        "step_forward_seconds": engine.forward_seconds,
        "grammar_mask_seconds": engine.logits_processor.mask_seconds,
        "grammar_mask_steps": engine.logits_processor.mask_steps,
        "grammars_compiled": engine.grammars.num_compiled,
        **(engine.speculator.stats() if engine.speculator is not None else {}),
        **({"lora_info": engine.loras.info(engine.scheduler)} if engine.loras is not None else {}),
    }
