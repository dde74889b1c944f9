"""After each step: append sampled tokens and check the stops that need no text, then detokenize
incrementally, check stop strings and emit deltas (the second half can run while the device computes
the next step)."""
from __future__ import annotations

import logging
import time

from scalellm.engine.detokenizer import Detokenizer
from scalellm.engine.sequence import Sequence
from scalellm.outputs import Logprob, StageTimes, StreamDelta

log = logging.getLogger(__name__)


def check_stop_token(seq: Sequence, token: int, eos_token_ids: frozenset[int], max_model_len: int) -> None:
    """The stops that need no text: EOS and stop token ids (once min_tokens are out), then length."""
    p = seq.params
    if seq.num_output_tokens >= p.min_tokens:
        if not p.ignore_eos and token in eos_token_ids:
            seq.finish_reason = "stop"
            return
        if token in p.stop_token_set:
            seq.finish_reason, seq.stop_reason = "stop", token
            return
    if (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or seq.num_tokens >= max_model_len:
        seq.finish_reason = "length"


def _truncate_at_stop_string(seq: Sequence, delta_len: int) -> bool:
    p = seq.params
    start = max(0, len(seq.text) - delta_len - p.max_stop_len + 1)
    found = [(i, s) for s in p.stop_list if (i := seq.text.find(s, start)) != -1]
    if not found:
        return False
    index, stop = min(found)
    seq.text = seq.text[:index + len(stop)] if p.include_stop_str_in_output else seq.text[:index]
    seq.finish_reason, seq.stop_reason = "stop", stop
    return True


def append_token_id(seq: Sequence, token: int, logprob: Logprob | None, eos_token_ids: frozenset[int],
                    max_model_len: int) -> None:
    """A sampled token, and the stops that need no text: all the scheduler needs before the next step."""
    seq.token_ids.append(token)
    if logprob is not None:
        seq.logprobs.append(logprob)
    if seq.first_token_time is None:
        seq.first_token_time = time.monotonic()
    check_stop_token(seq, token, eos_token_ids, max_model_len)


def detokenize_new(detokenizer: Detokenizer, seq: Sequence) -> None:
    """Text for the tokens appended since the last call (one, or several after a speculative step),
    token by token, and the stop strings, which outrank a length stop at the same token (EOS and stop
    ids outrank them); a stop string inside the new tokens drops those after it. At the end, what an
    incomplete character decodes to."""
    start = time.monotonic()
    p = seq.params
    end = len(seq.token_ids)
    while seq.num_detokenized < end:
        i = seq.num_detokenized
        seq.num_detokenized += 1
        delta = detokenizer.step(seq, i)
        seq.text += delta
        last = i + 1 == end
        if (p.stop_list and (not last or seq.finish_reason in (None, "length"))
                and i + 1 - seq.prompt_len >= p.min_tokens and _truncate_at_stop_string(seq, len(delta))):
            if not last:
                del seq.token_ids[i + 1:]
                if seq.logprobs is not None:
                    del seq.logprobs[i + 1 - seq.prompt_len:]
            break
    if seq.finish_reason is not None and not isinstance(seq.stop_reason, str):
        seq.text += detokenizer.flush(seq)  # a character left incomplete at the end
    seq.detokenize_seconds += time.monotonic() - start


def append_token(detokenizer: Detokenizer, seq: Sequence, token: int, logprob: Logprob | None,
                 eos_token_ids: frozenset[int], max_model_len: int) -> None:
    """Both halves at once."""
    append_token_id(seq, token, logprob, eos_token_ids, max_model_len)
    detokenize_new(detokenizer, seq)


def take_delta(seq: Sequence) -> StreamDelta:
    """What the sequence produced since the last delta. While running, the last max_stop_len - 1
    characters are held back: they might still turn out to begin a stop string."""
    end = len(seq.text)
    if seq.finish_reason is None and seq.params.max_stop_len > 1:
        end = max(seq.emitted_text_len, end - seq.params.max_stop_len + 1)
    text = seq.text[seq.emitted_text_len:end]
    seq.emitted_text_len = end
    queue_time = None
    if seq.emitted_tokens == 0 and seq.first_scheduled_time is not None:
        queue_time = seq.first_scheduled_time - seq.arrival_time
    tokens = seq.token_ids[seq.prompt_len + seq.emitted_tokens:]
    seq.emitted_tokens += len(tokens)
    logprobs = None
    if seq.logprobs is not None:
        logprobs = seq.logprobs[seq.emitted_logprobs:]
        seq.emitted_logprobs = len(seq.logprobs)
    timings = None
    if seq.finish_reason is not None and seq.first_token_time is None:  # a prompt-only request
        seq.first_token_time = time.monotonic()
    if seq.finish_reason is not None and seq.first_token_time is not None:
        scheduled = seq.first_scheduled_time or seq.arrival_time
        timings = StageTimes(scheduled - seq.arrival_time, seq.first_token_time - scheduled,
                             time.monotonic() - seq.first_token_time, seq.detokenize_seconds)
    delta = StreamDelta(seq.request_id, seq.index, text, tokens, seq.finish_reason, seq.stop_reason,
                        logprobs, seq.prompt_len, seq.num_cached_tokens, queue_time, timings)
    if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
        delta.prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
    if seq.embedding is not None:
        delta.embedding = seq.embedding
    return delta


def advance_grammar(seq: Sequence, token: int) -> None:
    """Feed the sampled token to the sequence's matcher; a grammar that admits nothing more ends the
    sequence (finish_reason "stop"), as a sampled EOS would one step later."""
    if not seq.grammar.consume_token(token):
        log.warning("request %s: token %d rejected by its grammar (%s); ending it", seq.request_id, token,
                    seq.grammar.get_error())
        seq.finish_reason = "stop"
    elif seq.grammar.is_stopped():
        seq.finish_reason = "stop"

