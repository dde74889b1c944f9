"""Convert a GGUF checkpoint to a Hugging Face folder (config, safetensors, tokenizer).

Benchmarks use it so that every system loads the same dequantized weights:

    .venv/bin/python tools/convert_gguf.py [GGUF] OUT_DIR [--dtype bfloat16]

With no GGUF path the bundled SmolLM2 model is converted.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scalellm.model.config import model_config_from_hf  # noqa: E402
from scalellm.model.gguf_file import iter_gguf_weights  # noqa: E402
from scalellm.model.loader import default_model_path  # noqa: E402


def convert(gguf_path: str, out_dir: str, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    folder, name = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    hf_config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config = model_config_from_hf(hf_config)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tensors = {n: w.to(dtype).contiguous() for n, w in
               iter_gguf_weights(gguf_path, config.num_heads, config.num_kv_heads, config.architecture)}
    if hf_config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    hf_config.architectures = [config.architecture]
    hf_config.dtype = dtype
    hf_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    eos = sorted(set(config.eos_token_ids) | {tokenizer.eos_token_id})
    GenerationConfig(bos_token_id=hf_config.bos_token_id, eos_token_id=eos[0] if len(eos) == 1 else eos
                     ).save_pretrained(out_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="[GGUF] OUT_DIR")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    args = ap.parse_args()
    gguf_path, out_dir = (args.paths if len(args.paths) == 2 else [default_model_path(), args.paths[0]])
    convert(gguf_path, out_dir, getattr(torch, args.dtype))
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main()
