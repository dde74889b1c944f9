"""What a request does to its logits before sampling: grammar masks, allowed tokens, banned words and
logit biases, applied in place to the rows that ask for them (free rows are not touched).

Per request, the fixed parts (bias arrays, the allowed-token mask, bad words' token sequences) are
built once at admission (`prepare`); per step, only the grammar masks are computed, one batch fill for
every constrained row, then one kernel call writes -inf where a row's mask bit is 0.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from scalellm import ops
from scalellm.engine.sequence import Sequence
from scalellm.sampling_params import SamplingParams
from scalellm.structured import BatchMasker, token_mask


@dataclass
class RequestLogits:
    """A request's fixed logits changes, built once."""
    bias_ids: torch.Tensor | None = None  # int64
    bias_values: torch.Tensor | None = None  # float32
    allowed: np.ndarray | None = None  # int32 mask row
    bad_words: list[list[int]] | None = None  # token sequences never to complete


def prepare(params: SamplingParams, tokenizer, vocab_size: int) -> RequestLogits | None:
    """The arrays (token ids were checked against the vocabulary by LLMEngine.validate_prompt)."""
    out = RequestLogits()
    if params.logit_bias:
        out.bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        out.bias_values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
    if params.allowed_token_ids is not None:
        out.allowed = token_mask(params.allowed_token_ids, vocab_size)
    if params.bad_words:
        seqs = set()
        for word in params.bad_words:
            for text in (word, " " + word.lstrip()):  # the word alone and after a space, as tokenizers split it
                ids = tokenizer.encode(text, add_special_tokens=False)
                if ids:
                    seqs.add(tuple(ids))
        out.bad_words = [list(s) for s in sorted(seqs)]
    if out.bias_ids is None and out.allowed is None and not out.bad_words:
        return None
    return out


class LogitsProcessor:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.masker: BatchMasker | None = None  # made on the first constrained step
        self.mask_seconds = 0.0  # time filling and applying grammar masks
        self.mask_steps = 0
        self.biased: set[int] = set()  # sequences whose rows the current call added biases to
        self.skip_bias: frozenset[int] = frozenset()  # sequences whose rows have theirs already

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Apply every row's changes to logits [rows, vocab] in place."""
        masked, masks = [], []
        grammar_rows, matchers = [], []
        self.biased.clear()
        for i, seq in enumerate(seqs):
            if seq.grammar is not None:
                grammar_rows.append(i)
                matchers.append(seq.grammar)
            fixed = seq.logits_changes
            if fixed is None:
                continue
            if fixed.bias_ids is not None and seq.seq_id not in self.skip_bias:
                row = logits[i]
                row.index_add_(0, fixed.bias_ids.to(row.device), fixed.bias_values.to(row.device, row.dtype))
                self.biased.add(seq.seq_id)
            if fixed.allowed is not None and seq.grammar is None:
                masked.append(i)
                masks.append(fixed.allowed)
            if fixed.bad_words:
                banned = _banned_tokens(fixed.bad_words, seq.output_token_ids)
                if banned:
                    logits[i, banned] = float("-inf")
        if grammar_rows:
            start = time.perf_counter()
            if self.masker is None:
                self.masker = BatchMasker(self.vocab_size)
            filled = self.masker.fill(matchers)
            for k, i in enumerate(grammar_rows):
                allowed = seqs[i].logits_changes.allowed if seqs[i].logits_changes is not None else None
                row = filled[k] if allowed is None else filled[k] & allowed
                masked.append(i)
                masks.append(row)
            self.mask_steps += 1
            self._apply(logits, masked, masks)
            self.mask_seconds += time.perf_counter() - start
        elif masked:
            self._apply(logits, masked, masks)

    def graph_masks(self, seqs: list[Sequence]) -> np.ndarray | None:
        """Every row's changes as one token bitmask [rows, words] (all ones where a row has none), for a
        step that applies them inside its CUDA graph; None when a row needs more than a mask (a bias)."""
        if any(s.logits_changes is not None and s.logits_changes.bias_ids is not None for s in seqs):
            return None
        start = time.perf_counter()
        words = -(-self.vocab_size // 32)
        out = np.full((len(seqs), words), -1, np.int32)
        grammar_rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if grammar_rows:
            if self.masker is None:
                self.masker = BatchMasker(self.vocab_size)
            out[grammar_rows] = self.masker.fill([seqs[i].grammar for i in grammar_rows])
            self.mask_steps += 1
        for i, seq in enumerate(seqs):
            fixed = seq.logits_changes
            if fixed is None:
                continue
            if fixed.allowed is not None:
                out[i] &= fixed.allowed
            if fixed.bad_words:
                banned = np.asarray(_banned_tokens(fixed.bad_words, seq.output_token_ids), np.int64)
                if len(banned):
                    words_of = out[i].view(np.uint32)
                    np.bitwise_and.at(words_of, banned >> 5, ~(np.uint32(1) << (banned & 31).astype(np.uint32)))
        self.mask_seconds += time.perf_counter() - start
        return out

    @staticmethod
    def _apply(logits: torch.Tensor, rows: list[int], masks: list[np.ndarray]) -> None:
        bitmask = torch.from_numpy(np.stack(masks))
        index = torch.tensor(rows, dtype=torch.int32)
        if logits.device.type != "cpu":
            bitmask, index = bitmask.to(logits.device, non_blocking=True), index.to(logits.device, non_blocking=True)
        ops.apply_token_bitmask(logits, index, bitmask)


def _banned_tokens(bad_words: list[list[int]], output: list[int]) -> list[int]:
    """The last token of each bad word whose other tokens the output ends with."""
    banned = []
    for ids in bad_words:
        prefix = ids[:-1]
        if not prefix or (len(output) >= len(prefix) and output[len(output) - len(prefix):] == prefix):
            banned.append(ids[-1])
    return banned
