"""What a request reads from its prompt's positions, not only from the last: each prompt token's logprob
(scoring: vLLM's prompt_logprobs, OpenAI's echo with logprobs) or an embedding's pool.

The runner asks wanted_rows() which rows of a prompt chunk a sequence needs and hands them back after
the forward pass (final-normed hidden states, or their logits); record() files them on the sequence.
Such sequences compute their whole prompt: the prefix cache keeps K/V, not logits or hidden states.
"""
from __future__ import annotations

import torch

from scalellm.engine.sequence import Sequence
from scalellm.outputs import Logprob


def needs_prompt_rows(seq: Sequence) -> bool:
    """Whether some prompt position's output is still wanted (then the prompt is computed, not reused)."""
    if seq.pool is not None:
        return not seq.finished
    return seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.prompt_len


def wanted_rows(seq: Sequence, start: int, n: int) -> tuple[int, int] | None:
    """Offsets [lo, hi) of the rows of the chunk (positions start .. start + n - 1) the sequence needs."""
    if seq.pool is not None:
        return seq.pool.wanted(start, n, seq.prompt_len)
    if seq.prompt_logprobs is None:
        return None
    # the row at position p scores the prompt token at p + 1; the last prompt position's row samples
    lo = max(start, len(seq.prompt_logprobs) - 1)
    hi = min(start + n, seq.prompt_len - 1)
    return (lo - start, hi - start) if lo < hi else None


def record(seq: Sequence, first: int, rows: torch.Tensor) -> None:
    """rows: for an embedding, final-normed hidden states; else float32 logits of positions first ...:
    the logprob of each next prompt token, its rank, and the top prompt_logprobs alternatives."""
    if seq.pool is not None:
        seq.pool.add(rows)
        return
    count = rows.shape[0]
    targets = torch.tensor(seq.token_ids[first + 1:first + 1 + count], dtype=torch.long, device=rows.device)
    logprobs = torch.log_softmax(rows.float(), dim=-1)
    chosen = logprobs.gather(1, targets[:, None])
    ranks = (logprobs > chosen).sum(1) + 1
    k = seq.params.prompt_logprobs
    top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
    chosen_l, ranks_l = chosen[:, 0].tolist(), ranks.tolist()
    tops = list(zip(top_ids.tolist(), top_lp.tolist())) if k else None
    targets_l = seq.token_ids[first + 1:first + 1 + count]
    for i in range(count):
        top = list(zip(*tops[i])) if k else []
        seq.prompt_logprobs.append(Logprob(targets_l[i], chosen_l[i], top, ranks_l[i]))
