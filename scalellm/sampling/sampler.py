"""Sampling for one step: gather the rows' parameters into flat arrays and run the fused kernel.

Each row is computed from its own logits and its own random stream, keyed by (seed, sample index,
output position): a seeded request's tokens do not depend on its batch mates and survive preemption.
The kernel draws with the exponential race (argmax of p_i / E_i, E_i ~ Exp(1)), an exact draw from p.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scalellm import ops
from scalellm.engine.sequence import Sequence
from scalellm.outputs import Logprob
from scalellm.sampling.batch import build_sampling_batch


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[Logprob | None]


class Sampler:
    def __init__(self, eos_token_ids: list[int]):
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        batch = build_sampling_batch(seqs, self.eos_token_ids, logits.shape[-1])
        if logits.is_cuda:
            batch = batch.to(logits.device)
        tokens, chosen, top_ids, top_lp = ops.fused_sample(logits, batch)
        token_ids = tokens.tolist()
        logprobs: list[Logprob | None] = [None] * len(seqs)
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if rows:
            chosen_l, ids_l, lp_l = chosen.tolist(), top_ids.tolist(), top_lp.tolist()
            for i in rows:
                n = seqs[i].params.logprobs
                logprobs[i] = Logprob(token_ids[i], chosen_l[i], list(zip(ids_l[i][:n], lp_l[i][:n])))
        return SampleResult(token_ids, logprobs)
