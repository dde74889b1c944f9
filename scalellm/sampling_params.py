"""Per-request sampling parameters, validated up front so bad input fails early and clearly."""
from __future__ import annotations

from dataclasses import dataclass, field

from scalellm.pooling_params import PoolingParams
from scalellm.structured.params import StructuredOutputsParams


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs besides the chosen token
    prompt_logprobs: int | None = None  # each prompt token's logprob (the first's None) and this many top ones
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None  # the output must match this constraint
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    allowed_token_ids: list[int] | None = None  # only these tokens may be sampled
    bad_words: list[str] | None = None  # words never generated (their last token is banned after the rest)
    # a generation resumed here: per choice, the tokens it already produced elsewhere (they count as its
    # output), or None for a choice that already finished (not run again)
    continuation: list[list[int] | None] | None = None
    # an embedding request: the prompt's pooled hidden state instead of tokens (max_tokens 0)
    pooling: PoolingParams | None = None
    lora_name: str | None = None  # the LoRA adapter it runs with (a request's model; LLM's lora_request)

    stop_list: list[str] = field(init=False, repr=False, default_factory=list)
    stop_token_set: frozenset[int] = field(init=False, repr=False, default=frozenset())  # checked per token
    compiled_grammar: object = field(init=False, repr=False, default=None)  # set by a server that compiled it
    # whether the logits are changed before sampling (constraints, biases, bans): read per row every step
    processes_logits: bool = field(init=False, repr=False, default=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop_list = [self.stop]
        else:
            self.stop_list = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.stop_token_set = frozenset(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self.validate()
        self.processes_logits = (self.structured_outputs is not None or bool(self.logit_bias)
                                 or self.allowed_token_ids is not None or bool(self.bad_words))

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name} {why}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", f"must be at least 1, got {self.n!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            bad("max_tokens", f"must be at least 0, got {self.max_tokens!r}")
        if self.max_tokens == 0 and self.n != 1:  # a prompt's logprobs once, not n identical copies
            bad("n", f"must be 1 when max_tokens is 0, got {self.n}")
        if self.max_tokens == 0 and self.continuation is not None:
            bad("max_tokens", "must be at least 1 in a continuation")
        if self.pooling is not None and self.max_tokens != 0:
            bad("max_tokens", "must be 0 in an embedding request")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", f"must be non-negative, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must not exceed max_tokens={self.max_tokens}, got {self.min_tokens}")
        if not _is_number(self.temperature) or self.temperature < 0:
            bad("temperature", f"must be non-negative, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", f"must be -1 (disabled) or at least 1, got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                bad(name, f"must be in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", f"must be positive, got {self.repetition_penalty!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad("logprobs", f"must be in [0, 20], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            bad("prompt_logprobs", f"must be in [0, 20], got {self.prompt_logprobs!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", f"must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_list):
            bad("stop", "must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias", "must map token ids to numbers")
            for t, v in self.logit_bias.items():
                if not isinstance(t, int) or t < 0:
                    bad("logit_bias", f"keys must be token ids, got {t!r}")
                if not _is_number(v) or not -100 <= v <= 100:
                    bad("logit_bias", f"values must be in [-100, 100], got {v!r} for token {t}")
        if self.allowed_token_ids is not None and (
                not isinstance(self.allowed_token_ids, list) or not self.allowed_token_ids
                or any(not isinstance(t, int) or t < 0 for t in self.allowed_token_ids)):
            bad("allowed_token_ids", "must be a non-empty list of token ids")
        if self.bad_words is not None and (not isinstance(self.bad_words, list)
                                           or any(not isinstance(w, str) or not w.strip() for w in self.bad_words)):
            bad("bad_words", "must be a list of non-empty strings")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            bad("structured_outputs", "must be a StructuredOutputsParams")
        if self.continuation is not None and (
                not isinstance(self.continuation, list) or len(self.continuation) != self.n
                or any(c is not None and (not isinstance(c, list) or any(not isinstance(t, int) or t < 0 for t in c))
                       for c in self.continuation)):
            bad("continuation", f"must hold n={self.n} entries, each a list of token ids or None")

    @property
    def prompt_only(self) -> bool:
        """Scoring or embedding: the prompt is computed, nothing is generated."""
        return self.max_tokens == 0

    @property
    def num_to_run(self) -> int:
        """How many of the n choices the engine runs (a continuation leaves out the finished ones)."""
        if self.continuation is None:
            return self.n
        return sum(c is not None for c in self.continuation)

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop_list), default=0)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
