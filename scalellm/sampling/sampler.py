"""Batched sampling: penalties, temperature, top-k/top-p/min-p, seeded draws, logprobs.

Every row is computed from its own logits and its own random numbers: a seeded request draws from a
generator keyed by (seed, sample index, output position), so its tokens do not depend on batch mates
and survive preemption. Sampling uses the exponential race (argmax of p / E, E ~ Exp(1)), which
draws exactly from p.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scalellm.engine.sequence import Sequence
from scalellm.outputs import Logprob

_MASK64 = (1 << 63) - 1


def seed_for(seed: int, index: int, position: int) -> int:
    """Counter-based key: one independent stream per (request seed, sample, output position)."""
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + position * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return (x * 0xD6E8FEB86659FD93) & _MASK64


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                  min_p: torch.Tensor | None) -> torch.Tensor:
    """Set to -inf what top-k (0 = off), then top-p (1 = off), then min-p (0 = off) exclude, per row."""
    neg_inf = float("-inf")
    if top_k is not None or top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if top_k is not None:
            k = torch.where(top_k > 0, top_k, logits.shape[-1]).clamp(max=logits.shape[-1])
            ranks = torch.arange(logits.shape[-1], device=logits.device)
            remove |= ranks[None, :] >= k[:, None]
        if top_p is not None:
            probs = sorted_logits.masked_fill(remove, neg_inf).softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
            remove |= before >= top_p[:, None]
        logits = logits.scatter(1, order, sorted_logits.masked_fill(remove, neg_inf))
    if min_p is not None:
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        logits = logits.masked_fill(probs < threshold, neg_inf)
    return logits


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens; presence/frequency over output tokens."""
    rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0
            or s.params.presence_penalty or s.params.frequency_penalty]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i in rows:  # only rows that asked for penalties pay for them
        p = seqs[i].params
        tokens = torch.tensor(seqs[i].token_ids, dtype=torch.long)
        tokens = tokens[tokens < vocab]
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.unique(tokens)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            out = tokens[seqs[i].prompt_len:]
            counts = torch.bincount(out, minlength=vocab).to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return logits


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[Logprob | None]


class Sampler:
    def __init__(self, eos_token_ids: list[int]):
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        raw = logits
        logits = self._suppress_early_stop(apply_penalties(logits, seqs), seqs)
        params = [s.params for s in seqs]
        greedy = torch.tensor([p.temperature == 0.0 for p in params])
        chosen = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            chosen = torch.where(greedy, chosen, self._draw(logits, seqs, greedy))
        token_ids = chosen.tolist()
        return SampleResult(token_ids, self._logprobs(raw, seqs, token_ids))

    def _suppress_early_stop(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            p = seqs[i].params
            ids = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
            if ids:
                logits[i, ids] = float("-inf")
        return logits

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence], greedy: torch.Tensor) -> torch.Tensor:
        params = [s.params for s in seqs]
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params])
        logits = logits / temps[:, None]
        top_k = torch.tensor([p.top_k for p in params]) if any(p.top_k for p in params) else None
        top_p = torch.tensor([p.top_p for p in params]) if any(p.top_p < 1.0 for p in params) else None
        min_p = torch.tensor([p.min_p for p in params]) if any(p.min_p > 0 for p in params) else None
        probs = filter_logits(logits, top_k, top_p, min_p).softmax(dim=-1)
        noise = torch.empty_like(probs)
        seeded = [i for i, p in enumerate(params) if p.seed is not None and not bool(greedy[i])]
        unseeded = [i for i, p in enumerate(params) if p.seed is None and not bool(greedy[i])]
        if unseeded:
            idx = torch.tensor(unseeded)
            noise[idx] = torch.empty(len(unseeded), probs.shape[1]).exponential_()
        for i in seeded:
            s = seqs[i]
            gen = torch.Generator().manual_seed(seed_for(s.params.seed, s.index, s.num_output_tokens))
            noise[i].exponential_(generator=gen)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _logprobs(raw: torch.Tensor, seqs: list[Sequence], token_ids: list[int]) -> list[Logprob | None]:
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        result: list[Logprob | None] = [None] * len(seqs)
        if not rows:
            return result
        lp = torch.log_softmax(raw[rows], dim=-1)
        top_n = max(seqs[i].params.logprobs for i in rows)
        top_vals, top_ids = lp.topk(top_n, dim=-1) if top_n else (None, None)
        chosen = lp.gather(1, torch.tensor([token_ids[i] for i in rows])[:, None])[:, 0].tolist()
        for j, i in enumerate(rows):
            n = seqs[i].params.logprobs
            top = list(zip(top_ids[j, :n].tolist(), top_vals[j, :n].tolist())) if n else []
            result[i] = Logprob(token_ids[i], chosen[j], top)
        return result
