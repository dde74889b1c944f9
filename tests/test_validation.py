"""Bad input to the offline API: a ValueError that names the problem."""
import json
import os
import shutil

import pytest

from scalellm import LLM, SamplingParams


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 0, "n": 2}, "n"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"n": 0}, "n"),
    ({"logprobs": 50}, "logprobs"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"stop": [""]}, "stop"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts(llama_llm):
    with pytest.raises(ValueError, match="prompt"):
        llama_llm.generate([""], SamplingParams())
    with pytest.raises(ValueError, match="prompt"):
        llama_llm.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        llama_llm.generate([[1, 2, 49152]], SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        llama_llm.generate([[-1]], SamplingParams())
    with pytest.raises(ValueError, match="context length"):
        llama_llm.generate([[5] * 1024], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="max_tokens"):
        llama_llm.generate([[5] * 1000], SamplingParams(max_tokens=100))
    assert llama_llm.engine.block_manager.num_used_blocks == 0
    assert not llama_llm.engine.requests  # a rejected batch leaves nothing behind


def test_bad_chat_messages(llama_llm):
    with pytest.raises(ValueError, match="messages"):
        llama_llm.chat([], SamplingParams())
    with pytest.raises(ValueError, match="role"):
        llama_llm.chat([{"role": "wizard", "content": "hi"}], SamplingParams())


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture(llama_folder, tmp_path):
    folder = _copy(llama_folder, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    cfg["model_type"] = "gpt_neox"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture"):
        LLM(str(folder), dtype="float32")


def test_missing_files(llama_folder, tmp_path):
    with pytest.raises(ValueError, match="model not found: .*nothing is downloaded"):
        LLM(str(tmp_path / "nowhere"))
    folder = _copy(llama_folder, tmp_path / "m")
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match="safetensors"):
        LLM(str(folder), dtype="float32")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(empty))


def test_shape_mismatch(llama_folder, tmp_path):
    folder = _copy(llama_folder, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatch for model.layers.0.mlp"):
        LLM(str(folder), dtype="float32")


def test_corrupt_weights(llama_folder, tmp_path):
    folder = _copy(llama_folder, tmp_path / "m")
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt"):
        LLM(str(folder), dtype="float32")


def test_corrupt_gguf(tmp_path):
    from scalellm.model.loader import default_model_path

    bad = tmp_path / "bad.gguf"
    with open(default_model_path(), "rb") as f:
        bad.write_bytes(f.read(1 << 16))
    with pytest.raises(ValueError, match="bad.gguf"):
        LLM(str(bad))


def test_float16_is_reserved_for_cuda(llama_folder):
    with pytest.raises(ValueError, match="float16"):
        LLM(llama_folder, dtype="float16")
