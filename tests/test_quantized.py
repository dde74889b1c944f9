"""Block-quantized weights (GGUF Q8_0, Q4_0, Q4_1): the format against the gguf package, the GEMMs
against float64 references, the loader's --quantization modes and their memory, and the bundled model
served in its own formats.

Stated tolerances, with S = |x| @ |W|^T (+ |bias| + |residual|) in float64 for each output:
- the quantized GEMM (fewer than DENSE_ROWS rows): |out - ref| <= 1e-5 * S + 1e-6, where ref is the
  float64 product of the dequantized W with x itself (float kernel) or with x quantized to int8 per
  32-element block (int8 kernel: the kernel's own quantized x, checked on its own below);
- the dense path (DENSE_ROWS rows and more) multiplies W dequantized to x's dtype: in float32 the same
  bound; in bfloat16 the weights are rounded to bfloat16, so 2^-8 * S;
- a bfloat16 output adds its own rounding, 2^-8 * |ref|.
"""
import numpy as np
import pytest
import torch

from scalellm import LLM, SamplingParams, ops
from scalellm.config import EngineConfig
from scalellm.ops import QuantizedLinear, QuantizedTensor
from scalellm.ops.quant import cpu as cpu_quant
from scalellm.ops.quant import linear as quant_linear
from scalellm.ops.quant.tensor import GGUF_TYPE_IDS
from tests.checkpoints import build_checkpoint, prompt_logits
from tests.cuda_kernel_checks import gpu, host
from tests.test_gguf_checkpoints import write_gguf

FORMATS = ["q8_0", "q4_0", "q4_1"]
KERNELS = [False, True] if cpu_quant.INT8 else [False]  # int8 needs AVX512-VNNI
SHAPES = [(1, 32), (7, 64), (33, 160), (300, 576), (1100, 96)]  # (out, in): odd block counts, serial and parallel
ROWS = [1, 2, 3, 4, 5, 6, 9, 17, 31]


def _weight(fmt: str, n: int, k: int, seed: int) -> QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, ::7] *= 4  # blocks with a spread of scales
    return QuantizedTensor.quantize(w, fmt)


