"""torch references for the sampling kernels' filters and penalties (float64-capable, per row)."""
from __future__ import annotations

import torch

from scalellm.engine.sequence import Sequence
from scalellm.sampling_params import SamplingParams


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


def run_sampler(logits: torch.Tensor, params: list[SamplingParams],
                histories: list[tuple[list[int], int]] | None = None, eos_token_ids: tuple[int, ...] = ()):
    """The project's sampler on constructed logits, one row per params; histories give each row's
    (token ids, prompt length), by default a one-token prompt and no output. The one place that builds
    engine sequences for sampling tests, so an interface change is adapted here only."""
    from scalellm.engine.sampler import Sampler

    histories = histories or [([1], 1)] * len(params)
    seqs = [Sequence(i, f"r{i}", 0, list(tokens), prompt_len, p, 0.0)
            for i, (p, (tokens, prompt_len)) in enumerate(zip(params, histories))]
    return Sampler(list(eos_token_ids))(logits.float().contiguous(), seqs)


def seeded(n: int, **params) -> list[SamplingParams]:
    """n rows with the same parameters and each its own seed, hence its own random stream."""
    return [SamplingParams(seed=i, **params) for i in range(n)]
