"""What to send: random prompts of an exact token length, or prompts from a JSONL file."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass


@dataclass
class RequestSpec:
    prompt: str | list[int]
    max_tokens: int
    prompt_len: int | None = None


def load_tokenizer(path: str):
    import os

    from transformers import AutoTokenizer

    if path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    return AutoTokenizer.from_pretrained(path)


def exact_length_text(tokenizer, length: int, rng: random.Random) -> str:
    """Text that the tokenizer encodes to exactly `length` tokens (random ids, decoded, re-checked)."""
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(min(len(tokenizer), 1 << 20)) if i not in special]
    ids = [rng.choice(vocab) for _ in range(length)]
    for _ in range(50):
        text = tokenizer.decode(ids)
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == length:
            return text
        ids = (encoded + [rng.choice(vocab) for _ in range(length)])[:length]
    return tokenizer.decode(ids[:length])  # close enough: lengths are reported from usage anyway


def random_workload(tokenizer, num: int, input_len: int, output_len: int, seed: int = 0) -> list[RequestSpec]:
    rng = random.Random(seed)
    if tokenizer is None:  # token-id prompts: exact without a tokenizer (completions endpoint only)
        return [RequestSpec([rng.randrange(100, 4000) for _ in range(input_len)], output_len, input_len)
                for _ in range(num)]
    return [RequestSpec(exact_length_text(tokenizer, input_len, rng), output_len, input_len) for _ in range(num)]


def file_workload(path: str, default_output_len: int) -> list[RequestSpec]:
    """JSONL lines: {"prompt": "...", "max_tokens": N (optional)}."""
    specs = []
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                specs.append(RequestSpec(row["prompt"], int(row.get("max_tokens", default_output_len))))
    if not specs:
        raise ValueError(f"no prompts in {path}")
    return specs
