"""Results handed back to callers, in the shape users of other engines expect."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Logprob of one generated token, and the top alternatives at that position."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None  # the token's rank in its distribution (1: the most likely), for prompt tokens


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None
    logprobs: list[Logprob] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    prompt_logprobs: list[Logprob | None] | None = None  # with SamplingParams(prompt_logprobs=k)


@dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclass
class EmbeddingRequestOutput:
    """LLM.embed's result for one prompt: outputs.embedding is the pooled, normalized (as configured) vector."""
    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


@dataclass
class StageTimes:
    """Where one sample's time went inside the engine (seconds), reported with its final delta."""
    queue: float
    prefill: float  # first schedule to first token
    decode: float  # first token to last token
    detokenize: float


@dataclass
class StreamDelta:
    """What one engine step added to one sample of a request (the unit of streaming)."""
    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[Logprob] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    queue_time: float | None = None  # seconds from arrival to first schedule, on a sample's first delta
    timings: StageTimes | None = None  # on the final delta only
    replayed: bool = False  # a continuation's earlier output, replayed to rebuild state: not new
    prompt_logprobs: list[Logprob | None] | None = None  # on a sample's first delta, when asked for
    embedding: object = None  # an embedding request's vector (a float32 tensor), on its final delta
