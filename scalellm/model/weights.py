"""Turn a stream of Hugging Face-named tensors into the model's fused weights, checking every shape."""
from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator

import torch
from tqdm import tqdm

from scalellm.model import moe_weights
from scalellm.model.config import ModelConfig
from scalellm.model.llama import LayerWeights, LlamaModel
from scalellm.ops import Linear, QuantizedLinear, QuantizedTensor

SMALL_BATCH_COPY_BYTES = 4 << 30  # above this much projection weight, no plain copies for small batches
# Weights that may be held block-quantized: the dense layers' projections, the embedding and the LM head
# (experts, routers and norms stay dense).
_QUANTIZABLE = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight"
                          r"|model\.embed_tokens\.weight|lm_head\.weight")


def _target_format(name: str, quantization: str) -> str:
    """q4_0 keeps the embedding and the LM head in Q8_0, as llama.cpp's files for small models do (the
    bundled SmolLM2 Q4_1 file does too): they are a fifth of a small model's weights and the most
    sensitive to rounding."""
    if quantization == "q4_0" and not name.startswith("model.layers."):
        return "q8_0"
    return quantization


def convert(name: str, tensor, quantization: str, dtype: torch.dtype, device: str):
    """A checkpoint tensor in the form the model holds it: block-quantized where `quantization` asks for
    it and the weight may be, else dense in dtype."""
    quantizable = _QUANTIZABLE.fullmatch(name) is not None and tensor.dim() == 2 and tensor.shape[1] % 32 == 0
    target = _target_format(name, quantization)
    if isinstance(tensor, QuantizedTensor):
        if quantizable and quantization in ("auto", tensor.format):
            return tensor.to(device)
        tensor = tensor.dequantize(torch.float32)
    if quantizable and quantization in ("q8_0", "q4_0"):
        return QuantizedTensor.quantize(tensor, target).to(device)
    return tensor.to(device=device, dtype=dtype)


def _fuse(parts: list, dtype: torch.dtype):
    """Row-concatenate weights; quantized parts stay quantized when they share one format."""
    if all(isinstance(p, QuantizedTensor) for p in parts) and len({p.format for p in parts}) == 1:
        return QuantizedTensor.cat(parts)
    dense = [p.dequantize(dtype).to(p.device) if isinstance(p, QuantizedTensor) else p for p in parts]
    return torch.cat(dense).contiguous()


def iter_safetensors(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        paths = [os.path.join(folder, name) for name in files]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise ValueError(f"missing checkpoint shard(s) named in {index}: {', '.join(missing)}")
    else:
        paths = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not paths:
            raise ValueError(f"no *.safetensors weights in {folder}")
    for path in paths:
        try:
            handle = safe_open(path, framework="pt")
        except Exception as e:
            raise ValueError(f"cannot read safetensors file {path} (corrupt or truncated?): {e}") from e
        with handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def build_model(config: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype,
                max_positions: int, device: str = "cpu", quantization: str = "none") -> LlamaModel:
    """quantization: none (all dense in dtype), auto (block-quantized checkpoint weights kept as they are),
    q8_0 or q4_0 (projections, embedding and LM head quantized here)."""
    c = config
    hd, h = c.head_dim, c.hidden_size
    expected = {
        "model.embed_tokens.weight": (c.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not c.tie_word_embeddings:
        expected["lm_head.weight"] = (c.vocab_size, h)
    per_layer = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (c.num_heads * hd, h),
        "self_attn.k_proj.weight": (c.num_kv_heads * hd, h),
        "self_attn.v_proj.weight": (c.num_kv_heads * hd, h),
        "self_attn.o_proj.weight": (h, c.num_heads * hd),
        "mlp.gate_proj.weight": (c.intermediate_size, h),
        "mlp.up_proj.weight": (c.intermediate_size, h),
        "mlp.down_proj.weight": (h, c.intermediate_size),
    }
    if c.qkv_bias:
        per_layer.update({"self_attn.q_proj.bias": (c.num_heads * hd,), "self_attn.k_proj.bias": (c.num_kv_heads * hd,),
                          "self_attn.v_proj.bias": (c.num_kv_heads * hd,)})
    if c.qk_norm:
        per_layer.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
    sparse = {n: s for n, s in per_layer.items() if not n.startswith("mlp.")} | moe_weights.expected_shapes(c)
    for i in range(c.num_layers):
        for name, shape in (sparse if c.is_sparse(i) else per_layer).items():
            expected[f"model.layers.{i}.{name}"] = shape
    if c.num_experts:
        tensors = (pair for name, tensor in tensors for pair in moe_weights.canonical(name, tensor))

    found: dict[str, torch.Tensor] = {}
    with tqdm(total=len(expected), desc="loading weights", unit="tensor") as bar:  # ends its line when done
        for name, tensor in tensors:
            if name not in expected:
                continue  # tensors this architecture does not use (a tied lm_head, rotary buffers)
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"shape mismatch for {name}: checkpoint has {tuple(tensor.shape)}, "
                                 f"config implies {expected[name]}")
            found[name] = convert(name, tensor, quantization, dtype, device)
            bar.update()
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"checkpoint is missing tensor(s): {', '.join(missing[:3])}{more}")

    def get(name: str) -> torch.Tensor:
        return found.pop(name)

    # Small batches use a second, plain copy of each projection (ops.Linear); skipped for big models.
    projection_bytes = sum(t.numel() * t.element_size() for n, t in found.items()
                           if n.endswith("proj.weight") and isinstance(t, torch.Tensor))
    small_batch = projection_bytes <= SMALL_BATCH_COPY_BYTES

    def linear(weight, bias: torch.Tensor | None = None, plain_copy: bool = small_batch):
        if isinstance(weight, QuantizedTensor):
            return QuantizedLinear(weight, bias, dtype)
        return Linear(weight, bias, small_batch=plain_copy)

    layers = []
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        qkv = _fuse([get(p + f"self_attn.{x}_proj.weight") for x in "qkv"], dtype)
        bias = torch.cat([get(p + f"self_attn.{x}_proj.bias") for x in "qkv"]) if c.qkv_bias else None
        layers.append(LayerWeights(
            input_norm=get(p + "input_layernorm.weight"),
            qkv=linear(qkv, bias),
            q_norm=get(p + "self_attn.q_norm.weight") if c.qk_norm else None,
            k_norm=get(p + "self_attn.k_norm.weight") if c.qk_norm else None,
            o_proj=linear(get(p + "self_attn.o_proj.weight")),
            post_norm=get(p + "post_attention_layernorm.weight"),
            gate_up=None if c.is_sparse(i) else linear(_fuse([get(p + "mlp.gate_proj.weight"),
                                                              get(p + "mlp.up_proj.weight")], dtype)),
            down=None if c.is_sparse(i) else linear(get(p + "mlp.down_proj.weight")),
            moe=moe_weights.build_moe(c, get, p, linear) if c.is_sparse(i) else None,
        ))
    embed = get("model.embed_tokens.weight")
    lm_head = linear(embed if c.tie_word_embeddings else get("lm_head.weight"),
                     plain_copy=small_batch or c.tie_word_embeddings)
    if c.tie_word_embeddings and isinstance(embed, QuantizedTensor):
        embed = lm_head.weight  # one copy, in the layout the head's kernel reads (the lookup reads either)
    return LlamaModel(c, embed, layers, get("model.norm.weight"), lm_head, max_positions)
