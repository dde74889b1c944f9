"""Multi-LoRA: PEFT adapters token-identical to transformers + peft in float32, alone and batched with
other adapters and the base model (both LoRA kernels), prefix-cache keys per adapter, adapters refused
at load, over a quantized base, and on the CUDA kernels' host build."""
import json
import os
import shutil

import pytest
import torch

from scalellm import LLM, LoRARequest, SamplingParams, ops
from scalellm.ops.cuda import host as cuda_host
from tests.checkpoints import build_lora_adapter, hf_lora_greedy
from tests.cuda_kernel_checks import host

PROMPTS = [list(range(5 + 3 * i, 25 + 3 * i)) for i in range(5)]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(llama_folder, tmp_path_factory):
    """Four adapters: ranks 4 and 8, all seven projections, or (the last) attention only."""
    root = tmp_path_factory.mktemp("loras")
    out = []
    for i in range(4):
        targets = ["q_proj", "v_proj", "o_proj"] if i == 3 else None
        out.append(build_lora_adapter(llama_folder, str(root / f"a{i}"), seed=i, rank=4 + 4 * (i % 2), targets=targets))
    return out


@pytest.fixture(scope="module")
def references(llama_folder, adapters):
    return [hf_lora_greedy(llama_folder, a, [p], 8)[0] for a, p in zip(adapters, PROMPTS)]


def requests(adapters) -> list[LoRARequest]:
    return [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(adapters)]


@pytest.mark.parametrize("kernel", ["batched", "grouped"])
def test_mixed_batch_matches_transformers_peft(llama_folder, adapters, references, kernel):
    llm = LLM(llama_folder, dtype="float32", block_size=16, enable_lora=True, max_loras=4, lora_kernel=kernel)
    loras = requests(adapters)
    base_alone = llm.generate([PROMPTS[4]], GREEDY)[0].outputs[0].token_ids
    mixed = llm.generate(PROMPTS, GREEDY, lora_request=loras + [None])
    for i in range(4):
        assert mixed[i].outputs[0].token_ids == references[i], i
        alone = llm.generate([PROMPTS[i]], GREEDY, lora_request=loras[i])[0].outputs[0].token_ids
        assert alone == references[i], i
    assert mixed[4].outputs[0].token_ids == base_alone
    base_on_adapter_prompts = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:4], GREEDY)]
    assert base_on_adapter_prompts != references  # the adapters change the output


def test_fewer_slots_than_adapters(llama_folder, adapters, references):
    """max_loras=2 with four adapters in flight: the scheduler admits two adapters at a time; with
    max_cpu_loras=2 the others are read again from disk when their turn comes."""
    llm = LLM(llama_folder, dtype="float32", block_size=16, enable_lora=True, max_loras=2, max_cpu_loras=2)
    loras = requests(adapters)
    outs = llm.generate(PROMPTS[:4] * 2, GREEDY, lora_request=loras * 2)
    assert [o.outputs[0].token_ids for o in outs] == references * 2


def test_prefix_cache_keys_include_the_adapter(llama_folder, adapters, references):
    llm = LLM(llama_folder, dtype="float32", block_size=16, enable_lora=True, max_loras=2)
    lora = requests(adapters)[0]
    base = llm.generate([PROMPTS[0]], GREEDY)[0]
    with_adapter = llm.generate([PROMPTS[0]], GREEDY, lora_request=lora)[0]
    assert with_adapter.num_cached_tokens == 0 and with_adapter.outputs[0].token_ids == references[0]
    again = llm.generate([PROMPTS[0]], GREEDY, lora_request=lora)[0]
    assert again.num_cached_tokens == 16 and again.outputs[0].token_ids == references[0]
    base_again = llm.generate([PROMPTS[0]], GREEDY)[0]
    assert base_again.num_cached_tokens == 16 and base_again.outputs[0].token_ids == base.outputs[0].token_ids


