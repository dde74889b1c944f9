"""What a request reads from its prompt's positions, not only from the last: each prompt token's logprob
(scoring: vLLM's prompt_logprobs, OpenAI's echo with logprobs) or an embedding's pool.

The runner asks wanted_rows() which rows of a prompt chunk a sequence needs and hands them back after
the forward pass (final-normed hidden states, or their logits); record() files them on the sequence.
Such sequences compute their whole prompt: the prefix cache keeps K/V, not logits or hidden states.
"""
from __future__ import annotations

import torch

from scalellm import ops
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
    targets_l = seq.token_ids[first + 1:first + 1 + count]
    targets = torch.tensor(targets_l, dtype=torch.long, device=rows.device)
    chosen, ranks = ops.token_logprobs(rows, targets)
    k = seq.params.prompt_logprobs
    tops: list = [[]] * count
    if k:
        values, ids = rows.topk(k, dim=-1)
        log_total = rows.gather(1, targets[:, None])[:, 0] - chosen.to(rows.device)  # each row's logsumexp
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), (values - log_total[:, None]).tolist())]
    for token, logprob, rank, top in zip(targets_l, chosen.tolist(), ranks.tolist(), tops):
        seq.prompt_logprobs.append(Logprob(token, logprob, top, rank))
