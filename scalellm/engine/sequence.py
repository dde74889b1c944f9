"""A sequence: one sample of one request, with its tokens, cache blocks and output state."""
from __future__ import annotations

import codecs
import enum
import random
from dataclasses import dataclass, field
from typing import Any

from scalellm.outputs import Logprob
from scalellm.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]
    prompt_len: int
    params: SamplingParams
    arrival_time: float
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hash chain of the leading full blocks
    pending_forks: int = 0  # samples still to fork off once the prompt is computed
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prefix_looked_up: bool = False
    seed: int = 0  # the request's seed, or a random one: keys this sample's random streams
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    detokenize_seconds: float = 0.0
    num_preemptions: int = 0
    # one step ahead: tokens sampled by steps whose ids the host has not read yet (1, or 2 while the next
    # step launches), the row of the newest in its step's sampled ids (the next step reads it there, on
    # the device), and whether the newest in flight ends the sequence by length (not scheduled again)
    num_in_flight: int = 0
    sampled_row: int = -1
    last_in_flight: bool = False
    # speculative decoding: this step's draft tokens (verified after the newest token), and the recent
    # mean of drafts accepted per step, which sizes the next drafts
    draft: list[int] = field(default_factory=list)
    spec_accept_avg: float = 16.0
    draft_computed: int = 0  # a draft model's: tokens whose K/V are in its cache
    draft_probs: Any = None  # a draft model's: the distributions its sampled drafts were drawn from
    spec_verdict: tuple[int, int | None] | None = None  # rejection sampling's (accepted, replacement)
    # detokenization and output state
    utf8: codecs.IncrementalDecoder | None = None  # byte-level tokenizers: the text decoder so far
    prefix_offset: int = 0
    read_offset: int = 0
    num_detokenized: int = 0  # tokens whose text is in `text`
    text: str = ""
    emitted_text_len: int = 0
    emitted_tokens: int = 0
    emitted_logprobs: int = 0
    logprobs: list[Logprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # logits changes: a grammar matcher (llguidance) advanced by each sampled token, and fixed ones
    grammar: Any = None
    logits_changes: Any = None  # engine.logits_processors.RequestLogits
    # outputs read from the prompt's positions (engine/prompt_outputs.py): each prompt token's logprob
    # (the first's None), or an embedding's running pool (engine.pooling.Pool) and then its vector
    prompt_logprobs: list[Logprob | None] | None = None
    prompt_logprobs_sent: bool = False
    pool: Any = None
    embedding: Any = None
    cache_salt: Any = None  # seeds its blocks' prefix-cache hashes: a LoRA adapter's (name, load count)

    def __post_init__(self) -> None:
        if not self.seed:
            seed = self.params.seed
            self.seed = (random.getrandbits(64) if seed is None else seed) % (1 << 64)
        self.read_offset = self.num_detokenized = self.prompt_len
        self.prefix_offset = max(self.prompt_len - 5, 0)
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
