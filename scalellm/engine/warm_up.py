"""Compile (or load from numba's cache) every kernel a request can reach, before serving."""
from __future__ import annotations

import contextlib
import logging
import time

from scalellm.ops import jit
from scalellm.pooling_params import PoolingParams
from scalellm.sampling_params import SamplingParams

log = logging.getLogger(__name__)


def warm_up(engine) -> None:
    """The model's kernels at both sizes, then a few requests through whole steps (sampling with every
    option, logprobs, n > 1, a scored prompt, an embedding). The KV cache, block manager and scheduler
    start afresh afterwards."""
    start, first = time.perf_counter(), len(jit.compiles())
    with jit.warming_up():
        engine.runner.warm_up()
        if engine.draft_model is not None:
            engine.draft_model.warm_up()
        prompt = [t % engine.model_config.vocab_size for t in range(1, min(10, engine.max_model_len - 3))]
        everything = SamplingParams(n=2, max_tokens=3, min_tokens=1, temperature=0.8, top_k=5, top_p=0.9,
                                    min_p=0.05, presence_penalty=0.5, frequency_penalty=0.5,
                                    repetition_penalty=1.1, seed=0, logprobs=2, stop_token_ids=[0])
        requests = (SamplingParams(temperature=0, max_tokens=2), everything, SamplingParams(temperature=1.0, max_tokens=2),
                    SamplingParams(max_tokens=0, prompt_logprobs=1),
                    SamplingParams(max_tokens=0, pooling=PoolingParams(pooling_type="MEAN")))
        for i, params in enumerate(requests):
            with contextlib.suppress(ValueError):  # a context or KV cache too small for it
                engine.add_request(f"warm-up-{i}", prompt, params)
        while engine.has_unfinished():
            engine.step()
    engine.runner.reset_cache()
    if engine.draft_model is not None:
        engine.draft_model.runner.reset_cache()
    engine._fresh_scheduler()
    engine.num_steps, engine.forward_seconds = 0, 0.0
    if engine.speculator is not None:  # counters from zero
        engine.speculator = engine._speculator(engine.speculator.config)
    log.info("warm-up took %.1f s: %s", time.perf_counter() - start, jit.summary(first))
