"""The engine's step on a GPU, offline, for two source trees side by side (a commit and the one before).

    python bench/gpu_step.py --tree DIR --tokenizer TOK [--models smollm2,1.7b] [--concurrency 1,16,64]
    python bench/gpu_step.py --report base.json head.json     # the markdown table of two runs

Each model is a random bfloat16 checkpoint of a real model's shapes (SmolLM2-135M; SmolLM2-1.7B: hidden
2048, 24 layers) with TOK's tokenizer, built once by transformers into bench/.cache. At each concurrency c,
c prompts of --input-len random tokens generate --output-len tokens each (EOS ignored) through
`LLM.generate` from DIR's scalellm (PYTHONPATH-free: DIR goes first on sys.path); a first wave warms up,
the second is timed. Reported: output tokens per second, and milliseconds per engine step (at c=1, the
time per output token). One JSON object on stdout.

tools/gpu_check.sh runs it for the previous commit and this one on a GPU machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
SHAPES = {  # LlamaForCausalLM config fields
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, tie_word_embeddings=True),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, tie_word_embeddings=True),
}


def random_checkpoint(name: str, tokenizer: str) -> str:
    """A folder with random bfloat16 weights of the named shapes and the tokenizer's files (built once)."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = os.path.join(BENCH, ".cache", f"gpu-step-{name}-random")
    if not os.path.exists(os.path.join(folder, "config.json")):
        tok = AutoTokenizer.from_pretrained(tokenizer)
        config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, rope_theta=100000.0,
                             rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             **SHAPES[name])
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(folder + ".tmp")
        tok.save_pretrained(folder + ".tmp")
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(folder + ".tmp", folder)
    return folder


def measure(folder: str, concurrency: list[int], input_len: int, output_len: int, device: str) -> dict:
    import random

    import scalellm
    from scalellm import LLM, SamplingParams

    print(f"  scalellm from {os.path.dirname(scalellm.__file__)}", file=sys.stderr, flush=True)

    llm = LLM(folder, device=device, dtype="bfloat16", max_model_len=input_len + output_len + 16,
              max_num_seqs=max(concurrency))
    vocab = llm.engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    rng = random.Random(0)
    out = {}
    for c in concurrency:
        prompts = [[rng.randrange(100, vocab - 100) for _ in range(input_len)] for _ in range(c)]
        llm.generate(prompts, params)  # warm-up wave (and graph captures on first use)
        steps = llm.engine.num_steps
        start = time.perf_counter()
        llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        n = llm.engine.num_steps - steps
        out[str(c)] = {"output_tok_s": c * output_len / seconds, "ms_per_step": 1000 * seconds / max(n, 1),
                       "steps": n, "seconds": seconds}
        print(f"  c={c:<3} {out[str(c)]['output_tok_s']:9.1f} tok/s  {out[str(c)]['ms_per_step']:.3f} ms/step",
              file=sys.stderr, flush=True)
    return out


def report(base: dict, head: dict) -> str:
    lines = [f"| model | c | {base['label']} tok/s | {head['label']} tok/s | ratio | {base['label']} ms/step | "
             f"{head['label']} ms/step |", "|---|---:|---:|---:|---:|---:|---:|"]
    for model, rows in head["models"].items():
        for c, h in rows.items():
            b = base["models"].get(model, {}).get(c)
            if b is None:
                continue
            lines.append(f"| {model} | {c} | {b['output_tok_s']:.1f} | {h['output_tok_s']:.1f} | "
                         f"{h['output_tok_s'] / b['output_tok_s']:.2f}x | {b['ms_per_step']:.3f} | "
                         f"{h['ms_per_step']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", help="the source tree whose scalellm runs")
    ap.add_argument("--label", default="head")
    ap.add_argument("--tokenizer")
    ap.add_argument("--models", default="smollm2,1.7b")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--report", nargs=2, metavar=("BASE_JSON", "HEAD_JSON"))
    ap.add_argument("--build-only", action="store_true", help="build the random checkpoints and stop")
    args = ap.parse_args()
    if args.build_only:
        for name in args.models.split(","):
            print(random_checkpoint(name, args.tokenizer))
        return
    if args.report:
        runs = []
        for path in args.report:
            with open(path) as f:
                runs.append(json.load(f))
        print(report(*runs))
        return
    sys.path.insert(0, os.path.abspath(args.tree))
    concurrency = [int(c) for c in args.concurrency.split(",")]
    result = {"label": args.label, "tree": os.path.abspath(args.tree), "models": {}}
    for name in args.models.split(","):
        print(f"== {args.label}: {name}", file=sys.stderr, flush=True)
        folder = random_checkpoint(name, args.tokenizer)
        result["models"][name] = measure(folder, concurrency, args.input_len, args.output_len, args.device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
