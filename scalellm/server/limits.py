"""What one request may cost, checked on the parsed body before any tokenizing: each bound a 400 naming
its field. (The engine checks the prompt's tokens against the context window afterwards.)"""
from __future__ import annotations

from dataclasses import dataclass

from scalellm.server.errors import APIError


@dataclass(frozen=True)
class RequestLimits:
    max_n: int = 128  # samples per prompt (n; best_of is accepted only equal to n)
    max_stop_sequences: int = 16
    max_stop_chars: int = 1024  # the longest stop string
    max_stop_token_ids: int = 1 << 17  # a whole vocabulary's worth may be meaningful (stop at all but a few)
    max_prompts_per_request: int = 256  # batched prompt lists of /v1/completions
    max_logprobs: int = 20  # logprobs / top_logprobs
    max_bad_words: int = 256
    max_logit_bias: int = 1024  # entries of logit_bias
    max_allowed_token_ids: int = 1 << 20

    def check(self, req, num_prompts: int, logprobs: int | None, logprobs_field: str) -> None:
        """A 400 naming the first field past its bound."""
        if not 1 <= req.n <= self.max_n:
            raise APIError(400, f"n must be in [1, {self.max_n}] (--max-n), got {req.n}", param="n")
        if num_prompts > self.max_prompts_per_request:
            raise APIError(400, f"prompt holds {num_prompts} prompts; at most {self.max_prompts_per_request} per "
                                f"request (--max-prompts-per-request)", param="prompt")
        if logprobs is not None and not 0 <= logprobs <= self.max_logprobs:
            raise APIError(400, f"{logprobs_field} must be in [0, {self.max_logprobs}] (--max-logprobs), got "
                                f"{logprobs}", param=logprobs_field)
        stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
        if len(stops) > self.max_stop_sequences:
            raise APIError(400, f"stop holds {len(stops)} strings; at most {self.max_stop_sequences} "
                                f"(--max-stop-sequences)", param="stop")
        if any(len(s) > self.max_stop_chars for s in stops):
            raise APIError(400, f"each stop string must be at most {self.max_stop_chars} characters", param="stop")
        for name, limit in (("stop_token_ids", self.max_stop_token_ids), ("bad_words", self.max_bad_words),
                            ("logit_bias", self.max_logit_bias),
                            ("allowed_token_ids", self.max_allowed_token_ids)):
            value = getattr(req, name)
            if value is not None and len(value) > limit:
                raise APIError(400, f"{name} holds {len(value)} entries; at most {limit}", param=name)


def prompt_count(prompt) -> int:
    """How many prompts a completion request's `prompt` holds (its shape is checked later)."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return len(prompt)
    return 1


def chat_chars(conversation: list[dict]) -> int:
    return sum(len(m["content"]) for m in conversation if isinstance(m.get("content"), str))


def longest_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token stands for: a text of c characters is at least
    c / this many tokens, known before tokenizing it."""
    # byte-level vocabularies spell each byte as one character, so the pieces bound the text; get_vocab
    # includes the added (special) tokens
    return max((len(piece) for piece in tokenizer.get_vocab()), default=1)
