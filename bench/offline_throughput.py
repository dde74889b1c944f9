"""Offline generation throughput on SmolLM2 (bfloat16): ScaleLLM vs transformers generate vs the floor.

The floor is the same forward passes (one prefill, then output_len - 1 batched decode steps over the
paged cache) timed bare: no scheduler, no sampler, no detokenizer. Writes
bench/results/offline_throughput.md and .png.

    .venv/bin/python bench/offline_throughput.py [--batch-sizes 1,16,64] [--input-len 128] [--output-len 128]
"""
from __future__ import annotations

import argparse
import platform
import random
import time

import torch

from harness import write_table  # noqa: E402  (bench/harness.py)
from models import smollm2_bf16  # noqa: E402  (bench/models.py)
from scalellm import LLM, SamplingParams  # noqa: E402
from scalellm import ops  # noqa: E402



def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(batch)]


def bench_scalellm(llm: LLM, prompts, output_len: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate([[7] * 40], SamplingParams(temperature=0, max_tokens=4))  # warm-up, shares no prefix
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
    return len(prompts) * output_len / elapsed


def bench_floor(llm: LLM, prompts, output_len: int) -> float:
    """The model's forward passes alone, on the engine's own KV cache."""
    engine = llm.engine
    model, cache, bs = engine.runner.model, engine.runner.kv_cache, engine.block_manager.block_size
    n, length = len(prompts), len(prompts[0])
    per_seq = -(-(length + output_len) // bs)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(n)]
    start = time.perf_counter()
    for i, p in enumerate(prompts):  # prefill, one sequence at a time as a whole-prompt chunk
        slots = [tables[i][pos // bs] * bs + pos % bs for pos in range(length)]
        meta = ops.build_attention_metadata(bs, slots, [], [], [(0, length, length, tables[i])])
        model.logits(model.forward(torch.tensor(p), torch.arange(length), cache, meta)[-1:])
    tokens = torch.zeros(n, dtype=torch.long)
    for step in range(output_len - 1):
        pos = length + step
        slots = [t[pos // bs] * bs + pos % bs for t in tables]
        meta = ops.build_attention_metadata(bs, slots, tables, [pos + 1] * n, [])
        tokens = ops.greedy_tokens(model.logits(model.forward(tokens, torch.full((n,), pos), cache, meta),
                                                float32=False))
    elapsed = time.perf_counter() - start
    return n * output_len / elapsed


def bench_transformers(hf_model, prompts, output_len: int) -> float:
    ids = torch.tensor(prompts)
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        hf_model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        start = time.perf_counter()
        hf_model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return len(prompts) * output_len / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]

    folder = smollm2_bf16()
    llm = LLM(folder, dtype="bfloat16", max_num_seqs=max(batches), max_num_batched_tokens=2048)
    hf_model = None
    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        hf_model.generation_config.eos_token_id = None
    rows = []
    for b in batches:
        prompts = random_prompts(b, args.input_len, llm.engine.model_config.vocab_size, seed=b)
        ours = bench_scalellm(llm, prompts, args.output_len)
        floor = bench_floor(llm, prompts, args.output_len)
        hf = bench_transformers(hf_model, prompts, args.output_len) if hf_model is not None else float("nan")
        rows.append((b, ours, hf, floor))
        print(f"batch {b:3d}: scalellm {ours:8.1f} tok/s  transformers {hf:8.1f}  floor {floor:8.1f}  "
              f"(ours/floor {ours / floor:.2f}, ours/transformers {ours / hf:.2f})", flush=True)
    write_results(rows, args)


def write_results(rows, args) -> None:
    lines = [
        "# Offline throughput: SmolLM2-135M-Instruct, bfloat16, CPU",
        "",
        "Both systems load the same folder: the bundled GGUF dequantized once to bfloat16 safetensors.",
        "",
        f"{args.input_len} prompt tokens and {args.output_len} generated tokens per request (greedy, "
        f"ignore_eos); torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}.",
        "Generated tokens per second over the whole batch (prefill included). The floor is the same",
        "forward passes timed bare, without scheduler, sampler or detokenizer.",
        "",
        "| batch | ScaleLLM tok/s | transformers tok/s | floor tok/s | ScaleLLM / transformers | ScaleLLM / floor |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for b, ours, hf, floor in rows:
        lines.append(f"| {b} | {ours:.1f} | {hf:.1f} | {floor:.1f} | {ours / hf:.2f} | {ours / floor:.2f} |")
    write_table("offline_throughput", lines, plot=lambda path: plot(rows, path))


def plot(rows, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r[0] for r in rows]
    for col, label in ((1, "ScaleLLM"), (2, "transformers generate"), (3, "floor (bare forward)")):
        ax.plot(xs, [r[col] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("SmolLM2-135M bf16 offline throughput (CPU)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
