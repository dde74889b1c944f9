"""Sampling for one step: the rows' parameters as flat arrays, then the fused kernel.

The arrays are built with a few numpy operations per step: each request's parameters are turned into
a row once, and only rows that use penalties or min_tokens cost per-row Python. Each row draws from
its own random stream keyed by (seed, sample index, output position): a seeded request's tokens do not
depend on its batch mates and survive preemption. The kernel draws with the exponential race (argmax
of p_i / E_i, E_i ~ Exp(1)), an exact draw from p.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from scalellm import ops
from scalellm.engine.cuda_graphs import graphable_sampling
from scalellm.engine.sequence import Sequence
from scalellm.ops.sampling_batch import SamplingBatch
from scalellm.ops.cuda.transfer import Readback, Transfer
from scalellm.outputs import Logprob
from scalellm.sampling_params import SamplingParams

# Columns of a request's parameter row.
_TEMPERATURE, _TOP_K, _TOP_P, _MIN_P, _PRESENCE, _FREQUENCY, _REPETITION, _NUM_TOP, _SPECIAL = range(9)


def _param_row(p: SamplingParams) -> tuple:
    row = p.__dict__.get("_sampling_row")
    if row is None:
        penalized = p.repetition_penalty != 1.0 or p.presence_penalty != 0 or p.frequency_penalty != 0
        row = (p.temperature, p.top_k, p.top_p, p.min_p, p.presence_penalty, p.frequency_penalty,
               p.repetition_penalty, -1 if p.logprobs is None else p.logprobs,
               1.0 if penalized or p.min_tokens > 0 else 0.0)
        p.__dict__["_sampling_row"] = row
    return row


def sampling_arrays(seqs: list[Sequence], eos_token_ids: list[int], vocab: int) -> dict[str, np.ndarray]:
    """The rows' sampling inputs as numpy arrays named as SamplingBatch's fields. A row's random stream is
    keyed on the device by (seed, index, position): the output position of the token it draws, counting
    a token still being sampled by the step in flight (one step ahead)."""
    rows = len(seqs)
    table = np.array([_param_row(s.params) for s in seqs], dtype=np.float64).reshape(rows, 9)
    seeds = np.fromiter([s.seed for s in seqs], np.uint64, rows)
    indices = np.fromiter([s.index for s in seqs], np.int64, rows)
    positions = np.fromiter([s.num_output_tokens + s.num_in_flight for s in seqs], np.int64, rows)
    pen_offsets = np.zeros(rows + 1, np.int32)
    ban_offsets = np.zeros(rows + 1, np.int32)
    pen_tokens: list[int] = []
    pen_counts: list[int] = []
    ban_tokens: list[int] = []
    for i in np.flatnonzero(table[:, _SPECIAL]).tolist():  # only rows with penalties or min_tokens
        s, p = seqs[i], seqs[i].params
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            counts = Counter(s.token_ids[s.prompt_len:])
            if p.repetition_penalty != 1.0:
                for t in set(s.token_ids[:s.prompt_len]):
                    counts.setdefault(t, 0)
            for t, c in counts.items():
                if t < vocab:
                    pen_tokens.append(t)
                    pen_counts.append(c)
        pen_offsets[i + 1] = len(pen_tokens)
        if s.num_output_tokens + s.num_in_flight < p.min_tokens:
            ban_tokens += [t for t in p.stop_token_ids if t < vocab]
            if not p.ignore_eos:
                ban_tokens += [t for t in eos_token_ids if t < vocab]
        ban_offsets[i + 1] = len(ban_tokens)
    # rows without entries repeat the previous offset
    np.maximum.accumulate(pen_offsets, out=pen_offsets)
    np.maximum.accumulate(ban_offsets, out=ban_offsets)

    def f32(col):
        return np.ascontiguousarray(table[:, col], dtype=np.float32)

    def i32(x):
        return np.ascontiguousarray(x, dtype=np.int32)
    return dict(temperature=f32(_TEMPERATURE), top_k=i32(table[:, _TOP_K]), top_p=f32(_TOP_P), min_p=f32(_MIN_P),
                presence=f32(_PRESENCE), frequency=f32(_FREQUENCY), repetition=f32(_REPETITION),
                pen_offsets=pen_offsets, pen_tokens=i32(pen_tokens), pen_counts=i32(pen_counts),
                ban_offsets=ban_offsets, ban_tokens=i32(ban_tokens), seeds=seeds.view(np.int64), indices=indices,
                positions=positions, num_top=i32(table[:, _NUM_TOP]))


def build_sampling_batch(seqs: list[Sequence], eos_token_ids: list[int], vocab: int) -> SamplingBatch:
    return SamplingBatch(**{k: torch.from_numpy(v) for k, v in sampling_arrays(seqs, eos_token_ids, vocab).items()})


def needs_host_tokens(seq: Sequence) -> bool:
    """Whether sampling the sequence's next token reads its newest token on the host: a grammar to
    advance, penalty counts, bad words to match (one step ahead waits for such a sequence's ids)."""
    p = seq.params
    return (seq.grammar is not None or bool(p.bad_words) or p.repetition_penalty != 1.0
            or p.presence_penalty != 0 or p.frequency_penalty != 0)


def _is_plain_greedy(row: tuple) -> bool:
    return row[_TEMPERATURE] == 0 and not row[_SPECIAL] and row[_NUM_TOP] < 0


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[Logprob | None]


class Sampler:
    def __init__(self, eos_token_ids: list[int], kernel_device: torch.device | None = None,
                 logits_processor=None, vocab_size: int = 0):
        """kernel_device: where the CUDA sampling kernel runs (the batch's arrays go there in one copy);
        None on the CPU path. logits_processor: applies grammar masks, biases and bans in place."""
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self.logits_processor = logits_processor
        self.transfer = Transfer(kernel_device) if kernel_device is not None else None
        self.readback = Readback(kernel_device if kernel_device is not None else torch.device("cpu"))

    def graph_mode(self, seqs: list[Sequence]) -> tuple[str, dict | None]:
        """How a graphed decode step samples these rows: "greedy" or "sample" (with the rows' arrays), each
        "-masked" when rows have grammar masks, allowed tokens or bad words (the graph applies the
        batch's bitmask, in the arrays), or ("forward", None) when the host must act on the logits first
        (logit biases, logprobs, long penalty lists): the graph then stops at the forward pass."""
        if any(s.params.logprobs is not None for s in seqs):
            return "forward", None
        arrays: dict = {}
        if self.logits_processor is not None and any(s.params.processes_logits for s in seqs):
            masks = self.logits_processor.graph_masks(seqs)
            if masks is None:
                return "forward", None
            arrays["bitmask"] = masks
        mode = "greedy" if all(_is_plain_greedy(_param_row(s.params)) for s in seqs) else "sample"
        if mode == "sample":
            arrays.update(sampling_arrays(seqs, self.eos_token_ids, self.vocab_size))
            if not graphable_sampling(arrays):
                return "forward", None
        return (mode + "-masked" if "bitmask" in arrays else mode), arrays or None

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        return self.collect(self.launch(logits, seqs))

    def launch(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple:
        """Start sampling (asynchronous on a GPU) -> (seqs, the sampled ids on the device, the readback
        collect() reads). logits: [rows, vocab] in any float dtype (greedy rows read them as they are; the
        sampling kernel takes float32)."""
        if self.logits_processor is not None and any(s.params.processes_logits for s in seqs):
            self.logits_processor(logits, seqs)
        if all(_is_plain_greedy(_param_row(s.params)) for s in seqs):
            tokens = ops.greedy_tokens(logits)
            return seqs, tokens, self.readback.start([tokens])
        logits = logits.float()
        arrays = sampling_arrays(seqs, self.eos_token_ids, logits.shape[-1])
        max_top = max(1, int(arrays["num_top"].max()))
        if self.transfer is not None:
            batch = SamplingBatch(**self.transfer(arrays))
        else:
            batch = SamplingBatch(**{k: torch.from_numpy(v) for k, v in arrays.items()})
        return self.sampled(seqs, *ops.fused_sample(logits, batch, max_top))

    def sampled(self, seqs: list[Sequence], tokens: torch.Tensor, chosen=None, top_ids=None, top_lp=None) -> tuple:
        """What launch() returns, for tokens sampled elsewhere (a whole-step graph): their copies started."""
        wanted = [tokens] + ([chosen, top_ids, top_lp] if any(s.params.logprobs is not None for s in seqs) else [])
        return seqs, tokens, self.readback.start(wanted)

    def sample_rows_alone(self, logits: torch.Tensor, seqs: list, fail) -> tuple:
        """After sampling the batch raised: sample each row on its own; a row that raises ends its request
        (fail(request_id, stage, error)). Masks are idempotent; biases already added to a row are not
        added again. Returns what the engine collects: (rows kept, None, their SampleResult)."""
        processor = self.logits_processor
        processor.skip_bias = frozenset(processor.biased)
        kept, tokens, logprobs = [], [], []
        try:
            for i, seq in enumerate(seqs):
                if seq.finished:
                    continue
                try:
                    result = self(logits[i:i + 1], [seq])
                except Exception as e:
                    fail(seq.request_id, "sampling", e)
                    continue
                kept.append(seq)
                tokens += result.token_ids
                logprobs += result.logprobs
        finally:
            processor.skip_bias = frozenset()
        return kept, None, SampleResult(tokens, logprobs)

    def collect(self, launched: tuple) -> SampleResult:
        """The sampled tokens on the host (the copies launch() started; the host waits here, and only here)."""
        seqs, _, handle = launched
        parts = Readback.read(handle)
        token_ids = parts[0].tolist()
        logprobs: list[Logprob | None] = [None] * len(seqs)
        if len(parts) > 1:
            chosen_l, ids_l, lp_l = (p.tolist() for p in parts[1:])
            for i, seq in enumerate(seqs):
                n = seq.params.logprobs
                if n is not None:
                    logprobs[i] = Logprob(token_ids[i], chosen_l[i], list(zip(ids_l[i][:n], lp_l[i][:n])))
        return SampleResult(token_ids, logprobs)
