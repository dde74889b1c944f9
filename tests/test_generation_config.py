"""generation_config.json may list end-of-sequence ids that config.json does not: generation must
stop at them too (Llama 3 instruct models end turns with <|eot_id|> this way)."""
import json
import os
import shutil

import pytest

from scalellm import LLM, SamplingParams

PROMPT = [1, 504, 3250, 6789, 42, 17]


def checkpoint_with_generation_config(source: str, folder: str, generation_config: dict) -> str:
    os.makedirs(folder)
    for name in os.listdir(source):
        src = os.path.join(source, name)
        if name.endswith(".safetensors"):
            os.symlink(src, os.path.join(folder, name))
        elif name != "generation_config.json":
            shutil.copy(src, folder)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump(generation_config, f)
    return folder


@pytest.mark.parametrize("form", ["list", "int"])
def test_generation_config_eos_ids_stop_generation(llama_llm, llama_folder, tmp_path, form):
    full = llama_llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    tokens = full.outputs[0].token_ids
    with open(os.path.join(llama_folder, "config.json")) as f:
        config_eos = json.load(f)["eos_token_id"]
    extra = next(t for t in tokens[4:] if t != config_eos and t not in PROMPT)
    first = tokens.index(extra)
    eos = [config_eos, extra] if form == "list" else extra
    folder = checkpoint_with_generation_config(llama_folder, str(tmp_path / "ckpt"), {"bos_token_id": 1,
                                                                                     "eos_token_id": eos})
    llm = LLM(folder, dtype="float32")
    assert extra in llm.engine.eos_token_ids and config_eos in llm.engine.eos_token_ids
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert out.token_ids == tokens[:first + 1]
    assert out.finish_reason == "stop"
    ignored = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    assert ignored.token_ids == tokens and ignored.finish_reason == "length"