def _quantized_x(x: np.ndarray) -> np.ndarray:
    """x as the int8 kernel sees it: quantized by the kernel's own routine, then dequantized in float64."""
    rows, k = x.shape
    xq, xd, xo = (np.empty((rows, k), np.uint8), np.empty((rows, k // 32), np.float32),
                  np.empty((rows, k // 32), np.float32))
    cpu_quant.quantize_activations(x, cpu_quant.SIGNED, xq, xd, xo)
    q = xq.view(np.int8).astype(np.float64).reshape(rows, k // 32, 32)
    return (q * xd.astype(np.float64)[..., None]).reshape(rows, k)


@pytest.mark.parametrize("fmt", FORMATS)
def test_blocks_round_trip_and_dequantize_as_the_gguf_package_does(fmt):
    import gguf

    w = torch.randn(6, 96, generator=torch.Generator().manual_seed(0)) * 0.1
    raw = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType(GGUF_TYPE_IDS[fmt]))
    qt = QuantizedTensor.from_gguf_blocks(fmt, raw, (6, 96))
    assert np.array_equal(qt.to_gguf_blocks(), raw.reshape(6, -1))
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(GGUF_TYPE_IDS[fmt]))
    assert torch.equal(qt.dequantize(), torch.from_numpy(expected.reshape(6, 96)))
    step = qt.d.float().abs().repeat_interleave(32, dim=1)  # one quantization step per element
    # half a step, plus the float16 rounding of the stored scale times |q| (at most 127 * 2^-11 steps);
    # Q4_0 maps the block's largest magnitude to -8 steps, so the other side clips at +7: one step there
    bound = 1.07 if fmt == "q4_0" else 0.57
    assert ((qt.dequantize() - w).abs() <= step * bound + 1e-7).all()
    assert qt.nbytes == raw.nbytes  # held in the file's bytes


def test_row_operations_move_whole_blocks():
    a, b = _weight("q4_1", 4, 64, 1), _weight("q4_1", 2, 64, 2)
    both = QuantizedTensor.cat([a, b])
    assert torch.equal(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    order = torch.tensor([5, 0, 3, 1, 4, 2])
    assert torch.equal(both.rows(order).dequantize(), both.dequantize()[order])
    flip = both.reshape_rows(lambda t: t.flip(0))
    assert torch.equal(flip.dequantize(), both.dequantize().flip(0))
    with pytest.raises(ValueError):
        QuantizedTensor.cat([a, _weight("q8_0", 2, 64, 3)])


def _check_gemm(qt: QuantizedTensor, gemm, int8: bool) -> None:
    """gemm(x, bias, residual, out, col0) against the float64 product, for each of ROWS rows, with and
    without bias and residual."""
    n, k = qt.shape
    w64 = qt.dequantize().double().numpy()
    for rows in ROWS:
        x = (torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 2).numpy()
        bias = np.random.default_rng(rows).standard_normal(n).astype(np.float32) if rows % 2 else None
        residual = np.random.default_rng(k).standard_normal((rows, n + 3)).astype(np.float32) if rows % 3 else None
        out = np.full((rows, n + 3), 7.0, np.float32)  # written at columns 2 .. n + 1 only
        gemm(x, np.zeros(0, np.float32) if bias is None else bias,
             np.zeros((0, 0), np.float32) if residual is None else residual, out, 2)
        x64 = _quantized_x(x) if int8 else x.astype(np.float64)
        ref, scale = x64 @ w64.T, np.abs(x64) @ np.abs(w64).T
        if bias is not None:
            ref, scale = ref + bias, scale + np.abs(bias)
        if residual is not None:
            ref, scale = ref + residual[:, 2:n + 2], scale + np.abs(residual[:, 2:n + 2])
        err = np.abs(out[:, 2:n + 2] - ref)
        assert (err <= 1e-5 * scale + 1e-6).all(), (n, k, rows, float(err.max()))
        assert (out[:, :2] == 7).all() and (out[:, n + 2:] == 7).all()


@pytest.mark.parametrize("int8", KERNELS, ids=lambda v: "int8" if v else "float")
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_gemm_matches_float64_reference(fmt, int8):
    for i, (n, k) in enumerate(SHAPES):
        qt = _weight(fmt, n, k, seed=i)
        fields = quant_linear.numpy_fields(qt)
        _check_gemm(qt, lambda x, bias, residual, out, col0: cpu_quant.quant_gemm(
            fmt, x, *fields, bias, residual, out, col0=col0, int8=int8), int8)


@pytest.mark.skipif(not cpu_quant.INT8, reason="the grouped kernels need AVX512-VNNI")
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_grouped_gemm_matches_float64_reference(fmt):
    """Q8_0 and Q4_0 in groups of 16 rows: the same bytes reordered (it dequantizes to the same weight and
    writes the same file blocks), and its kernel within the int8 kernel's tolerance; serial and parallel
    builds."""
    for i, (n, k) in enumerate([(16, 32), (48, 96), (96, 160), (304, 576), (1104, 96)]):
        qt = _weight(fmt, n, k, seed=i)
        grouped = qt.grouped()
        assert torch.equal(grouped.dequantize(), qt.dequantize()) and grouped.nbytes == qt.nbytes
        assert np.array_equal(grouped.to_gguf_blocks(), qt.to_gguf_blocks())
        qs, d, _ = quant_linear.numpy_fields(grouped)
        _check_gemm(qt, lambda x, bias, residual, out, col0: cpu_quant.grouped_gemm(
            fmt, x, qs, d, bias, residual, out, col0=col0), True)


def test_int8_activations_round_to_the_nearest_step():
    x = (torch.randn(3, 96) * torch.tensor([0.01, 1.0, 100.0])[:, None]).numpy()
    x[1, :32] = 0  # an all-zero block
    xq, xd, xo = np.empty((3, 96), np.uint8), np.empty((3, 3), np.float32), np.empty((3, 3), np.float32)
    cpu_quant.quantize_activations(x, cpu_quant.SIGNED, xq, xd, xo)
    q = xq.view(np.int8).astype(np.float64).reshape(3, 3, 32)
    amax = np.abs(x.reshape(3, 3, 32)).max(-1)
    np.testing.assert_allclose(xd, amax / 127, rtol=1e-6)
    assert np.abs(q).max() == 127
    scale = np.where(xd > 0, xd, 1)[..., None]
    assert (np.abs(q - x.reshape(3, 3, 32) / scale) <= 0.5 + 1e-4).all()
    np.testing.assert_allclose(xo, xd * q.sum(-1), rtol=1e-6)
    biased = np.empty_like(xq)
    cpu_quant.quantize_activations(x, cpu_quant.BIASED, biased, xd, xo)  # Q8_0's unsigned form: q + 128
    assert np.array_equal(biased.astype(np.int64) - 128, q.reshape(3, 96))
    again = np.empty_like(xq)
    cpu_quant.quantize_activations(x, cpu_quant.SIGNED_SUM, again, xd, xo)  # grouped Q8_0's: the sums alone
    assert np.array_equal(again, xq) and np.array_equal(xo, q.sum(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [200, 208])  # Q8_0/Q4_0 with 208 rows are held in groups of 16 where the int8 kernel runs
def test_quantized_linear_both_paths_and_dtypes(fmt, dtype, n, monkeypatch):
    monkeypatch.setattr(quant_linear, "SLAB_ELEMENTS", 64 * 128)  # the dense path in several slabs
    qt = _weight(fmt, n, 128, 5)
    bias = torch.randn(n)
    lin = QuantizedLinear(qt, bias, dtype)
    int8 = quant_linear.uses_int8(dtype)  # bfloat16 activations on the int8 kernel, float32 ones on the float one
    assert lin.weight.group == (16 if fmt != "q4_1" and n % 16 == 0 and int8 and quant_linear.GROUPED else 1)
    w64 = qt.dequantize().double()
    for rows in (1, 3, quant_linear.DENSE_ROWS, quant_linear.DENSE_ROWS + 9):
        x = torch.randn(rows, 128).to(dtype)
        residual = torch.randn(rows, n).to(dtype)
        out = lin(x, residual=residual)
        assert out.dtype == dtype and out.shape == (rows, n)
        dense = rows >= quant_linear.DENSE_ROWS and lin.weight.group == 1  # grouped: the int8 kernel at any size
        xs = x.double() if dense or not int8 else torch.from_numpy(_quantized_x(x.float().numpy()))
        b = lin.bias.double()
        ref = xs @ w64.T + b + residual.double()
        scale = xs.abs() @ w64.abs().T + b.abs() + residual.double().abs()
        tol = (2.0 ** -8 if dense and dtype == torch.bfloat16 else 1e-5) * scale + 1e-6
        if dtype == torch.bfloat16:
            tol = tol + 2.0 ** -8 * ref.abs()
        assert ((out.double() - ref).abs() <= tol).all(), (rows, float((out.double() - ref).abs().max()))


@pytest.mark.parametrize("int8", KERNELS, ids=lambda v: "int8" if v else "float")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_prologue_in_the_gemm_equals_the_op_before_it(fmt, dtype, int8, monkeypatch):
    """RMSNorm and SiLU-and-multiply done on the GEMM's way in give the same bits as the op's own kernel
    followed by the GEMM, on every path (the small-batch kernels fuse them in bfloat16, other paths and
    float32 call the op)."""
    monkeypatch.setattr(cpu_quant, "INT8", int8)
    g = torch.Generator().manual_seed(7)
    lin = QuantizedLinear(_weight(fmt, 96, 160, 11), torch.randn(96, generator=g), dtype)
    dense = ops.Linear((torch.randn(96, 160, generator=g) * 0.05).to(dtype))
    norm = (1 + 0.3 * torch.randn(160, generator=g)).to(dtype)
    for rows in (1, 1, 1, 2, 2, 3, 5, quant_linear.DENSE_ROWS):
        h = (torch.randn(rows, 160, generator=g) * 3).to(dtype)
        gate_up = (torch.randn(rows, 320, generator=g) * 2).to(dtype)
        residual = torch.randn(rows, 96, generator=g).to(dtype)
        for layer in (lin, dense):
            fused = layer(h, residual=residual, norm=norm, eps=1e-5)
            assert torch.equal(fused, layer(ops.rms_norm(h, norm, 1e-5), residual=residual)), (rows, layer)
            fused = layer(gate_up, silu_mul=True)
            assert torch.equal(fused, layer(ops.silu_mul(gate_up))), (rows, layer)


@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_rows_dequantize_exactly(fmt):
    qt = _weight(fmt, 48, 64, 9)
    ids = torch.tensor([3, 0, 47, 3, 17])
    layouts = [qt, qt.grouped()] if fmt != "q4_1" else [qt]  # a tied head's grouped rows are looked up too
    for w in layouts:
        assert torch.equal(ops.embedding(ids, w, torch.float32), qt.dequantize()[ids])
        assert torch.equal(ops.embedding(ids, w, torch.bfloat16), qt.dequantize()[ids].bfloat16())


@host
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_kernels_on_host_match_float64_reference(fmt, dtype):
    """quant_gemm.cu through the host build: float activations, dequantized in registers."""
    from scalellm.ops.cuda import backend as cuda_backend

    qt = _weight(fmt, 12, 96, 4)
    w64 = qt.dequantize().double()
    with ops.cuda_kernels_on_cpu():
        for rows in (1, 5):
            x = torch.randn(rows, 96).to(dtype)
            bias, residual = torch.randn(12).to(dtype), torch.randn(rows, 14).to(dtype)
            out = torch.full((rows, 14), 7.0, dtype=dtype)
            cuda_backend.quant_gemm(fmt, x, qt.qs, qt.d, qt.m, bias, residual, out, col0=1)
            ref = x.double() @ w64.T + bias.double() + residual[:, 1:13].double()
            scale = x.double().abs() @ w64.abs().T + bias.double().abs() + residual[:, 1:13].double().abs()
            tol = 1e-5 * scale + 1e-6 + (2.0 ** -8 * ref.abs() if dtype == torch.bfloat16 else 0)
            assert ((out[:, 1:13].double() - ref).abs() <= tol).all()
            assert (out[:, 0] == 7).all() and (out[:, 13] == 7).all()
        ids = torch.tensor([11, 0, 4])
        rows = cuda_backend.dequant_rows(fmt, qt.qs, qt.d, qt.m, ids, dtype)
        assert torch.equal(rows, qt.dequantize()[ids].to(dtype))


def test_quantization_values_are_checked():
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="q5_k")


def _tied_and_untied(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-ckpt")
    return {arch: build_checkpoint(arch, str(root / arch), seed=4) for arch in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return _tied_and_untied(tmp_path_factory)


@pytest.mark.parametrize("quantization", ["q8_0", "q4_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantize_at_load_holds_the_formats_and_counts_their_bytes(folders, arch, quantization):
    from scalellm.model.loader import load_model

    loaded = load_model(folders[arch], dtype="float32", quantization=quantization)
    model, c = loaded.model, loaded.config
    untied = 0 if c.tie_word_embeddings else 1
    if quantization == "q4_0":  # the embedding and the LM head stay Q8_0
        assert model.weight_formats == {"q4_0": 4 * c.num_layers, "q8_0": 1 + untied}
    else:
        assert model.weight_formats == {"q8_0": 4 * c.num_layers + 1 + untied}
    bytes_per_element = {"q8_0": 34 / 32, "q4_0": 18 / 32}
    h, hd = c.hidden_size, c.head_dim
    per_layer = h * (c.num_heads + 2 * c.num_kv_heads) * hd + c.num_heads * hd * h + 3 * h * c.intermediate_size
    heads = 1 + untied
    expected = (per_layer * c.num_layers * bytes_per_element[quantization] + heads * c.vocab_size * h * 34 / 32
                + 4 * (2 * c.num_layers + 1) * h + (4 * (c.num_heads + 2 * c.num_kv_heads) * hd * c.num_layers
                                                     if c.qkv_bias else 0))
    assert model.weight_bytes == expected
    # the quantized model still computes the checkpoint's function, up to its rounding
    dense = load_model(folders[arch], dtype="float32", quantization="none").model
    prompt = [1, 504, 3250, 6789, 42, 17, 900, 12]
    ours, ref = prompt_logits(model, prompt), prompt_logits(dense, prompt)
    limit = 0.05 if quantization == "q8_0" else 0.5
    assert (ours - ref).abs().max() < limit * ref.abs().max()


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1", "mixed"])
def test_gguf_blocks_served_as_stored(folders, tmp_path, fmt):
    """A GGUF with block-quantized tensors: `auto` keeps them (q/k rows un-interleaved with their blocks),
    a projection fused from parts of different formats is dequantized, and the logits stay within 5% of
    their largest magnitude of the same file served dequantized (`none`; both float32, so the float
    kernel: a misread block is off by O(100%))."""
    def formats(name: str) -> str:
        if fmt == "mixed":
            return "q8_0" if name.endswith("attn_v.weight") else "q4_0"
        return "q8_0" if name == "token_embd.weight" else fmt

    path = write_gguf(folders["llama"], str(tmp_path / f"tiny-{fmt}.gguf"), formats)
    served = LLM(path, dtype="float32", quantization="auto").engine.loaded.model
    dense = LLM(path, dtype="float32", quantization="none").engine.loaded.model
    counts = served.weight_formats
    if fmt == "mixed":  # q, k (q4_0) and v (q8_0) fuse dense; o, gate_up, down, head and embedding stay q4_0
        assert counts == {"float32": 2, "q4_0": 8}
    else:  # 2 layers of 4 projections, the untied head, and the embedding (q8_0)
        assert counts == ({fmt: 9, "q8_0": 1} if fmt != "q8_0" else {"q8_0": 10})
    for prompt in ([1, 504, 3250, 6789, 42, 17], list(range(100, 140))):  # the kernels, and the dense path
        ours, ref = prompt_logits(served, prompt), prompt_logits(dense, prompt)
        assert (ours - ref).abs().max() < 0.05 * ref.abs().max()
        if len(prompt) >= quant_linear.DENSE_ROWS:
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)  # float32 dense GEMM on the same weights


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_bfloat16_serves_grouped_blocks_with_a_tied_head(folders, tmp_path, fmt):
    """bfloat16 activations take the int8 kernels, and Q8_0/Q4_0 projections are held in groups of 16 rows;
    a tied Q8_0 embedding is one grouped copy that the head multiplies and the lookup reads. The bytes
    held are the file's; the logits stay within 5% of their largest magnitude of the file dequantized in
    float32 (8-bit activations and bfloat16's residual stream, layer after layer)."""
    path = write_gguf(folders["qwen2"], str(tmp_path / f"tied-{fmt}.gguf"),
                      lambda name: "q8_0" if name == "token_embd.weight" else fmt)
    served = LLM(path, dtype="bfloat16", quantization="auto").engine.loaded.model
    plain = LLM(path, dtype="float32", quantization="auto").engine.loaded.model  # float kernel, file order
    dense = LLM(path, dtype="float32", quantization="none").engine.loaded.model
    assert served.config.tie_word_embeddings and served.embed is served.lm_head.weight
    grouped = quant_linear.GROUPED and quant_linear.uses_int8(torch.bfloat16)
    assert {p.weight.group for p in served._projections() + [served.lm_head]} == {16 if grouped else 1}
    assert {p.weight.group for p in plain._projections()} == {1}
    assert served.weight_formats == plain.weight_formats

    def block_bytes(model):  # the quantized tensors' (norms and biases are held in the model's dtype)
        return model.embed.nbytes + sum(p.weight.nbytes for p in model._projections())

    assert block_bytes(served) == block_bytes(plain)
    for prompt in ([1, 504, 3250, 6789, 42, 17], list(range(100, 160))):  # decode-sized and prefill-sized
        ours, ref = prompt_logits(served, prompt).float(), prompt_logits(dense, prompt)
        assert (ours - ref).abs().max() < 0.05 * ref.abs().max(), float((ours - ref).abs().max() / ref.abs().max())


@gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_gguf_blocks_served_as_stored_on_gpu(tmp_path, fmt):
    """--device cuda keeps the blocks on the GPU; its kernels dequantize them in registers with float32
    activations, so the logits match the same file dequantized on the CPU up to float32 summation order,
    on the small-batch kernel (6 tokens) and on the dense path (40 tokens). head_dim 64: a size the CUDA
    attention kernels are built for."""
    folder = build_checkpoint("llama", str(tmp_path / "llama-d64"), seed=4, hidden_size=256, head_dim=64)
    path = write_gguf(folder, str(tmp_path / f"tiny-{fmt}.gguf"),
                      lambda name: "q8_0" if name == "token_embd.weight" else fmt)
    served = LLM(path, dtype="float32", quantization="auto", device="cuda").engine.loaded.model
    dense = LLM(path, dtype="float32", quantization="none").engine.loaded.model
    assert served.weight_formats == ({fmt: 9, "q8_0": 1} if fmt != "q8_0" else {"q8_0": 10})
    assert served.embed.device.type == "cuda"
    for prompt in ([1, 504, 3250, 6789, 42, 17], list(range(100, 140))):
        ours, ref = prompt_logits(served, prompt).cpu(), prompt_logits(dense, prompt)
        err = (ours - ref).abs().max().item() / ref.abs().max().item()
        assert err < 1e-4, f"{fmt}, {len(prompt)} tokens: max error {err:.2e} of the largest logit"


@pytest.fixture(scope="module")
def bundled():
    return LLM(quantization="auto"), LLM(quantization="none", dtype="float32")


def test_bundled_model_served_in_its_own_formats_answers(bundled):
    llm = bundled[0]
    model = llm.engine.loaded.model
    assert model.weight_formats == {"q4_1": 120, "q8_0": 1} and llm.engine.loaded.dtype == torch.float32
    tok = llm.engine.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16))
    assert "Paris" in out[0].outputs[0].text


PROMPTS_8 = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
             "Water boils at a temperature of", "The three primary colors are", "import numpy as np\n",
             "My favourite season is autumn because", "In 1969, the first person to walk on the moon"]


def test_bundled_model_logits_stay_near_the_dequantized_models(bundled):
    """Both in float32: `none` holds the dequantized weights, `auto` the blocks, multiplied with float32
    activations (the float kernel). Stated tolerance: max |logit difference| under 8% of the
    logits' spread, and the same top token on at least 7 of the 8 prompts."""
    quantized, dense = (llm.engine.loaded.model for llm in bundled)
    tok = bundled[0].engine.tokenizer
    same_top = 0
    for text in PROMPTS_8:
        ids = tok(text)["input_ids"]
        ours, ref = prompt_logits(quantized, ids)[-1], prompt_logits(dense, ids)[-1]
        assert (ours - ref).abs().max() < 0.08 * (ref.max() - ref.min()), text
        same_top += int(ours.argmax() == ref.argmax())
    assert same_top >= 7


def test_server_streams_from_a_quantized_gguf_and_reports_its_weight_bytes(folders, tmp_path):
    """The real server on a Q4_0 GGUF with `--quantization auto`: a streamed chat completion through the
    openai client, and /metrics' resident weight bytes equal to the loaded model's count."""
    import openai

    from scalellm.model.loader import load_model
    from tests.server_utils import ServerProcess, scrape

    path = write_gguf(folders["qwen2"], str(tmp_path / "tiny-q4_0.gguf"),
                      lambda name: "q8_0" if name == "token_embd.weight" else "q4_0")
    expected = load_model(path, max_model_len=256, quantization="auto").model.weight_bytes  # dtypes as served
    with ServerProcess("--model", path, "--quantization", "auto", "--served-model-name", "tiny-q4",
                       "--max-model-len", "256", "--kv-cache-memory", "32MB") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        stream = client.chat.completions.create(model="tiny-q4", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8, temperature=0, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text
        assert scrape(server.url)["scalellm:model_weight_bytes"] == expected
        assert "q4_0" in server.output(whole=True)  # the load line names the formats held
