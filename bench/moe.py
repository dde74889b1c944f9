"""A tiny random Mixtral through the engine against transformers' generate, at batch 1, 16 and 64.

    .venv/bin/python bench/moe.py [--repeats 2]

The model is built here with a fixed seed (8 experts, 2 per token, 4 layers, hidden 512, bfloat16,
SmolLM2's tokenizer). Each batch generates 64 tokens per request after a 64-token prompt, greedy. For
ScaleLLM it reports output tokens/s, the mean decode step time and the share of the forward spent in the
MoE layers (timed around ops.fused_moe); for transformers, output tokens/s of generate() on the same
prompts. Writes bench/results/moe.md and moe.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [BENCH, ROOT]

from harness import write_table  # noqa: E402
from scalellm import SamplingParams, ops  # noqa: E402
from scalellm.config import EngineConfig  # noqa: E402
from scalellm.engine.engine import LLMEngine  # noqa: E402
from scalellm.model import llama  # noqa: E402

PROMPT_LEN, OUTPUT_LEN = 64, 64


def build_mixtral(folder: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

    from scalellm.model.loader import default_model_path

    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=49152, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=1024, initializer_range=0.05, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    path = default_model_path()
    AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)).save_pretrained(folder)
    return folder


def prompts(batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(100, 49000, (batch, PROMPT_LEN), generator=g).tolist()


class MoETimer:
    """Wall time inside ops.fused_moe, as the model calls it."""

    def __init__(self):
        self.seconds = 0.0
        self.inner = ops.fused_moe

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def run_scalellm(engine: LLMEngine, batch: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    timer = MoETimer()
    llama.ops.fused_moe = timer
    try:
        for i, p in enumerate(prompts(batch)):
            engine.add_request(f"b{batch}-{i}-{time.monotonic()}", None, params, prompt_token_ids=p)
        steps, decode_seconds = 0, 0.0
        start = time.perf_counter()
        while engine.has_unfinished():
            decoding = not engine.scheduler.waiting and all(s.num_computed >= s.prompt_len
                                                            for s in engine.scheduler.running)
            t0 = time.perf_counter()
            moe_before = timer.seconds
            engine.step()
            dt = time.perf_counter() - t0
            if decoding:
                steps += 1
                decode_seconds += dt
            else:
                timer.seconds = moe_before  # count the decode steps only
        total = time.perf_counter() - start
    finally:
        llama.ops.fused_moe = timer.inner
    return {"tok_s": batch * OUTPUT_LEN / total, "step_ms": 1000 * decode_seconds / max(1, steps),
            "moe_share": timer.seconds / max(decode_seconds, 1e-9)}


def run_transformers(model, batch: int) -> dict:
    ids = torch.tensor(prompts(batch))
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=OUTPUT_LEN,
                       min_new_tokens=OUTPUT_LEN, do_sample=False, pad_token_id=0)
    return {"tok_s": batch * OUTPUT_LEN / (time.perf_counter() - start)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    folder = build_mixtral(os.path.join(BENCH, ".cache", "tiny-mixtral"))
    from transformers import AutoModelForCausalLM

    engine = LLMEngine(EngineConfig(model=folder, dtype="bfloat16", max_model_len=PROMPT_LEN + OUTPUT_LEN + 8))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    results: dict[int, dict[str, list]] = {b: {"ours": [], "hf": []} for b in batches}
    for r in range(args.repeats):
        for b in batches:
            ours, theirs = run_scalellm(engine, b), run_transformers(hf, b)
            results[b]["ours"].append(ours)
            results[b]["hf"].append(theirs)
            print(f"repeat {r + 1} batch {b:3d}: ScaleLLM {ours['tok_s']:8.1f} tok/s (step {ours['step_ms']:.2f} ms, "
                  f"MoE {100 * ours['moe_share']:.0f}%)  transformers {theirs['tok_s']:8.1f} tok/s", flush=True)
    lines = ["# MoE: a tiny random Mixtral, ScaleLLM engine vs transformers generate", "",
             f"8 experts, 2 per token, 4 layers, hidden 512, bfloat16; {PROMPT_LEN} prompt tokens, {OUTPUT_LEN} "
             f"generated, greedy; CPU ({os.cpu_count()} cores); {args.repeats} repeats (min-max).",
             "Command: `.venv/bin/python bench/moe.py`.", "",
             "| batch | ScaleLLM tok/s | transformers tok/s | ratio | decode step ms | step ms / batch | MoE share of step |",
             "|---:|---:|---:|---:|---:|---:|---:|"]

    def span(values, fmt):
        return f"{fmt.format(min(values))}-{fmt.format(max(values))}" if len(values) > 1 else fmt.format(values[0])
    for b in batches:
        ours, hf_runs = results[b]["ours"], results[b]["hf"]
        tok = [o["tok_s"] for o in ours]
        hf_tok = [h["tok_s"] for h in hf_runs]
        step = [o["step_ms"] for o in ours]
        ratio = [o / h for o, h in zip(tok, hf_tok)]
        lines.append(f"| {b} | {span(tok, '{:.1f}')} | {span(hf_tok, '{:.1f}')} | {span(ratio, '{:.2f}')}x | "
                     f"{span(step, '{:.2f}')} | {span([s / b for s in step], '{:.3f}')} | "
                     f"{span([100 * o['moe_share'] for o in ours], '{:.0f}')}% |")
    write_table("moe", lines, {str(b): v for b, v in results.items()}, lambda path: plot(batches, results, path),
                indent=1, show=True)


def plot(batches: list[int], results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("ours", "ScaleLLM"), ("hf", "transformers generate")):
        a.plot(batches, [max(r["tok_s"] for r in results[x][key]) for x in batches], marker="o", label=label)
    a.set(xscale="log", xlabel="batch", ylabel="output tokens/s (best repeat)", title="tiny Mixtral, CPU")
    a.legend()
    b.plot(batches, [min(r["step_ms"] for r in results[x]["ours"]) for x in batches], marker="o", label="decode step")
    b.plot(batches, [min(r["step_ms"] * r["moe_share"] for r in results[x]["ours"]) for x in batches], marker="o",
           label="of which MoE layers")
    b.set(xscale="log", xlabel="batch", ylabel="ms", title="ScaleLLM decode step")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
