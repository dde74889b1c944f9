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


def smollm2_f32() -> str:
    """The bundled GGUF dequantized to a float32 safetensors folder (bench/scoring.py: our server and
    transformers score the same weights). Built beside and renamed into place, so an interrupted build
    never leaves a folder that looks complete."""
    folder = os.path.join(CACHE, "smollm2-135m-instruct-f32")
    if not os.path.exists(os.path.join(folder, "model.safetensors")):
        import shutil

        from scalellm.model.loader import default_model_path
        from tools.convert_gguf import convert

        shutil.rmtree(folder + ".tmp", ignore_errors=True)
        convert(default_model_path(), folder + ".tmp", torch.float32)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(folder + ".tmp", folder)
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


DEEP_EXTRA_LAYERS = 45  # 30 + 45 = 75 decoder layers: 294M parameters against 135M


def smollm2_deep(extra_layers: int = DEEP_EXTRA_LAYERS) -> str:
    """SmolLM2-135M-Instruct (bfloat16, from smollm2_bf16()) with `extra_layers` decoder layers appended
    that compute but change nothing: each has random q/k/v/gate/up weights and norms (fixed seed, each
    tensor scaled like the same tensor of an original layer) and all-zero o_proj and down_proj, so it adds
    exactly 0 to the residual stream and the model's logits are the original's (float32 transformers: max
    abs difference 0.0). A target with the 135M model's tokenizer and outputs at 2.2x its weights (2.25x
    its time per token on ScaleLLM at c=1), for which the 135M model drafts with full agreement
    (bench/speculative.py --draft)."""
    folder = os.path.join(CACHE, f"smollm2-135m-deep{30 + extra_layers}-bf16")
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    small = smollm2_bf16()
    with open(os.path.join(small, "config.json")) as f:
        config = json.load(f)
    n = config["num_hidden_layers"]
    tensors = load_file(os.path.join(small, "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    zeroed = ("self_attn.o_proj.weight", "mlp.down_proj.weight")
    for i in range(n, n + extra_layers):
        src = f"model.layers.{(i - n) % n}."
        for key in [k for k in tensors if k.startswith(src)]:
            part = key[len(src):]
            like = tensors[key].float()
            if part in zeroed:
                new = torch.zeros_like(like)
            elif part.endswith("norm.weight"):
                new = like.mean() + like.std() * torch.randn(like.shape, generator=gen)
            else:
                new = like.std() * torch.randn(like.shape, generator=gen)
            tensors[f"model.layers.{i}.{part}"] = new.to(torch.bfloat16).contiguous()
    os.makedirs(folder + ".tmp", exist_ok=True)
    save_file(tensors, os.path.join(folder + ".tmp", "model.safetensors"), metadata={"format": "pt"})
    config["num_hidden_layers"] = n + extra_layers
    with open(os.path.join(folder + ".tmp", "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in os.listdir(small):
        if name not in ("model.safetensors", "config.json"):
            shutil.copy(os.path.join(small, name), os.path.join(folder + ".tmp", name))
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(folder + ".tmp", folder)
    return folder


DEFAULT_KV_GIB = 2  # KV space (GiB) for both servers in the serving benchmark
KV_CACHE_GIB = {"smollm2-1.7b-shape": 4}  # where 2 GiB would not hold 64 x 256 tokens
MODELS = {"smollm2-135m": smollm2_bf16, "tiny-llama": tiny_llama, "smollm2-1.7b-shape": smollm2_1_7b_shape,
          "smollm2-135m-deep": smollm2_deep}

if __name__ == "__main__":
    for name, build in MODELS.items():
        print(name, build())
