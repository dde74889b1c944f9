"""--speculative-config, in vLLM's JSON form: n-gram prompt lookup or a draft model."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model",
         "disable_by_batch_size", "draft_tensor_parallel_size", "quantization"}


@dataclass
class SpeculativeConfig:
    method: str  # "ngram" or "draft_model"
    num_speculative_tokens: int
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    model: str | None = None  # the draft model's folder or .gguf file
    disable_by_batch_size: int | None = None  # no speculation while this many sequences or more run
    quantization: str | None = None  # the draft model's; default: as the target's

    @classmethod
    def parse(cls, value: str | dict | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """A JSON string, a dict or a config; None (or {}) means no speculation. Raises ValueError."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative config is not valid JSON: {e}") from e
        if not isinstance(value, dict):
            raise ValueError("speculative config must be a JSON object")
        if not value:
            return None
        unknown = sorted(set(value) - _KEYS)
        if unknown:
            raise ValueError(f"speculative config: unknown keys {unknown}")
        if value.get("draft_tensor_parallel_size", 1) != 1:
            raise ValueError("speculative config: draft_tensor_parallel_size must be 1")
        model = value.get("model")
        method = value.get("method") or ("ngram" if model in (None, "ngram", "[ngram]") else "draft_model")
        if method in ("draft_model", "draft") and model is None:
            raise ValueError("speculative config: a draft model needs \"model\"")
        if method not in ("ngram", "draft_model", "draft"):
            raise ValueError(f"speculative config: method {method!r} is not supported (ngram or a draft model)")
        k = value.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ValueError("speculative config: num_speculative_tokens must be an integer in [1, 16]")
        config = cls("ngram" if method == "ngram" else "draft_model", k, quantization=value.get("quantization"),
                     disable_by_batch_size=value.get("disable_by_batch_size"))
        if config.method == "ngram":
            lo, hi = value.get("prompt_lookup_min"), value.get("prompt_lookup_max")
            lo = lo if lo is not None else (hi if hi is not None else 1)  # vLLM: one defaults to the other
            hi = hi if hi is not None else max(lo, 4)
            for name, n in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
                if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                    raise ValueError(f"speculative config: {name} must be an integer of at least 1")
            if lo > hi:
                raise ValueError("speculative config: prompt_lookup_min must not exceed prompt_lookup_max")
            config.prompt_lookup_min, config.prompt_lookup_max = lo, hi
        else:
            if not isinstance(model, str) or not os.path.exists(model):
                raise ValueError(f"speculative config: draft model not found: {model!r} (a local folder or .gguf)")
            config.model = model
        b = config.disable_by_batch_size
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
            raise ValueError("speculative config: disable_by_batch_size must be a positive integer")
        return config
