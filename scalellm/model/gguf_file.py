"""GGUF checkpoints: tensors read with the gguf package, dequantized here with vectorized numpy."""
from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import torch

from scalellm.ops.quant.tensor import GGUF_TYPES, QuantizedTensor

QK = 32  # elements per block in the legacy quant formats


def _halves(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] packed bytes -> [n, 32] values: low nibbles are elements 0-15, high ones 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    d = _halves(blocks, 0)
    return (_nibbles(blocks[:, 2:18]) - 8.0) * d


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    d, m = _halves(blocks, 0), _halves(blocks, 2)
    return _nibbles(blocks[:, 4:20]) * d + m


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    d = _halves(blocks, 0)
    return blocks[:, 2:34].copy().view(np.int8).astype(np.float32) * d


# type id -> (bytes per block of 32 elements, dequantizer)
BLOCK_FORMATS = {2: (18, _q4_0), 3: (20, _q4_1), 8: (34, _q8_0)}


def dequantize(tensor) -> torch.Tensor:
    """A gguf ReaderTensor -> float32 tensor in PyTorch's [rows, cols] order."""
    import gguf

    shape = tuple(int(x) for x in reversed(tensor.shape.tolist()))
    ttype = int(tensor.tensor_type)
    raw = np.asarray(tensor.data)
    if ttype == gguf.GGMLQuantizationType.F32:
        values = raw.astype(np.float32, copy=False)
    elif ttype == gguf.GGMLQuantizationType.F16:
        values = raw.view(np.float16).astype(np.float32)
    elif ttype == gguf.GGMLQuantizationType.BF16:
        values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif ttype in BLOCK_FORMATS:
        block_bytes, fn = BLOCK_FORMATS[ttype]
        blocks = raw.reshape(-1).view(np.uint8).reshape(-1, block_bytes)
        values = fn(blocks)
    else:  # k-quants and the rest: the gguf package's own numpy dequantizers
        values = gguf.quants.dequantize(raw, tensor.tensor_type)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"GGUF tensor {tensor.name!r}: {values.size} values for shape {shape} (corrupt file?)")
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    # mixture of experts: the router, the stacked experts [experts, out, in], Qwen2-MoE's shared expert
    "ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.gate_proj", "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(name: str) -> str | None:
    m = _LAYER_RE.match(name)
    if m:
        layer, part, kind = m.groups()
        if part not in LAYER_NAMES:
            return None
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{kind}"
    base, _, kind = name.rpartition(".")
    return f"{GLOBAL_NAMES[base]}.{kind}" if base in GLOBAL_NAMES else None


def _unpermute(w, n_head: int):
    """Undo llama.cpp's conversion-time reordering of Q/K rows (interleaved RoPE -> rotate-half); a
    quantized weight's rows move with their blocks."""
    def rows(t: torch.Tensor) -> torch.Tensor:
        dim = t.shape[0] // n_head // 2
        return t.reshape(n_head, dim, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
    return w.reshape_rows(rows) if isinstance(w, QuantizedTensor) else rows(w)


def read_tensor(tensor, keep_blocks: bool):
    """A ReaderTensor as a QuantizedTensor when keep_blocks and it is a 2-D Q8_0/Q4_0/Q4_1 weight, else
    dequantized to float32."""
    ttype = int(tensor.tensor_type)
    if keep_blocks and ttype in GGUF_TYPES and len(tensor.shape) == 2:
        shape = tuple(int(x) for x in reversed(tensor.shape.tolist()))
        return QuantizedTensor.from_gguf_blocks(GGUF_TYPES[ttype], np.asarray(tensor.data), shape)
    return dequantize(tensor)


def has_block_weights(path: str) -> bool:
    """Whether the file holds 2-D weights in a block format served as stored (Q8_0, Q4_0, Q4_1)."""
    import gguf

    return any(int(t.tensor_type) in GGUF_TYPES and len(t.shape) == 2 for t in gguf.GGUFReader(path).tensors)


def iter_gguf_weights(path: str, num_heads: int, num_kv_heads: int, arch: str, keep_blocks: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """keep_blocks: yield Q8_0/Q4_0/Q4_1 weights in their blocks (QuantizedTensor) instead of dequantized."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on a damaged file
        raise ValueError(f"cannot read GGUF file {path}: {e}") from e
    permuted = arch in ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        w = read_tensor(tensor, keep_blocks and ".mlp.experts." not in name)
        if permuted and name.endswith("q_proj.weight"):
            w = _unpermute(w, num_heads)
        elif permuted and name.endswith("k_proj.weight"):
            w = _unpermute(w, num_kv_heads)
        if ".mlp.experts." in name:  # stacked: one tensor per expert
            prefix, _, rest = name.partition("mlp.experts.")
            for e in range(w.shape[0]):
                yield f"{prefix}mlp.experts.{e}.{rest}", w[e]
            continue
        yield name, w


def moe_config(path: str, hf_config):
    """transformers reads a GGUF's config without the experts' widths (qwen2moe, qwen3moe) and reads a
    llama GGUF with experts (Mixtral) as a dense Llama: complete or convert the config from the file."""
    import gguf

    fields = gguf.GGUFReader(path).fields

    def value(key: str):
        field = fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    experts = value(f"{arch}.expert_count") or 0
    if not experts:
        return hf_config
    if arch in ("qwen2moe", "qwen3moe"):
        hf_config.moe_intermediate_size = int(value(f"{arch}.expert_feed_forward_length"))
        shared = value(f"{arch}.expert_shared_feed_forward_length")
        if shared:
            hf_config.shared_expert_intermediate_size = int(shared)
        hf_config.mlp_only_layers = []  # llama.cpp's MoE models have experts in every layer
        hf_config.decoder_sparse_step = 1
        return hf_config
    if arch == "llama":
        from transformers import MixtralConfig

        config = dict(hf_config.to_dict())
        for key in ("architectures", "model_type", "transformers_version"):
            config.pop(key, None)
        mixtral = MixtralConfig(**config, num_local_experts=int(experts),
                                num_experts_per_tok=int(value(f"{arch}.expert_used_count")))
        mixtral.architectures = ["MixtralForCausalLM"]
        return mixtral
    raise ValueError(f"unsupported architecture: GGUF {arch!r} with {experts} experts")
