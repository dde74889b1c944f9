"""One normalized description of a Llama-family checkpoint, whatever file it came from."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
MODEL_TYPE_TO_ARCH = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}


@dataclass
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    inv_freq: torch.Tensor = field(repr=False)
    rope_attention_scaling: float = 1.0
    sliding_window: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hf_config: object = field(default=None, repr=False)
    # mixture of experts (num_experts 0: dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalize the top-k routing weights over the chosen experts
    moe_weights_float32: bool = False  # Mixtral keeps routing weights in float32 (Qwen casts them back)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's shared expert (0: none)
    sparse_layers: tuple[bool, ...] = ()  # per layer: an MoE block (else a dense MLP)

    def is_sparse(self, layer: int) -> bool:
        return bool(self.sparse_layers) and self.sparse_layers[layer]


def architecture_of(hf_config) -> str:
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs:
        model_type = getattr(hf_config, "model_type", "")
        if model_type not in MODEL_TYPE_TO_ARCH:
            raise ValueError(f"unsupported architecture: model_type {model_type!r}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        return MODEL_TYPE_TO_ARCH[model_type]
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture: {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def model_config_from_hf(hf_config) -> ModelConfig:
    arch = architecture_of(hf_config)
    kind = SUPPORTED_ARCHITECTURES[arch]
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    inv_freq, scaling = _rope(hf_config, head_dim)
    sliding = getattr(hf_config, "sliding_window", None)
    if kind == "qwen2" and not getattr(hf_config, "use_sliding_window", False):
        sliding = None
    if kind in ("llama", "qwen3", "qwen2_moe", "qwen3_moe") and not getattr(hf_config, "use_sliding_window", False):
        sliding = None
    config = ModelConfig(
        architecture=arch,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        vocab_size=hf_config.vocab_size,
        rms_norm_eps=hf_config.rms_norm_eps,
        max_position_embeddings=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=(kind == "qwen2" or bool(getattr(hf_config, "attention_bias", False))
                  or (kind == "qwen2_moe" and bool(getattr(hf_config, "qkv_bias", True)))),
        qk_norm=kind in ("qwen3", "qwen3_moe"),
        inv_freq=inv_freq,
        rope_attention_scaling=scaling,
        sliding_window=sliding,
        eos_token_ids=_as_list(getattr(hf_config, "eos_token_id", None)),
        hf_config=hf_config,
    )
    if kind in ("mixtral", "qwen2_moe", "qwen3_moe"):
        _moe_config(config, hf_config, kind)
    return config


def _moe_config(config: ModelConfig, hf_config, kind: str) -> None:
    experts = getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "num_experts", None) or 0
    config.num_experts = int(experts)
    config.num_experts_per_tok = int(hf_config.num_experts_per_tok)
    layers = range(config.num_layers)
    if kind == "mixtral":  # every layer sparse, experts as wide as intermediate_size, always renormalized
        config.moe_intermediate_size = config.intermediate_size
        config.norm_topk_prob = True
        config.moe_weights_float32 = True
        config.sparse_layers = tuple(True for _ in layers)
        return
    config.moe_intermediate_size = int(hf_config.moe_intermediate_size)
    config.norm_topk_prob = bool(getattr(hf_config, "norm_topk_prob", False))
    if kind == "qwen2_moe":
        config.shared_expert_intermediate_size = int(getattr(hf_config, "shared_expert_intermediate_size", 0) or 0)
    dense = set(getattr(hf_config, "mlp_only_layers", None) or [])
    step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
    config.sparse_layers = tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in layers)


def _rope(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if not params:  # configs written before rope_parameters existed
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        base = float(params.get("rope_theta", 10000.0))
        dim = int(head_dim * float(getattr(hf_config, "partial_rotary_factor", 1.0)))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0
    if rope_type == "dynamic":
        raise ValueError("rope_scaling type 'dynamic' is not supported (its frequencies change with length)")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


def _as_list(x) -> list[int]:
    if x is None:
        return []
    if isinstance(x, int):
        return [x]
    return [int(i) for i in x]
