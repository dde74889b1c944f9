"""PEFT LoRA adapters read into the model's fused projection layout.

The model holds q/k/v fused as `qkv` and gate/up as `gate_up`, so an adapter's A and B matrices are laid
out per fused projection: A stacked by sub-projection ([subs * max_rank, in], each sub's rank padded to
max_rank) and B block-placed ([out, subs * max_rank], each sub's rows against its own columns), with the
scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) folded into B. Every adapter then has one shape per
projection, so adapters stack into slots (engine/lora_manager.py) with a plain copy.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch

from scalellm.model.config import ModelConfig

# fused projection -> its parts: (PEFT module name, its rows' offset and count in the fused output)
GROUPS = ("qkv", "o_proj", "gate_up", "down")
_MODULE = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])"
                     r"(?:\.[\w-]+)?\.weight")
_KEYS_IGNORED = ("lora_magnitude_vector",)  # DoRA's, refused through use_dora below


def group_parts(config: ModelConfig) -> dict[str, list[tuple[str, int, int]]]:
    q, kv, inter = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.intermediate_size
    return {"qkv": [("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv)],
            "o_proj": [("o_proj", 0, config.hidden_size)],
            "gate_up": [("gate_proj", 0, inter), ("up_proj", inter, inter)],
            "down": [("down_proj", 0, config.hidden_size)]}


def group_inputs(config: ModelConfig) -> dict[str, int]:
    h = config.hidden_size
    return {"qkv": h, "o_proj": config.num_heads * config.head_dim, "gate_up": h, "down": config.intermediate_size}


@dataclass
class LoRAAdapter:
    name: str
    path: str
    rank: int  # the largest rank of its modules
    # (layer, group) -> (A [subs * max_rank, in], B [out, subs * max_rank]), in the model's dtype
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def load_adapter(name: str, path: str, config: ModelConfig, dtype: torch.dtype, max_rank: int) -> LoRAAdapter:
    """Read and check a PEFT adapter; ValueError says what makes it unservable."""
    settings = _adapter_config(path)
    tensors = _adapter_tensors(path)
    parts, inputs = group_parts(config), group_inputs(config)
    part_of = {p: (g, j, off, n) for g, ps in parts.items() for j, (p, off, n) in enumerate(ps)}
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if any(k in key for k in _KEYS_IGNORED):
            continue
        m = _MODULE.fullmatch(key)
        if m is None:
            raise ValueError(f"LoRA adapter {name}: {key} is not a LoRA weight of an attention or MLP projection "
                             f"(adapters on embed_tokens or lm_head, or with modules_to_save, are not supported)")
        layer, module, which = int(m.group(1)), m.group(3), m.group(4)
        if module not in part_of or layer >= config.num_layers:
            raise ValueError(f"LoRA adapter {name}: {key} targets a module this model does not have")
        if config.is_sparse(layer) and module in ("gate_proj", "up_proj", "down_proj"):
            raise ValueError(f"LoRA adapter {name}: {key} targets a mixture-of-experts layer's MLP, which LoRA "
                             f"is not supported on")
        found.setdefault((layer, module), {})[which] = tensor
    if not found:
        raise ValueError(f"LoRA adapter {name}: no LoRA weights in {path}")
    alpha = float(settings.get("lora_alpha", settings.get("r", 8)))
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    top_rank = 0
    for (layer, module), ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {name}: layer {layer} {module} has lora_{''.join(ab)} only")
        a, b = ab["A"].float(), ab["B"].float()
        group, j, offset, rows = part_of[module]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != inputs[group] or b.shape != (rows, r):
            raise ValueError(f"LoRA adapter {name}: layer {layer} {module} has A {tuple(a.shape)} and B "
                             f"{tuple(b.shape)}; this model needs A [r, {inputs[group]}] and B [{rows}, r]")
        if r > max_rank:
            raise ValueError(f"LoRA adapter {name}: rank {r} is above the maximum {max_rank} (--max-lora-rank)")
        top_rank = max(top_rank, r)
        scale = alpha / (math.sqrt(r) if settings.get("use_rslora") else r)
        subs = len(parts[group])
        if (layer, group) not in weights:
            out = parts[group][-1][1] + parts[group][-1][2]
            weights[layer, group] = (torch.zeros(subs * max_rank, inputs[group]), torch.zeros(out, subs * max_rank))
        big_a, big_b = weights[layer, group]
        big_a[j * max_rank:j * max_rank + r] = a
        big_b[offset:offset + rows, j * max_rank:j * max_rank + r] = b * scale
    weights = {k: (a.to(dtype), b.to(dtype)) for k, (a, b) in weights.items()}
    return LoRAAdapter(name, path, top_rank, weights)


def _adapter_config(path: str) -> dict:
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"LoRA adapter not found: {config_path} does not exist (a PEFT adapter folder holds "
                         f"adapter_config.json and adapter_model.safetensors)")
    try:
        with open(config_path) as f:
            settings = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {config_path}: {e}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{config_path} must hold a JSON object")
    kind = settings.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise ValueError(f"{config_path}: peft_type {kind} is not supported (LORA only)")
    if settings.get("use_dora"):
        raise ValueError(f"{config_path}: DoRA adapters (use_dora) are not supported")
    if settings.get("modules_to_save"):
        raise ValueError(f"{config_path}: modules_to_save ({settings['modules_to_save']}) is not supported: the "
                         f"adapter would replace whole modules")
    if settings.get("bias", "none") != "none":
        raise ValueError(f"{config_path}: bias {settings['bias']!r} is not supported (none only)")
    if settings.get("alpha_pattern"):
        raise ValueError(f"{config_path}: alpha_pattern is not supported")
    if settings.get("fan_in_fan_out"):
        raise ValueError(f"{config_path}: fan_in_fan_out is not supported")
    targets = settings.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    bad = [t for t in targets if t in ("embed_tokens", "lm_head")]
    if bad:
        raise ValueError(f"{config_path}: adapters on {', '.join(bad)} are not supported (attention and MLP "
                         f"projections only)")
    return settings


def _adapter_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(file):
        raise ValueError(f"LoRA adapter {path}: adapter_model.safetensors is missing (adapter_model.bin is not read)")
    try:
        return load_file(file)
    except Exception as e:
        raise ValueError(f"cannot read {file} (corrupt or truncated?): {e}") from e
