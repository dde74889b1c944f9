"""Rejection sampling for a draft model's sampled drafts (Leviathan et al. 2023; Chen et al. 2023):
draft x drawn from the draft's q is kept with probability min(1, p(x) / q(x)), p being the target's
distribution; the first rejected one is replaced by a draw from normalize(max(0, p - q)), and if none
is rejected the target's own sample at the next position follows. The tokens are distributed exactly
as the target's would be. Greedy requests need none of this: their drafts are kept while they equal
the target's argmax.

Both distributions are the request's: logits / temperature, then top-k, top-p and min-p, in the order
the sampling kernels apply them (grammar masks, biases and bad words are already in the target's logits).
Requests with penalties, min_tokens still to go or logprobs are not drafted for by a draft model
(speculator.py); their distribution is not this one. Random draws are keyed by (seed, sample index,
output position), so a seeded request repeats itself whatever its batch mates.
"""
from __future__ import annotations

import torch

from scalellm.engine.sequence import Sequence
from scalellm.ops.sampling_batch import stream_key

_DRAFT, _ACCEPT = 0x5D, 0xAC  # separate streams for the draft's draws and the acceptance test


def probabilities(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """The request's sampling distribution over float32 logits rows [rows, vocab]."""
    p = seq.params
    x = logits / p.temperature
    if p.top_k > 0 or p.top_p < 1.0:
        values, order = x.sort(dim=-1, descending=True)
        remove = torch.zeros_like(values, dtype=torch.bool)
        if p.top_k > 0:
            remove[:, p.top_k:] = True
        if p.top_p < 1.0:
            probs = values.masked_fill(remove, float("-inf")).softmax(dim=-1)
            remove |= (probs.cumsum(dim=-1) - probs) >= p.top_p
        x = x.scatter(1, order, values.masked_fill(remove, float("-inf")))
    probs = x.softmax(dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < probs.max(dim=-1, keepdim=True).values * p.min_p, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _generator(seq: Sequence, position: int, salt: int) -> torch.Generator:
    key = stream_key(seq.seed ^ salt, seq.index, position)
    return torch.Generator().manual_seed(key & ((1 << 63) - 1))


def draft_tokens(logits: torch.Tensor, seqs: list[Sequence], offsets: list[int]
                 ) -> tuple[list[int], list[torch.Tensor | None] | None]:
    """The draft model's next token per row (float32 logits [rows, vocab]; row i drafts output position
    seqs[i].num_output_tokens + offsets[i]) and, for sampled rows, the distribution it was drawn from."""
    greedy = logits.argmax(dim=-1).tolist()
    if all(s.params.temperature == 0 for s in seqs):
        return greedy, None
    tokens, dists = [], []
    for i, s in enumerate(seqs):
        if s.params.temperature == 0:
            tokens.append(greedy[i])
            dists.append(None)
            continue
        q = probabilities(logits[i:i + 1], s)[0]
        g = _generator(s, s.num_output_tokens + offsets[i], _DRAFT)
        tokens.append(int(torch.multinomial(q, 1, generator=g)))
        dists.append(q)
    return tokens, dists


def verify(target_logits: torch.Tensor, seq: Sequence, draft: list[int], q: torch.Tensor) -> tuple[int, int | None]:
    """(drafts accepted, the token replacing the first rejected one, or None when all were accepted and
    the target's own sample after them comes next). target_logits: float32 [len(draft) + 1, vocab]."""
    p = probabilities(target_logits[:len(draft)], seq)
    start = seq.num_output_tokens
    for j, x in enumerate(draft):
        g = _generator(seq, start + j, _ACCEPT)
        px, qx = float(p[j, x]), float(q[j, x])
        if qx > 0 and float(torch.rand(1, generator=g)) * qx < px:
            continue
        residual = (p[j] - q[j]).clamp_(min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: any draw from p will do
            residual = p[j]
        return j, int(torch.multinomial(residual, 1, generator=g))
    return len(draft), None
