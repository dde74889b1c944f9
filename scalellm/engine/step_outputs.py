"""What a step produced, taken in: sampled ids read and appended with the stops that need no text,
speculative drafts accepted, one step ahead's tokens in flight counted, then the text (LLMEngine's half
that runs after the device)."""
from __future__ import annotations

from scalellm.engine.output_processor import advance_grammar, append_token_id, detokenize_new, take_delta
from scalellm.engine.sequence import Sequence
from scalellm.engine.spec_decode import DraftRow
from scalellm.outputs import StreamDelta


class StepOutputs:
    """Mixed into LLMEngine: reads its scheduler, block manager, sampler, speculator and requests."""

    def _mark_in_flight(self, launched: tuple) -> None:
        """The step's sequences each have one more token in flight, at this row of its sampled ids."""
        max_len = self.max_model_len
        for row, seq in enumerate(launched[0]):
            seq.num_in_flight += 1
            seq.sampled_row = row
            p = seq.params
            seq.last_in_flight = ((p.max_tokens is not None and seq.num_output_tokens + seq.num_in_flight
                                   >= p.max_tokens) or seq.num_tokens + seq.num_in_flight >= max_len)

    def _finish_prompt(self, seq: Sequence) -> None:
        """A scoring or embedding request whose prompt is computed: it ends without a token."""
        seq.finish_reason = "length"
        if seq.pool is not None:
            seq.embedding = seq.pool.result()
        self.scheduler.finish(seq)
        self._pending.append(seq)

    def _collect(self, launched: tuple) -> None:
        seqs, started, sampled = launched
        if sampled is None:
            sampled = self.sampler.collect(started)
        eos, max_len = self.eos_token_ids, self.max_model_len
        tokens, logprobs = sampled.token_ids, sampled.logprobs
        i = 0
        while i < len(seqs):
            seq = seqs[i]
            if isinstance(seq, DraftRow):  # the k + 1 rows of one sequence verifying k drafts
                seq, end = seq.seq, i + 1
                while end < len(seqs) and isinstance(seqs[end], DraftRow) and seqs[end].seq is seq:
                    end += 1  # (fewer when sampling fell back to rows alone and one of them failed)
                self._collect_verified(seq, tokens[i:end], logprobs[i:end])
                i = end
                continue
            i += 1
            if seq.num_in_flight:  # one step ahead: this token is read now
                seq.num_in_flight -= 1
                seq.last_in_flight = seq.last_in_flight and seq.num_in_flight > 0
            if seq.finished:  # ended by a stop string while this step ran (overlap), or aborted
                continue
            token = tokens[i - 1]
            try:
                append_token_id(seq, token, logprobs[i - 1], eos, max_len)
                if seq.grammar is not None and seq.finish_reason in (None, "length"):
                    advance_grammar(seq, token)
            except Exception as e:
                self._fail(seq.request_id, "appending its token", e)
                continue
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
            self._pending.append(seq)

    def _collect_verified(self, seq: Sequence, tokens: list[int], logprobs: list) -> None:
        """Append the accepted drafts and the target's own next token, each through the stops (constrained
        sequences do not draft: no grammar to advance); then the sequence's computed length covers its
        accepted tokens only, and the rejected drafts' blocks go."""
        if seq.finished:
            seq.draft, seq.spec_verdict = [], None
            return
        tokens, logprobs = self.speculator.accept(seq, tokens, logprobs)
        try:
            for token, logprob in zip(tokens, logprobs):
                append_token_id(seq, token, logprob, self.eos_token_ids, self.max_model_len)
                if seq.finish_reason is not None:
                    break
        except Exception as e:
            self._fail(seq.request_id, "appending its tokens", e)
            return
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)
        else:
            seq.num_computed = seq.num_tokens - 1
            bm = self.block_manager
            if seq.num_computed // bm.block_size > len(seq.block_hashes):
                bm.register_full_blocks(seq)
            bm.trim(seq, seq.num_tokens)
        self._pending.append(seq)

    def _detokenize_pending(self) -> list[StreamDelta]:
        deltas = []
        for seq in self._pending:
            if seq.finish_reason == "abort":
                continue
            running = seq.finish_reason is None
            try:
                detokenize_new(self.detokenizer, seq)
                delta = take_delta(seq)
            except Exception as e:
                self._fail(seq.request_id, "detokenization", e)
                continue
            if running and seq.finish_reason is not None:  # a stop string
                self.scheduler.finish(seq)
            deltas.append(delta)
        self._pending.clear()
        for delta in deltas:
            if delta.finish_reason is not None:
                request = self.requests.get(delta.request_id)
                if request is not None and request.finished:
                    del self.requests[delta.request_id]
        return deltas
