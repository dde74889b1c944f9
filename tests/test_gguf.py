"""GGUF dequantization of every float and block format, and the bundled SmolLM2: our model's logits
and a sensible answer."""
import os

import numpy as np
import pytest
import torch

from scalellm import LLM, SamplingParams
from scalellm.model.gguf_file import dequantize
from scalellm.model.loader import default_model_path


@pytest.fixture(scope="module")
def smollm():
    # dequantized, as transformers reads the file (tests/test_quantized.py serves its blocks as stored)
    return LLM(dtype="float32", quantization="none")


def test_dequantization_matches_gguf_reference():
    import gguf

    reader = gguf.GGUFReader(default_model_path())
    seen = set()
    for tensor in reader.tensors:
        name = tensor.tensor_type.name
        if name in seen:
            continue
        seen.add(name)
        ours = dequantize(tensor)
        ref = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        assert tuple(ours.shape) == tuple(int(x) for x in reversed(tensor.shape.tolist()))
        np.testing.assert_array_equal(ours.numpy().reshape(-1), np.asarray(ref, dtype=np.float32).reshape(-1))
    assert {"Q4_1", "Q8_0", "F32"} <= seen


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_dequantization_of_each_block_format(qtype):
    import gguf

    from scalellm.model.gguf_file import BLOCK_FORMATS

    t = getattr(gguf.GGMLQuantizationType, qtype)
    rng = np.random.default_rng(0)
    values = rng.standard_normal((8, 64)).astype(np.float32)
    packed = gguf.quants.quantize(values, t)
    ref = gguf.quants.dequantize(packed, t)
    block_bytes, fn = BLOCK_FORMATS[int(t)]
    ours = fn(packed.reshape(-1).view(np.uint8).reshape(-1, block_bytes)).reshape(ref.shape)
    np.testing.assert_array_equal(ours, ref)


def test_logits_match_transformers_reading_the_same_gguf(smollm):
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32)
    ids = smollm.tokenizer.encode("The quick brown fox jumps over the lazy dog because")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1]
    out = smollm.generate([ids], SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0].outputs[0]
    ref_lp = torch.log_softmax(ref, -1)
    assert out.token_ids[0] == int(ref.argmax())
    for token, lp in out.logprobs[0].top:
        assert abs(lp - ref_lp[token].item()) < 1e-3


def test_chat_answers_paris(smollm):
    out = smollm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0, max_tokens=16))
    assert "Paris" in out[0].outputs[0].text
    assert out[0].outputs[0].finish_reason == "stop"


def test_default_dtype_answers_paris_too():
    llm = LLM()  # auto dtype: float32 on CPU for weights served in their blocks
    assert llm.engine.loaded.dtype == torch.float32
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=16))
    assert "Paris" in out[0].outputs[0].text


def test_float_formats_dequantize_exactly(tmp_path):
    """F32, F16 and BF16 tensors written with the gguf package's own writer: our values and
    [rows, cols] shapes must equal the package's dequantization, special values included."""
    import gguf

    rng = np.random.default_rng(1)
    values = (rng.standard_normal((6, 40)) * np.logspace(-6, 4, 40)).astype(np.float32)
    values[0, :6] = [0.0, -0.0, np.inf, -np.inf, 1e-7, 65504.0]
    path = str(tmp_path / "floats.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("f32", values)
    writer.add_tensor("f16", values.astype(np.float16))
    writer.add_tensor("bf16", gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16),
                      raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert {t.tensor_type.name for t in tensors.values()} == {"F32", "F16", "BF16"}
    for name, tensor in tensors.items():
        ours = dequantize(tensor)
        ref = np.asarray(gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type), dtype=np.float32)
        assert tuple(ours.shape) == values.shape, name
        np.testing.assert_array_equal(ours.numpy(), ref.reshape(values.shape), err_msg=name)
    np.testing.assert_array_equal(dequantize(tensors["f32"]).numpy(), values)
    rounded, finite = dequantize(tensors["bf16"]).numpy(), np.isfinite(values)
    assert np.array_equal(rounded[~finite], values[~finite])
    assert np.all(np.abs(rounded[finite] - values[finite]) <= np.abs(values[finite]) * 2 ** -8)  # 8 mantissa bits
