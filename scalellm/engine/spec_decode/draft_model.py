"""A draft model proposes each step's drafts: a smaller model of the same tokenizer with its own KV
cache, paged by the target's block tables (the same block ids, its own pages), so the block manager,
prefix cache and preemption need not know it exists.

A sequence's draft K/V is computed lazily: on its first proposal the draft model prefills what it has
not seen (from position 0: blocks the target took from the prefix cache may not hold the draft's K/V),
then each proposal runs one pass over the tokens appended since the last one plus one pass per further
draft. After verification only the draft K/V of accepted tokens counts (`accepted`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from scalellm.engine.model_runner import ModelRunner
from scalellm.engine.sequence import Sequence
from scalellm.engine.spec_decode import rejection
from scalellm.model.loader import LoadedModel
from scalellm.sampling_params import SamplingParams


@dataclass(eq=False)
class _Input:
    """What the draft model's runner reads of a sequence: its tokens so far (with the drafts made in
    this proposal), how many have draft K/V, and the target's block table."""
    seq_id: int
    token_ids: list[int]
    num_computed: int
    block_table: list[int]
    draft: list[int] = field(default_factory=list)  # the runner's chunks carry no drafts of their own
    prompt_len = 0  # nothing read from prompt positions (prompt_outputs.py), and every chunk samples
    params = SamplingParams()
    num_in_flight = 0  # the draft model's tokens are all on the host

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class DraftModel:
    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int, max_model_len: int):
        self.loaded = loaded
        self.runner = ModelRunner(loaded.model, num_blocks, block_size, max_model_len)

    def warm_up(self) -> None:
        self.runner.warm_up()

    def release(self, seq: Sequence) -> None:
        """The sequence's blocks are gone (finished or preempted): so is its draft K/V."""
        self.runner.release(seq)
        seq.draft_computed = 0

    def propose(self, seqs: list[Sequence]) -> None:
        """Replace each sequence's placeholder drafts (as many as the step gave it) with the draft
        model's tokens: greedy for greedy requests, else sampled, with the draft's distribution of each
        kept in seq.draft_probs for rejection sampling."""
        inputs = [_Input(s.seq_id, list(s.token_ids), s.draft_computed, s.block_table) for s in seqs]
        wanted = [len(s.draft) for s in seqs]
        made: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        while active:
            batch = [inputs[i] for i in active]
            decodes = [x for x in batch if x.num_tokens - x.num_computed == 1]
            chunks = [(x, x.num_tokens - x.num_computed) for x in batch if x.num_tokens - x.num_computed > 1]
            logits, ready, _ = self.runner.run(decodes, chunks)
            row_of = {id(x): r for r, x in enumerate(ready)}
            rows = [row_of[id(inputs[i])] for i in active]
            logits = logits[rows].float()
            tokens, q = rejection.draft_tokens(logits, [seqs[i] for i in active], [len(made[i]) for i in active])
            still = []
            for r, i in enumerate(active):
                x = inputs[i]
                x.num_computed = x.num_tokens
                made[i].append(tokens[r])
                if q is not None and q[r] is not None:
                    probs[i].append(q[r])
                if len(made[i]) < wanted[i]:
                    x.token_ids.append(tokens[r])
                    still.append(i)
            active = still
        for s, x, d, p in zip(seqs, inputs, made, probs):
            s.draft = d
            s.draft_computed = x.num_computed  # through the drafts but the last
            s.draft_probs = torch.stack(p) if p else None

    @staticmethod
    def accepted(seq: Sequence, num_tokens_before: int, accepted: int) -> None:
        """Of the draft K/V written past the sequence's old length, only the accepted drafts' stays."""
        seq.draft_computed = min(seq.draft_computed, num_tokens_before + accepted)
        seq.draft_probs = None


def same_vocabulary(target, draft) -> bool:
    """Whether two tokenizers map text to the same ids (draft tokens are target tokens)."""
    if target is None or draft is None:
        return target is draft
    return target.get_vocab() == draft.get_vocab()


def load_draft_model(spec, config, target: LoadedModel) -> LoadedModel:
    """The draft model of --speculative-config, in the target's dtype; refused unless its vocabulary is
    the target's."""
    from scalellm.model.loader import load_model

    quantization = spec.quantization or config.quantization
    draft = load_model(spec.model, target.dtype, config.device, config.max_model_len, quantization)
    if draft.config.vocab_size != target.config.vocab_size or not same_vocabulary(target.tokenizer, draft.tokenizer):
        raise ValueError(f"speculative config: the draft model {spec.model} does not share the target's "
                         "tokenizer (its vocabulary differs)")
    return draft
