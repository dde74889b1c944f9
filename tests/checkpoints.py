"""Small checkpoints built in code with fixed seeds: one per supported architecture."""
from __future__ import annotations

import os

import torch

from scalellm.model.loader import default_model_path

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]
_tokenizer = None


def bundled_tokenizer():
    """SmolLM2's byte-level BPE tokenizer (with its chat template), read from the bundled GGUF."""
    global _tokenizer
    if _tokenizer is None:
        from transformers import AutoTokenizer

        path = default_model_path()
        _tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return _tokenizer


def make_config(arch: str):
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
    raise ValueError(arch)


def build_checkpoint(arch: str, folder: str, seed: int = 0, max_shard_size: str | None = None) -> str:
    """Seeded random weights saved as safetensors plus the tokenizer, in float32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_config(arch)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    bundled_tokenizer().save_pretrained(folder)
    return folder


def hf_greedy(folder: str, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
    """transformers' own greedy generate (float32, one prompt at a time) and chosen-token logprobs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
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