def test_adapters_refused_at_load(llama_folder, adapters, tmp_path):
    llm = LLM(llama_folder, dtype="float32", block_size=16, enable_lora=True, max_lora_rank=4)

    def variant(name: str, config: dict | None = None, rank: int = 4, **kw) -> str:
        path = build_lora_adapter(llama_folder, str(tmp_path / name), rank=rank, **kw)
        if config:
            with open(os.path.join(path, "adapter_config.json")) as f:
                settings = json.load(f)
            settings.update(config)
            with open(os.path.join(path, "adapter_config.json"), "w") as f:
                json.dump(settings, f)
        return path

    cases = [(adapters[1], "rank 8 is above the maximum 4"),
             (variant("dora", {"use_dora": True}), "DoRA"),
             (variant("head", targets=["q_proj", "lm_head"]), "lm_head"),
             (variant("embed", targets=["embed_tokens"]), "embed_tokens"),
             (variant("save", {"modules_to_save": ["lm_head"]}), "modules_to_save"),
             (str(tmp_path / "missing"), "adapter_config.json does not exist")]
    for i, (path, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            llm.generate([PROMPTS[0]], GREEDY, lora_request=LoRARequest(f"bad{i}", i + 1, path))
    broken = variant("broken")
    with open(os.path.join(broken, "adapter_model.safetensors"), "wb") as f:
        f.write(b"not safetensors")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        llm.generate([PROMPTS[0]], GREEDY, lora_request=LoRARequest("broken", 9, broken))
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        LLM(llama_folder, dtype="float32").generate([PROMPTS[0]], GREEDY, lora_request=requests(adapters)[0])
    assert llm.generate([PROMPTS[0]], GREEDY)[0].outputs[0].token_ids  # the engine still serves


def test_adapter_for_another_model_is_refused(llama_folder, tmp_path):
    from tests.checkpoints import build_checkpoint

    other = build_checkpoint("qwen3", str(tmp_path / "qwen3"))  # head_dim 32: other projection shapes
    path = build_lora_adapter(other, str(tmp_path / "qwen3-lora"), rank=4)
    llm = LLM(llama_folder, dtype="float32", block_size=16, enable_lora=True)
    with pytest.raises(ValueError, match="this model needs A"):
        llm.generate([PROMPTS[0]], GREEDY, lora_request=LoRARequest("other", 1, path))


def test_lora_over_a_quantized_base(llama_folder, adapters, tmp_path):
    """Dense adapters on a Q8_0 base: the same prompt logprobs as the adapter over a float checkpoint
    holding the Q8_0 weights' values, and far from the quantized base without the adapter."""
    from safetensors.torch import load_file, save_file

    from scalellm.ops import QuantizedTensor

    rounded = str(tmp_path / "q8-values")
    shutil.copytree(llama_folder, rounded)
    weights = load_file(os.path.join(llama_folder, "model.safetensors"))
    for name, t in weights.items():
        if t.dim() == 2 and ("_proj" in name or "embed" in name or "lm_head" in name):
            weights[name] = QuantizedTensor.quantize(t.float(), "q8_0").dequantize(torch.float32).contiguous()
    save_file(weights, os.path.join(rounded, "model.safetensors"))
    scored = SamplingParams(max_tokens=0, prompt_logprobs=0)
    lora = requests(adapters)[1]

    def logprobs(llm, **kw):
        out = llm.generate([PROMPTS[1]], scored, **kw)[0].prompt_logprobs[1:]
        return torch.tensor([x.logprob for x in out])
    q8 = LLM(llama_folder, dtype="float32", quantization="q8_0", block_size=16, enable_lora=True)
    same_values = LLM(rounded, dtype="float32", block_size=16, enable_lora=True)
    near = (logprobs(q8, lora_request=lora) - logprobs(same_values, lora_request=lora)).abs().max()
    effect = (logprobs(q8, lora_request=lora) - logprobs(q8)).abs().max()
    assert near < 1e-3 and effect > 1, (near, effect)


@host
def test_mixed_batch_on_host_built_cuda_kernels(adapters, references, llama_folder, tmp_path):
    """The same batch through the CUDA kernels (attention, sampling) run by their host build."""
    from tests.test_speculative_cuda import build_checkpoint

    wide = build_checkpoint("llama", str(tmp_path / "wide"), seed=5, hidden_size=256, head_dim=64)
    paths = [build_lora_adapter(wide, str(tmp_path / f"w{i}"), seed=i, rank=8) for i in range(2)]
    want = [hf_lora_greedy(wide, p, [q], 8)[0] for p, q in zip(paths, PROMPTS)]
    before = cuda_host.launch_counts.copy()
    with ops.cuda_kernels_on_cpu():
        llm = LLM(wide, dtype="float32", block_size=16, enable_lora=True, max_loras=2)
        loras = [LoRARequest(f"w{i}", i + 1, p) for i, p in enumerate(paths)]
        outs = llm.generate(PROMPTS[:3], GREEDY, lora_request=loras + [None])
        base = llm.generate([PROMPTS[2]], GREEDY)[0].outputs[0].token_ids
    assert [o.outputs[0].token_ids for o in outs] == want + [base]
    launched = {name.split("::")[1].split("<")[0] for name in cuda_host.launch_counts - before}
    assert {"prefill_attention", "paged_attention_decode"} <= launched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_lora_kernels_agree(dtype, tokens):
    """The numba BGMV kernel, the masked two-GEMM form and the grouped form against a float64 reference,
    tokens of three slots and of the base model (-1) mixed."""
    import numpy as np

    g = torch.Generator().manual_seed(tokens)
    slots, rank, k, out = 3, 12, 96, 160
    x = torch.randn(tokens, k, generator=g).to(dtype)
    a = (torch.randn(slots, rank, k, generator=g) / 10).to(dtype)
    b = (torch.randn(slots, rank, out, generator=g) / 10).to(dtype)
    y0 = torch.randn(tokens, out, generator=g).to(dtype)
    token_slots = np.array([(t % 4) - 1 for t in range(tokens)], np.int64)
    want = y0.double().clone()
    for t, s in enumerate(token_slots):
        if s >= 0:
            want[t] += (x[t].double() @ a[s].double().t()) @ b[s].double()
    tol = 1e-5 if dtype == torch.float32 else 0.05
    got = y0.clone()
    ops.add_lora_bgmv(got, x, a, b, token_slots)
    assert torch.allclose(got.double(), want, atol=tol, rtol=tol)
    mask = torch.from_numpy(token_slots)[:, None] == torch.arange(slots).repeat_interleave(rank)[None, :]
    got = ops.add_lora(y0.clone(), x, a.reshape(slots * rank, k), b.reshape(slots * rank, out), mask.to(dtype))
    assert torch.allclose(got.double(), want, atol=tol, rtol=tol)
    order = np.argsort(token_slots, kind="stable")
    ordered = token_slots[order]
    runs = [(int(s), int(np.searchsorted(ordered, s)), int(np.searchsorted(ordered, s, side="right")))
            for s in np.unique(ordered) if s >= 0]
    got = ops.add_lora_grouped(y0.clone(), x, a, b, torch.from_numpy(order), runs)
    assert torch.allclose(got.double(), want, atol=tol, rtol=tol)
