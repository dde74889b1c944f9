"""The two benchmark models, built once into bench/.cache and loaded by every system.

- compute regime: SmolLM2-135M-Instruct, the bundled GGUF dequantized to a bfloat16 safetensors folder;
- overhead regime: a tiny random Llama (hidden 256, 4 layers) with an 8,000-token byte-level BPE
  tokenizer trained on the Python standard library's sources, so the serving layer dominates.
"""
from __future__ import annotations

import glob
import os
import sys
import sysconfig

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(BENCH, ".cache")
sys.path.insert(0, os.path.dirname(BENCH))

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def smollm2_bf16() -> str:
    folder = os.path.join(CACHE, "smollm2-135m-instruct-bf16")
    if not os.path.exists(os.path.join(folder, "model.safetensors")):
        from scalellm.model.loader import default_model_path
        from tools.convert_gguf import convert

        convert(default_model_path(), folder, torch.bfloat16)
    return folder


def _train_tokenizer(vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:400]
    bpe = ByteLevelBPETokenizer()
    bpe.train(files, vocab_size=vocab_size, min_frequency=2, show_progress=False,
              special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def tiny_llama() -> str:
    folder = os.path.join(CACHE, "tiny-llama-256")
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    tok = _train_tokenizer(8000)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).save_pretrained(folder)
    return folder


def smollm2_1_7b_shape() -> str:
    """SmolLM2-1.7B's shapes (hidden 2048, 24 layers of 32 heads, intermediate 8192, tied 49,152-token
    embedding) with random bfloat16 weights and the bundled model's tokenizer: a 1B-class compute load
    (its text is noise; the benchmark ignores EOS)."""
    folder = os.path.join(CACHE, "smollm2-1.7b-shape-bf16")
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    small = smollm2_bf16()
    config = AutoConfig.from_pretrained(small)
    config.update(dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                       num_key_value_heads=32, head_dim=64, rope_parameters={"rope_theta": 130000.0,
                                                                             "rope_type": "default"}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(small).save_pretrained(folder)
    for name in ("generation_config.json", "chat_template.jinja"):
        if os.path.exists(os.path.join(small, name)):
            with open(os.path.join(small, name)) as src, open(os.path.join(folder, name), "w") as dst:
                dst.write(src.read())
    return folder


DEFAULT_KV_GIB = 2  # KV space (GiB) for both servers in the serving benchmark
KV_CACHE_GIB = {"smollm2-1.7b-shape": 4}  # where 2 GiB would not hold 64 x 256 tokens
MODELS = {"smollm2-135m": smollm2_bf16, "tiny-llama": tiny_llama, "smollm2-1.7b-shape": smollm2_1_7b_shape}

if __name__ == "__main__":
    for name, build in MODELS.items():
        print(name, build())
