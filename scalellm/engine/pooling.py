"""Embeddings: the model's pooling (read from a sentence-transformers layout or --pooler-config), and
each embedding request's running pool over its prompt's final hidden states, chunk by chunk.

A sentence-transformers folder names its pooling in modules.json and 1_Pooling/config.json, and
normalizes when modules.json lists a Normalize module; without them a decoder model pools its last
token and normalizes, as vLLM does for decoder embedding models. Matryoshka sizes come from
config.json's `matryoshka_dimensions`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from scalellm.pooling_params import POOLING_TYPES, PoolingParams

_ST_MODES = {"pooling_mode_lasttoken": "LAST", "pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS"}


@dataclass
class PoolerConfig:
    pooling_type: str = "LAST"
    normalize: bool = True
    matryoshka_dimensions: list[int] | None = None  # the sizes `dimensions` may ask for; None: not Matryoshka
    unsupported: str | None = None  # why the model's own pooling cannot be served (embeddings are refused)


def load_pooler_config(model_path: str, override: str | dict | None = None) -> PoolerConfig:
    """The model's pooling: its sentence-transformers files, then --pooler-config's keys over them
    (vLLM's JSON: pooling_type, normalize). Raises ValueError for a pooling this engine lacks."""
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(os.path.abspath(model_path))
    config = PoolerConfig()
    modules = _read_json(os.path.join(folder, "modules.json"))
    if isinstance(modules, list):
        types = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
        config.normalize = any(t.endswith("Normalize") for t in types)
        for m in modules:
            if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling"):
                try:
                    config.pooling_type = _sentence_transformers_mode(os.path.join(folder, m.get("path", ""),
                                                                                   "config.json"))
                except ValueError as e:  # generation is still served
                    config.unsupported = str(e)
    hf = _read_json(os.path.join(folder, "config.json"))
    dims = hf.get("matryoshka_dimensions") if isinstance(hf, dict) else None
    if isinstance(dims, list) and dims and all(isinstance(d, int) and d > 0 for d in dims):
        config.matryoshka_dimensions = sorted(dims)
    override = parse_override(override)
    if "pooling_type" in override:
        config.pooling_type, config.unsupported = override["pooling_type"], None
    if "normalize" in override:
        config.normalize = override["normalize"]
    return config


def parse_override(override: str | dict | None) -> dict:
    """--pooler-config's JSON (vLLM's keys pooling_type and normalize), checked; ValueError says why not."""
    if isinstance(override, str):
        try:
            override = json.loads(override)
        except json.JSONDecodeError as e:
            raise ValueError(f"pooler config must be JSON, e.g. '{{\"pooling_type\": \"MEAN\"}}': {e}") from None
    if not override:
        return {}
    if not isinstance(override, dict):
        raise ValueError("pooler config must be a JSON object")
    unknown = set(override) - {"pooling_type", "normalize"}
    if unknown:
        raise ValueError(f"pooler config: unsupported keys {sorted(unknown)} (pooling_type, normalize)")
    out = dict(override)
    if "pooling_type" in out:
        out["pooling_type"] = PoolingParams(pooling_type=out["pooling_type"]).pooling_type
    if "normalize" in out and not isinstance(out["normalize"], bool):
        raise ValueError("pooler config: normalize must be true or false")
    return out


def _sentence_transformers_mode(path: str) -> str:
    settings = _read_json(path)
    if not isinstance(settings, dict):
        raise ValueError(f"cannot read the pooling configuration {path}")
    on = [k for k, v in settings.items() if k.startswith("pooling_mode_") and v is True]
    if len(on) != 1 or on[0] not in _ST_MODES:
        raise ValueError(f"{path}: pooling {on} is not supported (one of {', '.join(sorted(_ST_MODES))})")
    return _ST_MODES[on[0]]


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def resolve(params: PoolingParams, config: PoolerConfig, hidden_size: int) -> PoolingParams:
    """The request's pooling with the model's defaults filled in; ValueError for sizes it cannot have."""
    if config.unsupported and params.pooling_type is None:
        raise ValueError(f"this model's pooling cannot be served: {config.unsupported}; choose one with "
                         f"--pooler-config")
    dims = params.dimensions
    if dims is not None and dims != hidden_size:
        sizes = config.matryoshka_dimensions
        if sizes is None:
            raise ValueError(f"dimensions: this model does not support Matryoshka sizes (its embeddings have "
                             f"{hidden_size}); leave dimensions out")
        if dims not in sizes:
            raise ValueError(f"dimensions must be one of {sizes}, got {dims}")
    return PoolingParams(params.pooling_type or config.pooling_type,
                         config.normalize if params.normalize is None else params.normalize, dims)


class Pool:
    """One embedding request's pool: a float32 sum (MEAN) or the one row it needs."""
    __slots__ = ("params", "total", "count")

    def __init__(self, params: PoolingParams):
        assert params.pooling_type in POOLING_TYPES
        self.params = params
        self.total: torch.Tensor | None = None
        self.count = 0

    def wanted(self, start: int, n: int, prompt_len: int) -> tuple[int, int] | None:
        """Which rows of a prompt chunk (positions start .. start + n - 1) the pool still needs: offsets
        [lo, hi). Positions pooled already (before a preemption made the prompt recompute) are skipped."""
        kind = self.params.pooling_type
        if kind == "MEAN":
            lo = max(0, self.count - start)
            return (lo, n) if lo < n else None
        if self.count:
            return None
        if kind == "CLS":
            return (0, 1) if start == 0 else None
        return (n - 1, n) if start + n == prompt_len else None

    def add(self, rows: torch.Tensor) -> None:
        """rows: final-normed hidden states [k, hidden] of the positions wanted_rows named."""
        part = rows.float().sum(0)
        self.total = part if self.total is None else self.total + part
        self.count += rows.shape[0]

    def result(self) -> torch.Tensor:
        vector = self.total / self.count
        if self.params.dimensions is not None:
            vector = vector[:self.params.dimensions]
        if self.params.normalize:
            vector = torch.nn.functional.normalize(vector, dim=0)
        return vector.cpu()
