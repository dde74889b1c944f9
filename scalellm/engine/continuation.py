"""Resuming a generation that started elsewhere (on a replica that died mid-stream).

Each choice still running becomes its own sequence whose tokens are the prompt followed by what the
choice already produced; those count as output, so positions (the sampling keys), penalties,
min_tokens and the remaining max_tokens are as in an uninterrupted run. The earlier output is then
replayed one token at a time through everything that keeps state between tokens (the stops, the
grammar matcher, incremental detokenizing and the held-back text of stop strings): the deltas this
yields are marked `replayed`, so a server can rebuild its own per-stream state from them (text
offsets, tool-call parsing) and send on only what is new. One token per delta is how the engine
emits them, so the replay reproduces the original deltas exactly. The prompt's K/V is computed
once for all of them (the prefix cache shares its blocks), the earlier output's in the same prefill.
"""
from __future__ import annotations

from collections.abc import Callable

from scalellm.engine.detokenizer import Detokenizer
from scalellm.engine.output_processor import append_token_id, detokenize_new, take_delta
from scalellm.engine.sequence import Sequence
from scalellm.outputs import StreamDelta
from scalellm.sampling_params import SamplingParams


def resumed_sequences(new_sequence: Callable[[int], Sequence], params: SamplingParams, detokenizer: Detokenizer,
                      eos_token_ids: frozenset[int], max_model_len: int,
                      advance_grammar: Callable[[Sequence, int], None]) -> tuple[list[Sequence], list[StreamDelta]]:
    """The sequences of the choices still to run (new_sequence(index) makes one holding the prompt),
    each advanced through its earlier output, and the deltas of that replay. A choice whose replay
    ends it (it should not: it had not finished) comes back finished, its last delta not replayed."""
    seqs, deltas = [], []
    for index, output in enumerate(params.continuation):
        if output is None:
            continue
        seq = new_sequence(index)
        for token in output:
            append_token_id(seq, token, None, eos_token_ids, max_model_len)
            if seq.grammar is not None and seq.finish_reason in (None, "length"):
                advance_grammar(seq, token)
            detokenize_new(detokenizer, seq)
            delta = take_delta(seq)
            delta.timings = None
            if seq.finish_reason is not None:
                deltas.append(delta)
                break
            delta.replayed = True
            deltas.append(delta)
        seq.first_token_time = None  # this run's first token is the first one it samples
        seqs.append(seq)
    return seqs, deltas


def validate_continuation(params: SamplingParams, num_prompt_tokens: int, vocab_size: int, max_model_len: int) -> None:
    for output in params.continuation:
        if output is None:
            continue
        if any(t >= vocab_size for t in output):
            raise ValueError(f"the continuation has token ids outside the vocabulary [0, {vocab_size})")
        if num_prompt_tokens + len(output) >= max_model_len:
            raise ValueError(f"the prompt's {num_prompt_tokens} tokens and a choice's {len(output)} earlier ones "
                             f"leave no room in the model's context length of {max_model_len}")
