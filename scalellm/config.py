"""Engine settings shared by the offline API and the server."""
from __future__ import annotations

import os
from dataclasses import dataclass

GiB = 1 << 30


def parse_bytes(value: str | int | float) -> int:
    """'4GB', '512MiB', '1.5G', 2000000 -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    text = value.strip().upper().replace("IB", "B")
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "K": 1 << 10, "M": 1 << 20,
             "G": 1 << 30, "T": 1 << 40, "B": 1}
    for unit, scale in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(float(text))


def missing_model_message(path: str) -> str:
    """Why a --model that is not on disk cannot be served, with a hint when it looks like a hub id."""
    message = (f"model not found: {path}. Only local model folders (config.json + safetensors + tokenizer) "
               f"and .gguf files are served; nothing is downloaded")
    parts = path.split("/")
    if len(parts) == 2 and all(parts) and not path.startswith((".", "~")):
        message += (f". {path!r} looks like a Hugging Face id: download it on a machine with access "
                    f"(e.g. `huggingface-cli download {path} --local-dir DIR`) and pass --model DIR")
    return message


def check_cuda() -> None:
    """--device cuda needs a GPU that torch sees and CuPy for the kernels; say which is missing."""
    import torch

    if not torch.cuda.is_available():
        build = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device cuda: {build} (torch.cuda.is_available() is False); use --device cpu")
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        raise ValueError("device cuda needs CuPy for the CUDA kernels: pip install -e '.[cuda]' "
                         f"(cupy-cuda12x or cupy-cuda13x to match the driver); {e}") from e


QUANTIZATIONS = ("auto", "none", "q8_0", "q4_0")


@dataclass
class EngineConfig:
    model: str | None = None  # None: the bundled SmolLM2 GGUF
    dtype: str = "auto"
    device: str = "cpu"
    quantization: str = "auto"  # auto: a GGUF's Q8_0/Q4_0/Q4_1 served as stored; none; q8_0/q4_0: at load
    max_model_len: int | None = None  # default: the model's context length
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 512  # per-step token budget shared by decodes and prefill chunks
    mixed_prefill_tokens: int | None = None  # most prompt tokens in a step that carries decodes; None: no cap
    block_size: int | None = None  # tokens per KV-cache block; default: 128 on the CPU, 16 on CUDA
    kv_cache_memory: int | str = 2 * GiB
    num_kv_blocks: int | None = None  # overrides kv_cache_memory (tests use it to force preemption)
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # compute threads for torch and numba; None: one per core
    cuda_graph_max_batch: int = 256  # decode batches up to this size replay CUDA graphs (cuda); 0: never
    overlap_steps: bool | None = None  # detokenize a step's tokens during the next; None: on the CUDA kernels
    # schedule and launch step N+1 before reading step N's ids (engine/engine.py); None: on a GPU, without
    # speculative decoding
    async_scheduling: bool | None = None
    compact_json: bool = True  # JSON constraints allow no free whitespace unless a request asks for it
    speculative_config: str | dict | None = None  # vLLM's JSON form (engine/spec_decode/config.py)
    pooler_config: str | dict | None = None  # embeddings' pooling over the model's own (engine/pooling.py)
    # multi-LoRA (engine/lora_manager.py): adapters a step may mix, their largest rank, how many stay read
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    lora_modules: list | None = None  # LoRARequests (or {"name", "path"} dicts) registered at start
    lora_kernel: str = "batched"  # or "grouped" (ops/lora.py)

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.async_scheduling and self.speculative_config is not None:
            raise ValueError("async scheduling does not combine with speculative decoding (drafts are made from "
                             "the tokens on the host)")
        if self.model is not None and not os.path.exists(self.model):
            raise ValueError(missing_model_message(self.model))
        if self.device == "cuda":
            check_cuda()
        if self.cuda_graph_max_batch < 0:
            raise ValueError("cuda_graph_max_batch must be 0 (off) or more")
        if self.block_size is None:
            # On the CPU, decode attention streams each block: longer blocks mean longer sequential reads
            # and fewer block-table lookups (bench/results/ablation.md).
            self.block_size = 128 if self.device == "cpu" else 16
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "mixed_prefill_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
        from scalellm.engine.spec_decode.config import SpeculativeConfig

        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        from scalellm.engine.pooling import parse_override

        self.pooler_config = parse_override(self.pooler_config)
        for name in ("max_loras", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.lora_modules and not self.enable_lora:
            raise ValueError("LoRA modules need enable_lora (--enable-lora)")
