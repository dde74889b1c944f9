"""Quantized weights served as stored: ScaleLLM vs llama.cpp's server on the same GGUF files, on loopback.

    .venv/bin/python bench/quantized.py [--repeats 2]

Files (bench/.cache/gguf): SmolLM2-135M-Instruct at BF16, Q8_0 and Q4_0, written here from the bfloat16
benchmark checkpoint (bench/models.py: the bundled model dequantized, so Q8_0/Q4_0 re-quantize Q4_1
values: the speed is what is measured here) with the bundled file's metadata and tokenizer, quantized by
the gguf package (llama.cpp's reference quantizers); the Q4_0 file keeps the tied embedding in Q8_0 as
the bundled Q4_1 file does. Plus the bundled Q4_1 file itself.

Each server loads each file (ScaleLLM: --quantization auto, bfloat16 activations; llama.cpp: llama-server
built from the sources vendored in llama-cpp-python 0.3.36, Release, GGML_NATIVE=ON, run with -t 2,
-np 64 parallel slots and continuous batching) and is driven by tools/loadgen at concurrency 1 and 64
(128 tokens in, 128 out, streamed). Reported: c=1 TPOT p50, c=64 output tokens/s, the weights' resident
bytes (ScaleLLM's /metrics; llama.cpp's model buffers from its log: the mapped file and the copy it
repacks for its AVX512 kernels) and each server's RSS after load. Both get a KV cache for 64 requests
of 1024 tokens (ScaleLLM allocates and zeroes it at start, so it shows in RSS; llama.cpp's pages stay
untouched until used).
Writes bench/results/quantized.md, .png and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, ROOT)

from models import smollm2_bf16  # noqa: E402
from harness import MAX_MODEL_LEN, NAME, PY, Proc, drive  # noqa: E402

LLAMA_VERSION = "0.3.36"  # llama-cpp-python, whose vendored llama.cpp sources are built
LLAMA_SRC = os.path.join(BENCH, ".cache", "llama.cpp", f"llama_cpp_python-{LLAMA_VERSION}", "vendor", "llama.cpp")
LLAMA_SERVER = os.path.join(LLAMA_SRC, "build", "bin", "llama-server")
# AMX off: on CPUs that list it where the kernel does not grant the tiles (virtual machines), ggml's AMX
# kernels die on their first instruction (SIGILL); without AMX ggml takes its AVX512-VNNI kernels.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", f"-DCMAKE_C_FLAGS={NO_AMX}",
               f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
GGUF_DIR = os.path.join(BENCH, ".cache", "gguf")
FORMATS = ["bf16", "q8_0", "q4_0", "q4_1"]


def ensure_llama_server() -> str:
    """llama-server from llama-cpp-python's sdist (the package index has no wheel of it): a few minutes."""
    if not os.path.exists(LLAMA_SERVER):
        src = os.path.dirname(os.path.dirname(LLAMA_SRC))
        if not os.path.isdir(LLAMA_SRC):
            os.makedirs(os.path.dirname(src), exist_ok=True)
            subprocess.check_call([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                   "-d", os.path.dirname(src), f"llama-cpp-python=={LLAMA_VERSION}"])
            subprocess.check_call(["tar", "xzf", f"{src}.tar.gz", "-C", os.path.dirname(src)])
        subprocess.check_call(["cmake", "-B", "build", *CMAKE_FLAGS], cwd=LLAMA_SRC)
        subprocess.check_call(["cmake", "--build", "build", "--target", "llama-server", "-j", str(os.cpu_count())],
                              cwd=LLAMA_SRC)
    return LLAMA_SERVER


