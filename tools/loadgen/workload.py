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
    extra: dict | None = None  # more request-body fields (response_format, ...), merged over the defaults


def load_tokenizer(path: str):
    import os

    from transformers import AutoTokenizer

    if path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    return AutoTokenizer.from_pretrained(path)


class ServerTokenizer:
    """The served model's tokenizer through the server's own /tokenize and /detokenize (ScaleLLM's
    and vLLM's): exact-length prompts with no tokenizer files on the client's side."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None):
        self.base = base_url.rstrip("/")
        self.model = model
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.all_special_ids: list[int] = []
        self.plain_ids = range(100, 4000)  # ids every tokenizer of a few thousand tokens or more has as plain text

    def _post(self, path: str, body: dict) -> dict:
        import urllib.request

        if self.model:
            body = {**body, "model": self.model}
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(), headers=self.headers)
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def decode(self, ids: list[int]) -> str:
        return self._post("/detokenize", {"tokens": ids})["prompt"]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._post("/tokenize", {"prompt": text, "add_special_tokens": add_special_tokens})["tokens"]


def exact_length_text(tokenizer, length: int, rng: random.Random) -> str:
    """Text that the tokenizer encodes to exactly `length` tokens (random ids, decoded, re-checked)."""
    special = set(tokenizer.all_special_ids)
    vocab = getattr(tokenizer, "plain_ids", None) or range(min(len(tokenizer), 1 << 20))
    vocab = [i for i in vocab if i not in special]
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
    """JSONL lines: {"prompt": "...", "max_tokens": N (optional), "body": {...} (optional: more request-body
    fields such as response_format, merged over the defaults)}."""
    specs = []
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                specs.append(RequestSpec(row["prompt"], int(row.get("max_tokens", default_output_len)),
                                         extra=row.get("body")))
    if not specs:
        raise ValueError(f"no prompts in {path}")
    return specs
