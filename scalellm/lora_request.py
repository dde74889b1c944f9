"""Which LoRA adapter a request runs with (vLLM's LoRARequest)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str  # the name requests choose it by (the `model` field of an HTTP request)
    lora_int_id: int  # any positive id, unique per adapter (kept for vLLM's signature)
    lora_path: str  # a PEFT adapter folder: adapter_config.json and adapter_model.safetensors
