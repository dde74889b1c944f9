"""GGUF files other than the bundled one: test checkpoints written out in llama.cpp's conventions
(tensor names, Q/K rows interleaved per rotary pair for Llama), read back by ScaleLLM and by
tools/convert_gguf.py, and compared with transformers on the source checkpoint."""
import glob
import json
import os

import numpy as np
import pytest
import torch

from scalellm import LLM, SamplingParams
from scalellm.model.loader import default_model_path, load_model
from tests.checkpoints import build_checkpoint, hf_greedy, hf_prompt_logits, prompt_logits
from tools.convert_gguf import convert

GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
PROMPTS = [[1, 504, 3250, 6789, 42, 17], [9000, 3, 77, 12345, 640, 2048, 5, 881, 19, 30000, 4]]


def gguf_name(hf_name: str) -> str:
    base, kind = hf_name.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, layer, part = base.split(".", 3)
        return f"blk.{layer}.{LAYER_NAMES[part]}.{kind}"
    return f"{GLOBAL_NAMES[base]}.{kind}"


def interleave_rotary_halves(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter stores each head's Q/K rows as (x0, x_half, x1, x_half+1, ...) pairs
    instead of transformers' two halves; the loader must undo it."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_writer(path: str, arch: str, cfg: dict, head_dim: int):
    """A GGUFWriter with a test checkpoint's model metadata and the bundled model's tokenizer."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(float(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta")))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    # $SCALELLM_TEST_TOKENIZER_GGUF: a GGUF holding those fields, where the bundled package is not installed
    source = os.environ.get("SCALELLM_TEST_TOKENIZER_GGUF") or default_model_path()
    for key, field in gguf.GGUFReader(source).fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    return writer


def write_gguf(folder: str, path: str, formats=None) -> str:
    """A float32 GGUF of a test checkpoint, with the bundled model's tokenizer metadata; formats(gguf name)
    may name a block format (q8_0, q4_0, q4_1) to store that tensor in, quantized by the gguf package."""
    import gguf
    from safetensors.torch import load_file

    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    arch = cfg["model_type"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = gguf_writer(path, arch, cfg, cfg["hidden_size"] // heads)
    tensors = {}
    for shard in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        tensors.update(load_file(shard))
    for name, t in tensors.items():
        w = t.float().numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = interleave_rotary_halves(w, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            w = interleave_rotary_halves(w, kv_heads)
        fmt = formats(gguf_name(name)) if formats and w.ndim == 2 else None
        if fmt:
            qtype = gguf.GGMLQuantizationType[fmt.upper()]
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(np.ascontiguousarray(w), qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


_made: dict[str, tuple[str, str, LLM]] = {}


def gguf_model(arch: str, tmp_path_factory) -> tuple[str, str, LLM]:
    """(source folder, GGUF path, ScaleLLM on the GGUF), made once per module: reading a GGUF's
    tokenizer takes seconds. llama has Q/K interleaved and an untied head; qwen2 has biases and a
    tied head."""
    if arch not in _made:
        root = tmp_path_factory.mktemp(f"gguf-{arch}")
        folder = build_checkpoint(arch, str(root / "hf"), seed=3)
        path = write_gguf(folder, str(root / f"tiny-{arch}.gguf"))
        _made[arch] = folder, path, LLM(path, dtype="float32")
    return _made[arch]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_model_matches_transformers_on_the_source_checkpoint(arch, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder, path, llm = gguf_model(arch, tmp_path_factory)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for prompt in PROMPTS:
        torch.testing.assert_close(prompt_logits(llm.engine.loaded.model, prompt), hf_prompt_logits(hf, prompt),
                                   atol=2e-4, rtol=1e-4)
    expected, _ = hf_greedy(folder, PROMPTS, 16)
    out = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in out] == expected


def test_convert_gguf_writes_the_source_checkpoint_back(tmp_path_factory, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder, path, llm = gguf_model("llama", tmp_path_factory)
    out = str(tmp_path / "converted")
    convert(path, out, torch.float32)
    source = {}
    for shard in glob.glob(os.path.join(folder, "*.safetensors")):
        source.update(load_file(shard))
    converted = load_file(os.path.join(out, "model.safetensors"))
    assert converted.keys() == source.keys()
    for name, t in source.items():
        assert torch.equal(converted[name], t), name
    # transformers reads the converted folder as the same model
    hf_src = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    hf_out = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for prompt in PROMPTS:
        torch.testing.assert_close(hf_prompt_logits(hf_out, prompt), hf_prompt_logits(hf_src, prompt), atol=0, rtol=0)
    # and so does ScaleLLM, with the eos ids and chat template it reads from the GGUF itself
    ours_gguf, ours_out = llm.engine.loaded, load_model(out, dtype="float32")
    assert ours_out.config.eos_token_ids == ours_gguf.config.eos_token_ids
    assert ours_out.tokenizer.chat_template == ours_gguf.tokenizer.chat_template
    assert ours_out.tokenizer.encode("Hello, world!") == ours_gguf.tokenizer.encode("Hello, world!")
    torch.testing.assert_close(prompt_logits(ours_out.model, PROMPTS[1]), prompt_logits(ours_gguf.model, PROMPTS[1]),
                               atol=0, rtol=0)
