"""Mixture-of-experts models (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE with a dense layer
and renormalized routing), built in code with fixed seeds and several experts per token: greedy output
token-identical with transformers in float32 under staggered arrivals (logprobs within 1e-4) and under
preemption; a GGUF written with llama.cpp's stacked expert tensors loads and matches; the server
streams a chat from an MoE checkpoint."""
import json
import os

import numpy as np
import pytest
import torch

from scalellm import LLM
from scalellm.model.loader import load_model
from scalellm.ops.linear import PACK_BATCH_HINT
from tests import test_correctness as scenarios
from tests.checkpoints import MOE_ARCHS, build_checkpoint, hf_prompt_logits, prompt_logits
from tests.test_gguf_checkpoints import gguf_name, gguf_writer, interleave_rotary_halves

GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
EXPERT_NAMES = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
SHARED_NAMES = {"shared_expert.gate_proj": "ffn_gate_shexp", "shared_expert.up_proj": "ffn_up_shexp",
                "shared_expert.down_proj": "ffn_down_shexp", "shared_expert_gate": "ffn_gate_inp_shexp"}


@pytest.fixture(scope="module", params=MOE_ARCHS)
def moe_checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    return request.param, build_checkpoint(request.param, str(folder), seed=11)


def test_moe_checkpoint_loads_as_built(moe_checkpoint):
    arch, folder = moe_checkpoint
    c = load_model(folder, "float32").config
    assert c.num_experts in (4, 6, 8) and c.num_experts_per_tok >= 2
    expected = {"mixtral": (True, True), "qwen2_moe": (True, True), "qwen3_moe": (True, False, True)}[arch]
    assert c.sparse_layers == expected
    assert c.norm_topk_prob == (arch != "qwen2_moe")
    assert bool(c.shared_expert_intermediate_size) == (arch == "qwen2_moe")


def test_moe_staggered_arrivals_match_transformers(moe_checkpoint):
    scenarios.test_staggered_arrivals_match_transformers(moe_checkpoint)


def test_moe_preemption_keeps_output_identical(moe_checkpoint):
    scenarios.test_preemption_keeps_output_identical(moe_checkpoint)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_layer_matches_a_float64_reference(dtype):
    """The CPU layer (torch: sort, per-expert GEMMs, index_add) on the same cases as the CUDA kernels'."""
    from scalellm import ops
    from tests.cuda_kernel_checks import check_moe

    with ops.cuda_kernels_on_cpu(False):
        check_moe(dtype)


def test_each_expert_matters(moe_checkpoint):
    """Zeroing one expert's down projection changes the logits: every expert is loaded and used."""
    arch, folder = moe_checkpoint
    model = load_model(folder, "float32").model
    prompt = list(range(200, 260))
    base = prompt_logits(model, prompt)
    layer = next(w for w in model.layers if w.moe is not None)
    for lin in layer.moe.down:
        saved = lin.weight.clone()
        for weight in (torch.zeros_like(saved), saved):  # zeroed, then restored
            lin.weight.copy_(weight)
            if lin.packed is not None:
                lin.packed = torch.ops.mkldnn._reorder_linear_weight(lin.weight, PACK_BATCH_HINT)
            if weight is not saved:
                assert not torch.allclose(prompt_logits(model, prompt), base), "an expert that changes nothing"


def write_moe_gguf(folder: str, path: str) -> str:
    """A float32 GGUF in llama.cpp's MoE layout: router ffn_gate_inp, experts stacked [experts, out, in]."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    arch = GGUF_ARCH[cfg["model_type"]]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf_writer(path, arch, cfg, head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_expert_count(cfg.get("num_local_experts") or cfg["num_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if "moe_intermediate_size" in cfg:
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if cfg.get("shared_expert_intermediate_size"):
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, t in tensors.items():
        x = t.float().numpy()
        parts = name.split(".")
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            x = interleave_rotary_halves(x, heads if "q_proj" in name else kv_heads)
        if ".experts." in name:  # model.layers.N.{mlp|block_sparse_moe}.experts.E.PROJ.weight
            proj = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.get(parts[6], parts[6])
            experts.setdefault((parts[2], proj), {})[int(parts[5])] = x
        elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
            w.add_tensor(f"blk.{parts[2]}.ffn_gate_inp.weight", np.ascontiguousarray(x))
        elif ".shared_expert" in name:
            key = ".".join(parts[4:-1])
            w.add_tensor(f"blk.{parts[2]}.{SHARED_NAMES[key]}.weight", np.ascontiguousarray(x.reshape(-1) if
                         key == "shared_expert_gate" else x))
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            w.add_tensor(f"blk.{parts[2]}.attn_{parts[4][0]}_norm.weight", x)
        else:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(x))
    for (layer, proj), by_expert in sorted(experts.items()):
        w.add_tensor(f"blk.{layer}.{EXPERT_NAMES[proj]}.weight", np.stack([by_expert[e] for e in sorted(by_expert)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# llama.cpp's qwen2moe/qwen3moe have experts in every layer: the GGUF checkpoints keep them all sparse
GGUF_OVERRIDES = {"mixtral": {}, "qwen2_moe": {}, "qwen3_moe": {"mlp_only_layers": []}}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_gguf_matches_the_folder(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = build_checkpoint(arch, str(tmp_path / "hf"), seed=13, **GGUF_OVERRIDES[arch])
    path = write_moe_gguf(folder, str(tmp_path / f"tiny-{arch}.gguf"))
    from_gguf = load_model(path, "float32")
    from_folder = load_model(folder, "float32")
    assert from_gguf.config.architecture == from_folder.config.architecture
    assert from_gguf.config.sparse_layers == from_folder.config.sparse_layers
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for prompt in ([1, 504, 3250, 6789, 42, 17], list(range(300, 340))):
        ours = prompt_logits(from_gguf.model, prompt)
        torch.testing.assert_close(ours, prompt_logits(from_folder.model, prompt), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours, hf_prompt_logits(hf, prompt), atol=2e-4, rtol=1e-4)


def test_the_server_streams_a_chat_from_an_moe_checkpoint(tmp_path):
    from openai import OpenAI

    from tests.server_utils import ServerProcess

    folder = build_checkpoint("qwen3_moe", str(tmp_path / "moe"), seed=17)
    with ServerProcess("--model", folder, "--dtype", "float32", "--served-model-name", "tiny-moe") as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="none")
        stream = client.chat.completions.create(model="tiny-moe", stream=True, max_tokens=12,
                                                messages=[{"role": "user", "content": "Hello, experts"}])
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 3 and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_llm_generates_from_an_moe_checkpoint(moe_checkpoint):
    from scalellm import SamplingParams

    llm = LLM(moe_checkpoint[1], dtype="float32")
    out = llm.generate(["Mixture of experts"], SamplingParams(temperature=0.8, seed=1, max_tokens=8, n=2))
    assert len(out[0].outputs) == 2 and all(len(o.token_ids) == 8 for o in out[0].outputs)
