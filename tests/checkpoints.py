"""Small checkpoints built in code with fixed seeds: one per supported architecture."""
from __future__ import annotations

import os

import torch

from scalellm.model.loader import default_model_path

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]
_tokenizer = None


def bundled_tokenizer():
    """SmolLM2's byte-level BPE tokenizer (with its chat template), read from the bundled GGUF, or from the
    folder in $SCALELLM_TEST_TOKENIZER (a machine the bundled package was not carried to)."""
    global _tokenizer
    if _tokenizer is None:
        from transformers import AutoTokenizer

        folder = os.environ.get("SCALELLM_TEST_TOKENIZER")
        if folder:
            _tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            path = default_model_path()
            _tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return _tokenizer


def make_config(arch: str, **overrides):
    config = _base_config(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _base_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-6, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "llama3":
        return tf.LlamaConfig(**common, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128})
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
    # mixture of experts: several experts per token; Qwen2-MoE with its shared expert; Qwen3-MoE with a
    # dense middle layer (mlp_only_layers) and renormalized routing
    if arch == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48,
                                 shared_expert_intermediate_size=96, norm_topk_prob=False, tie_word_embeddings=False)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**{**common, "num_hidden_layers": 3}, head_dim=32, num_experts=8,
                                 num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=True,
                                 mlp_only_layers=[1], tie_word_embeddings=False)
    raise ValueError(arch)


def perturb_norms_and_biases(model, seed: int) -> None:
    """transformers initializes RMSNorm weights to one and biases to zero, so a loader that skipped
    them would go unnoticed; give each its own seeded values, mild enough to keep logits well spread."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.5 * noise)


def build_checkpoint(arch: str, folder: str, seed: int = 0, max_shard_size: str | None = None,
                     **config_overrides) -> str:
    """Seeded random weights saved as safetensors plus the tokenizer, in float32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_config(arch, **config_overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    perturb_norms_and_biases(model, seed + 1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    bundled_tokenizer().save_pretrained(folder)
    return folder


def hf_greedy(folder: str, prompts: list[list[int]], max_new_tokens: int, **config_overrides
              ) -> tuple[list[list[int]], list[list[float]]]:
    """transformers' own greedy generate (float32, one prompt at a time) and chosen-token logprobs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **config_overrides)
    model.generation_config.eos_token_id = None
    tokens, logprobs = [], []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=0)
            new = out.sequences[0, len(prompt):].tolist()
            # scores are raw logits under greedy decoding (no processors change them)
            lps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, new)]
            tokens.append(new)
            logprobs.append(lps)
    return tokens, logprobs


def prompt_logits(model, token_ids: list[int], block_size: int = 16) -> torch.Tensor:
    """One prefill of the whole prompt through a loaded ScaleLLM model: logits at every position."""
    from scalellm import ops

    c = model.config
    n = len(token_ids)
    num_blocks = -(-n // block_size)
    dev = model.embed.device
    cache = torch.zeros(c.num_layers, 2, num_blocks, block_size, c.num_kv_heads, c.head_dim, dtype=model.dtype,
                        device=dev)
    table = list(range(num_blocks))
    meta = ops.build_attention_metadata(block_size, list(range(n)), [], [], [(0, n, n, table)], c.sliding_window)
    hidden = model.forward(torch.tensor(token_ids, device=dev), torch.arange(n, device=dev), cache, meta)
    return model.logits(hidden)


def hf_prompt_logits(model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def model_greedy(model, prompt: list[int], max_new_tokens: int, chunk: int = 24, block_size: int = 16) -> list[int]:
    """Greedy decoding straight through a loaded ScaleLLM model and the attention ops, without the
    engine: the prompt in prefill chunks of `chunk` tokens, then one decode step per token."""
    from scalellm import ops

    c = model.config
    num_blocks = -(-(len(prompt) + max_new_tokens) // block_size)
    cache = torch.zeros(c.num_layers, 2, num_blocks, block_size, c.num_kv_heads, c.head_dim, dtype=model.dtype)
    table = list(range(num_blocks))  # block i holds positions [i * block_size, (i + 1) * block_size)
    for start in range(0, len(prompt), chunk):
        n = min(chunk, len(prompt) - start)
        meta = ops.build_attention_metadata(block_size, list(range(start, start + n)), [], [],
                                            [(0, n, start + n, table)], c.sliding_window)
        hidden = model.forward(torch.tensor(prompt[start:start + n]), torch.arange(start, start + n), cache, meta)
    out = [int(model.logits(hidden[-1:]).argmax())]
    for p in range(len(prompt), len(prompt) + max_new_tokens - 1):
        meta = ops.build_attention_metadata(block_size, [p], [table], [p + 1], [], c.sliding_window)
        hidden = model.forward(torch.tensor(out[-1:]), torch.tensor([p]), cache, meta)
        out.append(int(model.logits(hidden).argmax()))
    return out


def deepened_checkpoint(folder: str, dest: str, extra_layers: int, seed: int = 0) -> str:
    """The checkpoint with extra decoder layers appended whose o_proj and down_proj are zero: the same
    outputs at a higher cost (a target a smaller draft model predicts exactly)."""
    import copy

    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    layers = model.model.layers
    for _ in range(extra_layers):
        layer = copy.deepcopy(layers[len(layers) % len(layers) - 1])
        for name, param in layer.named_parameters():
            with torch.no_grad():
                param.normal_(0.0, 0.05) if param.dim() > 1 else param.uniform_(0.5, 1.5)
        layer.self_attn.o_proj.weight.data.zero_()
        layer.mlp.down_proj.weight.data.zero_()
        layer.self_attn.layer_idx = len(layers)
        layers.append(layer)
    model.config.num_hidden_layers = len(layers)
    if hasattr(model.config, "layer_types") and model.config.layer_types is not None:
        model.config.layer_types = [model.config.layer_types[0]] * len(layers)
    model.save_pretrained(dest)
    bundled_tokenizer().save_pretrained(dest)
    return dest


def perturbed_checkpoint(folder: str, dest: str, scale: float, seed: int = 0) -> str:
    """The checkpoint with seeded noise of `scale` times each weight's spread added: a model that agrees
    with the original on some tokens and not on others (a draft model of partial acceptance)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.add_(torch.randn_like(param) * param.std() * scale)
    model.save_pretrained(dest)
    bundled_tokenizer().save_pretrained(dest)
    return dest


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_model(path: str):
    """transformers' model in float32 from a checkpoint folder or a GGUF file."""
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                    dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def build_lora_adapter(base_folder: str, dest: str, seed: int = 0, rank: int = 8, alpha: int = 16,
                       targets: list[str] | None = None, scale: float = 1.0, **config) -> str:
    """A PEFT LoRA adapter over the checkpoint (a folder or a GGUF file) with random non-zero A and B (B
    is zero in a fresh PEFT adapter: that would test nothing), saved as PEFT saves one."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = hf_model(base_folder)
    lora = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or LORA_TARGETS,
                                           init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * scale / p.shape[-1] ** 0.5)
    lora.save_pretrained(dest)
    return dest


def hf_lora_greedy(base_folder: str, adapter: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers + peft, float32, greedy."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf_model(base_folder), adapter).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False,
                                 min_new_tokens=max_new_tokens, pad_token_id=0)
            out.append(ids[0, len(p):].tolist())
    return out
