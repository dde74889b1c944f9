"""One command for a GPU machine: the CUDA tests, the kernels against the device's bandwidth, and an
end-to-end serving run.

    .venv/bin/python bench/gpu.py [--concurrency 1,16,64] [--skip-tests]

1. The CUDA tests (kernels on the device, the engine with --device cuda, sampling distributions).
2. bench/kernel_ops.py --device cuda: decode paged attention's bandwidth as a share of a large device
   copy's, the elementwise kernels, fused sampling against the same torch operations.
3. Serving, SmolLM2-135M (bfloat16) at each concurrency, 128 tokens in and 128 out (tools/loadgen):
   our server with --device cuda, against vLLM's GPU server where `vllm` imports in this environment,
   else against transformers' generate at the same batch sizes (an offline floor, not a server).
Writes bench/results/gpu.md and gpu.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, ROOT)

from harness import LOGS, MAX_MODEL_LEN, NAME, Proc, drive, run_scalellm, write_table  # noqa: E402
from models import MODELS  # noqa: E402

PY = sys.executable
CUDA_TESTS = ["tests/test_cuda_kernels.py", "tests/test_cuda_host_engine.py", "tests/test_ops.py",
              "tests/test_sampler_distributions.py", "tests/test_quantized.py"]
# the tests that need the device (the host-build ones run everywhere, in the ordinary suite)
GPU_ONLY = "on_gpu or test_cuda_decode_attention or test_cuda_elementwise or (distributions and cuda)"


def run_tests(timeout: float) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run([PY, "-m", "pytest", "-q", "-rfE", "--tb=short", "-W", "ignore::DeprecationWarning",
                               "-p", "no:cacheprovider", "-k", GPU_ONLY, *CUDA_TESTS],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(out[-6000:], flush=True)
        return {"returncode": None, "summary": f"stopped after {timeout:.0f} s", "seconds": timeout, "tail": out[-8000:]}
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    os.makedirs(LOGS, exist_ok=True)
    with open(os.path.join(LOGS, "gpu_tests.log"), "w") as f:
        f.write(done.stdout + done.stderr)
    print(done.stdout[-6000:], flush=True)
    return {"returncode": done.returncode, "summary": summary, "seconds": time.perf_counter() - start,
            "tail": done.stdout[-8000:]}


def run_kernels() -> str:
    subprocess.check_call([PY, "bench/kernel_ops.py", "--device", "cuda"], cwd=ROOT)
    with open(os.path.join(BENCH, "results", "kernels_cuda.md")) as f:
        return f.read()


def run_vllm_gpu(folder: str, args) -> dict[int, dict]:
    p = Proc("vllm-gpu", [PY, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--port", "{port}",
                          "--dtype", "bfloat16", "--served-model-name", NAME, "--max-model-len", str(MAX_MODEL_LEN)],
             timeout=900)
    try:
        return drive(p, folder, args)
    finally:
        p.stop()


def run_transformers(folder: str, args) -> dict[int, dict]:
    """generate() over a batch of random prompts at each concurrency: output tokens per second."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    vocab = model.config.vocab_size
    results = {}
    for c in args.concurrency:
        ids = torch.randint(100, vocab - 100, (c, args.input_len), device="cuda")
        kw = dict(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False, pad_token_id=0)
        model.generate(ids[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, **kw)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        results[c] = {"output_throughput": c * args.output_len / seconds,
                      "tpot_ms": {"median": 1000 * seconds / args.output_len}}
        print(f"    c={c:<3} {results[c]['output_throughput']:8.1f} tok/s", flush=True)
    return results


def random_weights_folder(config_dir: str) -> str:
    """A folder with config_dir's config and tokenizer and weights drawn at random (seed 0): the same
    shapes, so the same work per token as the real weights (the benchmark ignores EOS)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = os.path.join(BENCH, ".cache", os.path.basename(os.path.normpath(config_dir)) + "-random")
    if not os.path.exists(os.path.join(folder, "model.safetensors")):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.bfloat16)
        model.save_pretrained(folder)
        for name in os.listdir(config_dir):
            if name != "config.json" and not name.endswith(".safetensors"):
                shutil.copy(os.path.join(config_dir, name), folder)
    return folder


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def write(data: dict) -> str:
    lines = ["# GPU run", "", f"Device: {data['device']}. Command: `.venv/bin/python bench/gpu.py`.", ""]
    if "weights" in data:
        lines += [f"Weights: {data['weights']}.", ""]
    if "tests" in data:
        lines += ["## CUDA tests", "", f"`{data['tests']['summary']}`", ""]
    lines += ["## Kernels", "", data["kernels"], "", "## Serving (SmolLM2-135M, bfloat16, 128 in / 128 out)", "",
              f"| concurrency | ScaleLLM tok/s | {data['peer']} tok/s | ratio | ScaleLLM TPOT p50 ms |",
              "|---|---|---|---|---|"]
    for c in data["concurrency"]:
        ours, peer = data["scalellm"][str(c)], data["peer_results"][str(c)]
        lines.append(f"| {c} | {ours['output_throughput']:.1f} | {peer['output_throughput']:.1f} | "
                     f"{ours['output_throughput'] / peer['output_throughput']:.2f}x | {ours['tpot_ms']['median']:.2f} |")
    return write_table("gpu", lines, data, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--waves", type=int, default=2)
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--test-timeout", type=float, default=1200, help="seconds before the tests are stopped")
    ap.add_argument("--random-weights-from", metavar="DIR",
                    help="serve DIR's config and tokenizer with random weights (where the bundled model is not "
                         "installed; the same work per token)")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    data: dict = {"device": device_name(), "concurrency": args.concurrency}
    if not args.skip_tests:
        print("== CUDA tests", flush=True)
        data["tests"] = run_tests(args.test_timeout)
    print("== kernels", flush=True)
    data["kernels"] = run_kernels()
    if args.random_weights_from:
        folder = random_weights_folder(args.random_weights_from)
        data["weights"] = f"random, with {os.path.basename(os.path.normpath(args.random_weights_from))}'s shapes"
    else:
        folder = MODELS["smollm2-135m"]()
    print("== ScaleLLM --device cuda", flush=True)
    data["scalellm"] = {str(c): r for c, r in run_scalellm(folder, args, ("--device", "cuda")).items()}
    if importlib.util.find_spec("vllm") is not None:
        data["peer"] = "vLLM (GPU)"
        print("== vLLM", flush=True)
        data["peer_results"] = {str(c): r for c, r in run_vllm_gpu(folder, args).items()}
    else:
        data["peer"] = "transformers generate"
        print("== transformers generate (vLLM does not import here)", flush=True)
        data["peer_results"] = {str(c): r for c, r in run_transformers(folder, args).items()}
    write(data)


if __name__ == "__main__":
    main()
