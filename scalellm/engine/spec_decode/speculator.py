"""Which running sequences draft this step, how many tokens each, and how many of them the target
accepted (the counters behind vllm:spec_decode_* metrics).

Drafting is throttled so it never costs throughput: verifying k drafts adds k rows to the step, which
is nearly free while the batch is small (the step reads the weights once either way) and not once the
GEMMs are compute-bound. So a step gets drafts for at most `max_step_rows` rows in all (decodes plus
drafts), none while prompts wait or are computed, none at `disable_by_batch_size` running sequences or
more, and each sequence drafts about as many tokens as it has lately had accepted, plus one.
"""
from __future__ import annotations

import math

import torch

from scalellm.engine.sequence import Sequence
from scalellm.engine.spec_decode import ngram, rejection
from scalellm.engine.spec_decode.rows import DraftRow
from scalellm.engine.spec_decode.config import SpeculativeConfig


class Speculator:
    def __init__(self, config: SpeculativeConfig, max_model_len: int, max_step_rows: int, draft_model=None):
        self.config = config
        self.k = config.num_speculative_tokens
        self.max_model_len = max_model_len
        self.max_step_rows = max_step_rows
        self.draft_model = draft_model  # spec_decode.draft_model.DraftModel, or None for n-gram
        self.num_drafts = 0  # sequences' steps that verified drafts
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_pos = [0] * self.k

    def plan(self, running: list[Sequence], num_waiting: int = 0) -> None:
        """Set each running sequence's drafts for the coming step (n-gram: the tokens; a draft model:
        placeholders that fill() replaces once the step is scheduled). No drafts while prompts wait or
        are being computed: those steps are busy already, and drafts would take their token budget."""
        decodes, pending = [], 0
        for seq in running:
            seq.draft = []
            pending += seq.num_tokens - seq.num_computed
            if seq.num_computed == seq.num_tokens - 1 and not seq.pending_forks:
                decodes.append(seq)
        limit = self.config.disable_by_batch_size
        if num_waiting or pending > len(decodes) or (limit is not None and len(running) >= limit):
            return
        budget = self.max_step_rows - len(decodes)
        c = self.config
        for seq in decodes:
            if budget <= 0:
                break
            if seq.grammar is not None:  # a constrained request does not speculate
                continue
            if self.draft_model is not None and not _draft_model_can_sample(seq):
                continue
            k = min(self.k, math.ceil(seq.spec_accept_avg) + 1, budget, self.max_model_len - seq.num_tokens - 1)
            if seq.params.max_tokens is not None:
                k = min(k, seq.params.max_tokens - seq.num_output_tokens - 1)
            if k <= 0:
                continue
            if self.draft_model is None:
                seq.draft = ngram.propose(seq.token_ids, k, c.prompt_lookup_min, c.prompt_lookup_max)
            else:
                seq.draft = [0] * k
            budget -= len(seq.draft)

    def fill(self, seqs: list[Sequence]) -> None:
        """A draft model's tokens for the scheduled sequences that draft."""
        drafting = [s for s in seqs if s.draft]
        if drafting:
            self.draft_model.propose(drafting)

    def rejection_sample(self, logits: torch.Tensor, rows: list) -> None:
        """Verdicts on a draft model's sampled drafts (seq.spec_verdict), from the target's logits as the
        sampler changed them (masks, biases) and the draft's distributions; rows: the sampler's rows."""
        for i, row in enumerate(rows):
            if isinstance(row, DraftRow) and row.j == 0 and row.seq.draft_probs is not None:
                seq = row.seq
                seq.spec_verdict = rejection.verify(logits[i:i + len(seq.draft) + 1].float(), seq, seq.draft,
                                                    seq.draft_probs)

    def accept(self, seq: Sequence, tokens: list[int], logprobs: list) -> tuple[list[int], list]:
        """The tokens (and logprobs) a verifying sequence gains from its k + 1 rows' sampled tokens: the
        drafts the target confirmed and the token after them. Clears the sequence's drafts and counts."""
        draft, seq.draft = seq.draft, []
        verdict, seq.spec_verdict = seq.spec_verdict, None
        if verdict is None:  # the target's own tokens decide
            accepted = num_accepted(draft, tokens)
            tokens, logprobs = tokens[:accepted + 1], logprobs[:accepted + 1]
        else:  # rejection sampling's
            accepted, replacement = verdict
            tokens = draft[:accepted] + [tokens[accepted] if replacement is None else replacement]
            logprobs = [None] * len(tokens)
        self.count(seq, accepted, len(draft), seq.num_tokens)
        return tokens, logprobs

    def count(self, seq: Sequence, accepted: int, num_draft: int, num_tokens_before: int) -> None:
        """accepted: how many of the sequence's num_draft drafts the target confirmed (a prefix), when it
        had num_tokens_before tokens."""
        if self.draft_model is not None:
            self.draft_model.accepted(seq, num_tokens_before, accepted)
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += accepted
        for i in range(accepted):
            self.accepted_per_pos[i] += 1
        seq.spec_accept_avg = 0.5 * seq.spec_accept_avg + 0.5 * accepted

    def stats(self) -> dict:
        return {"spec_num_drafts": self.num_drafts, "spec_num_draft_tokens": self.num_draft_tokens,
                "spec_num_accepted_tokens": self.num_accepted_tokens,
                "spec_accepted_per_pos": list(self.accepted_per_pos)}


def _draft_model_can_sample(seq: Sequence) -> bool:
    """Greedy requests, and sampled ones whose distribution rejection.py reproduces: no penalties, no
    min_tokens still to go, no logprobs."""
    p = seq.params
    if p.temperature == 0:
        return True
    return (p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty and p.logprobs is None
            and seq.num_output_tokens >= p.min_tokens)


def num_accepted(draft: list[int], sampled: list[int]) -> int:
    """How many drafts the target's own tokens confirm: the longest prefix where each draft equals the
    token the target sampled (or chose greedily) at its position, given the drafts before it."""
    j = 0
    while j < len(draft) and sampled[j] == draft[j]:
        j += 1
    return j