def _interleave(w, heads: int):
    """transformers' rotate-half Q/K rows -> llama.cpp's interleaved pairs (as its converter stores them)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_gguf(fmt: str) -> str:
    """SmolLM2-135M-Instruct in one format, with the bundled file's metadata (tokenizer included)."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    from scalellm.model.loader import default_model_path

    if fmt == "q4_1":
        return default_model_path()
    path = os.path.join(GGUF_DIR, f"smollm2-135m-instruct-{fmt}.gguf")
    if os.path.exists(path):
        return path
    os.makedirs(GGUF_DIR, exist_ok=True)
    source = gguf.GGUFReader(default_model_path())
    writer = gguf.GGUFWriter(path + ".part", "llama")
    file_types = {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                  "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    for key, field in source.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    writer.add_file_type(file_types[fmt])
    heads = int(source.fields["llama.attention.head_count"].contents())
    kv_heads = int(source.fields["llama.attention.head_count_kv"].contents())
    names = {t.name for t in source.tensors}
    for name, t in load_file(os.path.join(smollm2_bf16(), "model.safetensors")).items():
        gname = _gguf_name(name)
        if gname not in names:
            continue
        w = t.float().numpy()
        if name.endswith("q_proj.weight"):
            w = _interleave(w, heads)
        elif name.endswith("k_proj.weight"):
            w = _interleave(w, kv_heads)
        w = np.ascontiguousarray(w)
        if w.ndim == 1:
            writer.add_tensor(gname, w)
            continue
        kind = "q8_0" if fmt == "q4_0" and gname == "token_embd.weight" else fmt
        qtype = gguf.GGMLQuantizationType[kind.upper()]
        writer.add_tensor(gname, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(path + ".part", path)
    return path


def _gguf_name(hf: str) -> str:
    from scalellm.model.gguf_file import GLOBAL_NAMES, LAYER_NAMES

    base, kind = hf.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, layer, part = base.split(".", 3)
        return f"blk.{layer}.{next(k for k, v in LAYER_NAMES.items() if v == part)}.{kind}"
    return f"{next(k for k, v in GLOBAL_NAMES.items() if v == base)}.{kind}"


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024


def weight_mib_scalellm(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return float(re.search(r"^scalellm:model_weight_bytes\{[^}]*\} (\S+)$", text, re.M).group(1)) / (1 << 20)


def weight_mib_llama(log_path: str) -> float:
    with open(log_path) as f:
        sizes = re.findall(r"CPU(?:_Mapped|_REPACK)? model buffer size =\s+([\d.]+) MiB", f.read())
    return sum(float(s) for s in sizes)


def kv_bytes_per_token(path: str) -> int:
    """A 16-bit KV cache's bytes per token for a llama GGUF (both servers keep 16-bit K and V)."""
    import gguf

    f = gguf.GGUFReader(path).fields
    get = lambda key: int(f[f"llama.{key}"].contents())  # noqa: E731
    return get("block_count") * 2 * get("attention.head_count_kv") * (get("embedding_length") //
                                                                       get("attention.head_count")) * 2


def run_server(kind: str, path: str, tokenizer: str, args) -> dict:
    slots = max(args.concurrency)  # both servers get room for every concurrent request at full length
    if kind == "ScaleLLM":
        kv = slots * MAX_MODEL_LEN * kv_bytes_per_token(path)
        p = Proc("scalellm-quant", [PY, "-m", "scalellm.server", "--model", path, "--port", "{port}",
                                    "--quantization", "auto", "--dtype", "bfloat16", "--served-model-name", NAME,
                                    "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", str(kv)])
    else:
        p = Proc("llama-server", [ensure_llama_server(), "-m", path, "--host", "127.0.0.1", "--port", "{port}",
                                  "-t", str(os.cpu_count()), "-tb", str(os.cpu_count()), "-np", str(slots),
                                  "-c", str(slots * MAX_MODEL_LEN), "--alias", NAME, "--no-webui", "-lv", "4"])
    try:
        result = {"rss_mib_after_load": rss_mib(p.proc.pid)}
        result["weight_mib"] = weight_mib_scalellm(p.url) if kind == "ScaleLLM" else weight_mib_llama(p.log_path)
        result["runs"] = drive(p, tokenizer, args)
        return result
    finally:
        p.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--servers", default="ScaleLLM,llama.cpp")
    ap.add_argument("--concurrency", default="1,64")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--waves", type=int, default=2, help="requests per run = max(min-requests, waves x concurrency)")
    ap.add_argument("--min-requests", type=int, default=8)
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    tokenizer = smollm2_bf16()
    files = {fmt: make_gguf(fmt) for fmt in args.formats.split(",")}
    data = {"llama_cpp": {"package": f"llama-cpp-python {LLAMA_VERSION} (vendored llama.cpp)",
                          "cmake": CMAKE_FLAGS},
            "config": {"input_len": args.input_len, "output_len": args.output_len, "concurrency": args.concurrency},
            "files": {f: os.path.relpath(p, ROOT) if p.startswith(ROOT) else os.path.basename(p)
                      for f, p in files.items()},
            "repeats": []}
    import gguf

    params = sum(int(t.n_elements) for t in gguf.GGUFReader(files[next(iter(files))]).tensors)
    data["bf16_one_copy_mib"] = params * 2 / (1 << 20)  # every weight once in bfloat16
    for r in range(args.repeats):
        rep: dict = {}
        for fmt, path in files.items():
            for kind in args.servers.split(","):
                print(f"== repeat {r + 1}/{args.repeats}: {kind} on {fmt}", flush=True)
                rep[f"{kind}|{fmt}"] = run_server(kind, path, tokenizer, args)
        data["repeats"].append(rep)
        with open(os.path.join(BENCH, "results", "quantized.json"), "w") as f:
            json.dump(data, f, indent=1)
    from quantized_report import write_report

    print("wrote", write_report(data, os.path.join(BENCH, "results")))


if __name__ == "__main__":
    main()
