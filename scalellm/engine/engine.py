"""The synchronous engine core: admit requests, step the model, and report what each step produced."""
from __future__ import annotations

import contextlib
import itertools
import logging
import time
from dataclasses import dataclass

import torch

from scalellm.config import EngineConfig
from scalellm.engine.block_manager import BlockManager
from scalellm.engine.continuation import resumed_sequences
from scalellm.engine.detokenizer import Detokenizer
from scalellm.engine.logits_processors import LogitsProcessor, prepare
from scalellm.engine.model_runner import ModelRunner, kv_bytes_per_token
from scalellm.engine.output_processor import append_token_id, detokenize_new, take_delta
from scalellm.engine.sampler import Sampler
from scalellm.engine.scheduler import Scheduler
from scalellm.engine.sequence import Sequence
from scalellm.engine.spec_decode import DraftRow, SpeculativeConfig, Speculator, sampler_rows
from scalellm.engine.spec_decode.draft_model import DraftModel, load_draft_model
from scalellm.engine.threads import default_compute_threads, set_compute_threads  # noqa: F401 (re-exported)
from scalellm.engine.validation import validate_prompt
from scalellm.model.loader import LoadedModel, load_model
from scalellm.ops import jit
from scalellm.outputs import StreamDelta
from scalellm.sampling_params import SamplingParams
from scalellm.structured import GrammarCompiler

log = logging.getLogger(__name__)


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs) and len(self.seqs) == self.params.num_to_run


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        loaded = loaded or load_model(config.model, config.dtype, config.device, config.max_model_len,
                                       config.quantization)
        self.loaded = loaded
        self.weight_bytes = loaded.model.weight_bytes  # resident weight memory, in /metrics
        self.num_threads = config.num_threads or default_compute_threads(loaded.model)
        set_compute_threads(self.num_threads)
        self.tokenizer = loaded.tokenizer
        self.model_config = loaded.config
        context = loaded.config.max_position_embeddings  # a sliding window limits attention, not the context
        self.max_model_len = min(config.max_model_len or context, context)
        spec = config.speculative_config
        draft = load_draft_model(spec, config, loaded) if spec is not None and spec.model else None
        per_block = kv_bytes_per_token(loaded.model) * config.block_size
        if draft is not None:  # the draft's pages beside the target's, under the same block ids
            per_block += kv_bytes_per_token(draft.model) * config.block_size
        num_blocks = config.num_kv_blocks or max(1, config.kv_cache_memory // per_block)
        self.runner = ModelRunner(loaded.model, num_blocks, config.block_size, self.max_model_len,
                                  config.cuda_graph_max_batch)
        self.draft_model = DraftModel(draft, num_blocks, config.block_size, self.max_model_len) if draft else None
        self._fresh_scheduler()
        self.detokenizer = Detokenizer(self.tokenizer, loaded.config.vocab_size)
        self.eos_token_ids = frozenset(loaded.config.eos_token_ids)
        vocab = loaded.config.vocab_size
        self.grammars = GrammarCompiler(self.tokenizer, vocab, sorted(self.eos_token_ids), config.compact_json)
        self.logits_processor = LogitsProcessor(vocab)
        self.sampler = Sampler(sorted(self.eos_token_ids), self.runner.device if self.runner.cuda_kernels else None,
                               self.logits_processor)
        self.speculator = self._speculator(spec)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        # detokenize a step's tokens while the device computes the next (on the CUDA kernels by default)
        self.overlap = self.runner.cuda_kernels if config.overlap_steps is None else config.overlap_steps
        self._pending: list[Sequence] = []  # sequences whose newest token awaits its text
        self._replayed: list[StreamDelta] = []  # continuations' replayed deltas, out with the next step's
        # requests a step ended because handling them raised: (request id, stage, error), until taken
        self.failures: list[tuple[str, str, BaseException]] = []
        self.num_steps = 0  # steps that ran the model, and their time in the forward pass and sampling
        self.forward_seconds = 0.0
        self._warm_up()
        log.info("KV cache: %d blocks of %d tokens (%d tokens)", num_blocks, config.block_size,
                 num_blocks * config.block_size)

    def _speculator(self, config: SpeculativeConfig | None) -> Speculator | None:
        if config is None:
            return None
        # Rows a step can verify nearly for free: on the CPU a decode step costs about the same up to
        # ~32 rows (the weights are read once either way); a GPU has far more.
        rows = 32 if self.runner.device.type == "cpu" else 256
        return Speculator(config, self.max_model_len, rows, self.draft_model)

    def _fresh_scheduler(self) -> None:
        c = self.config
        self.block_manager = BlockManager(self.runner.kv_cache.shape[2], c.block_size, c.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, c.max_num_seqs, c.max_num_batched_tokens)
        self.scheduler.on_release = self._release

    def _release(self, seq: Sequence) -> None:
        self.runner.release(seq)
        if self.draft_model is not None:
            self.draft_model.release(seq)

    def _warm_up(self) -> None:
        """Compile (or load from the cache) every kernel a request can reach, before serving: the
        model's at both kernel sizes, then a few requests through whole steps (sampling with every
        option, logprobs, n > 1). The KV cache, block manager and scheduler start afresh afterwards."""
        start, first = time.perf_counter(), len(jit.compiles())
        with jit.warming_up():
            self.runner.warm_up()
            if self.draft_model is not None:
                self.draft_model.warm_up()
            prompt = [t % self.model_config.vocab_size for t in range(1, min(10, self.max_model_len - 3))]
            everything = SamplingParams(n=2, max_tokens=3, min_tokens=1, temperature=0.8, top_k=5, top_p=0.9,
                                        min_p=0.05, presence_penalty=0.5, frequency_penalty=0.5,
                                        repetition_penalty=1.1, seed=0, logprobs=2, stop_token_ids=[0])
            for i, params in enumerate((SamplingParams(temperature=0, max_tokens=2), everything,
                                        SamplingParams(temperature=1.0, max_tokens=2))):
                with contextlib.suppress(ValueError):  # a context or KV cache too small for it
                    self.add_request(f"warm-up-{i}", prompt, params)
            while self.has_unfinished():
                self.step()
        self.runner.kv_cache.zero_()
        self._fresh_scheduler()
        self.num_steps, self.forward_seconds = 0, 0.0
        if self.speculator is not None:  # counters from zero
            self.speculator = self._speculator(self.speculator.config)
        log.info("warm-up took %.1f s: %s", time.perf_counter() - start, jit.summary(first))

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    # -- admission -----------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_prompt(prompt_token_ids, params, self.model_config.vocab_size, self.max_model_len,
                        self.block_manager)

    def add_request(self, request_id: str, prompt: str | list[int] | None, params: SamplingParams,
                    prompt_token_ids: list[int] | None = None) -> Request:
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if prompt_token_ids is None:
            if isinstance(prompt, str):
                if not prompt:
                    raise ValueError("prompt must not be empty")
                prompt_token_ids = self.tokenize(prompt)
            elif isinstance(prompt, (list, tuple)):
                prompt_token_ids, prompt = list(prompt), None
            else:
                raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        self.validate_prompt(prompt_token_ids, params)
        changes = prepare(params, self.tokenizer, self.model_config.vocab_size) if params.processes_logits else None
        compiled = None
        if params.structured_outputs is not None:  # compiled already by a server; else here (cached)
            compiled = params.compiled_grammar or self.grammars.compile(params.structured_outputs)
        now = time.monotonic()
        if params.continuation is not None:
            return self._add_continuation(request_id, prompt, prompt_token_ids, params, compiled, changes, now)
        grammar = compiled.new_matcher() if compiled is not None else None
        seq = Sequence(next(self._seq_ids), request_id, 0, list(prompt_token_ids), len(prompt_token_ids),
                       params, now, pending_forks=params.n - 1, grammar=grammar, logits_changes=changes)
        request = Request(request_id, prompt, list(prompt_token_ids), params, [seq], now)
        self.requests[request_id] = request
        self.scheduler.add(seq)
        return request

    def _add_continuation(self, request_id, prompt, prompt_token_ids, params, compiled, changes, now) -> Request:
        """A generation resumed from its choices' earlier output (engine/continuation.py)."""
        def new_sequence(index: int) -> Sequence:
            return Sequence(next(self._seq_ids), request_id, index, list(prompt_token_ids), len(prompt_token_ids),
                            params, now, grammar=compiled.new_matcher() if compiled is not None else None,
                            logits_changes=changes)

        seqs, replayed = resumed_sequences(new_sequence, params, self.detokenizer, self.eos_token_ids,
                                           self.max_model_len, advance_grammar)
        request = Request(request_id, prompt, list(prompt_token_ids), params, seqs, now)
        self._replayed += replayed
        if not request.finished:
            self.requests[request_id] = request
        for seq in seqs:
            if not seq.finished:
                self.scheduler.add(seq)
        return request

    def abort_request(self, request_id: str) -> bool:
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work or bool(self._pending) or bool(self._replayed)

    def take_failures(self) -> list[tuple[str, str, BaseException]]:
        """The requests ended by a fault since the last call: (request id, stage, error)."""
        failures, self.failures = self.failures, []
        return failures

    def _fail(self, request_id: str, stage: str, error: BaseException) -> None:
        """End one request whose handling raised (its blocks are freed); the batch goes on without it."""
        log.error("request %s failed in %s; ending it", request_id, stage, exc_info=error)
        if self.abort_request(request_id):
            self.failures.append((request_id, stage, error))

    # -- stepping ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StreamDelta]:
        """Schedule and run one step. Each sampled token is appended (with the stops that need no text)
        before the next step is scheduled; its text comes after. With overlap on, a step's tokens are
        detokenized during the next step, while the device computes it: their deltas come one step
        later, and a stop string ends its sequence one step later (the extra token is dropped)."""
        replayed, self._replayed = self._replayed, []
        if self.speculator is not None:
            self.speculator.plan(self.scheduler.running, len(self.scheduler.waiting))
        batch = self.scheduler.schedule()
        if self.draft_model is not None:
            self.speculator.fill([s for s, _ in batch.items])
        start = time.perf_counter()
        launched = self._launch(batch) if batch.items else None
        if self.overlap:
            deltas = self._detokenize_pending()  # the previous step's tokens, while the device works
            if launched is not None:
                self._collect(launched)
                self._count_step(start)
        else:
            if launched is not None:
                self._collect(launched)
                self._count_step(start)
            deltas = self._detokenize_pending()
        return replayed + deltas if replayed else deltas

    def _count_step(self, start: float) -> None:
        """The forward pass and sampling of one step (with overlap, the detokenizing done meanwhile too)."""
        self.num_steps += 1
        self.forward_seconds += time.perf_counter() - start

    def _launch(self, batch) -> tuple:
        """The forward pass (a fault there is the whole batch's), then sampling started."""
        decodes = [s for s, n in batch.items if n == 1]
        prefills = [(s, n) for s, n in batch.items if n > 1]
        logits, ready = self.runner.run(decodes, prefills)
        bs = self.block_manager.block_size
        for seq, n in batch.items:
            if seq.draft:  # it moves by what is accepted (_collect_verified)
                continue
            seq.num_computed += n
            if seq.num_computed // bs > len(seq.block_hashes):
                self.block_manager.register_full_blocks(seq)
        ready = sampler_rows(ready)  # a verifying sequence's rows are DraftRows
        rows = None  # logits row of each ready sequence, once forks share their parent's row
        num_ready = len(ready)
        for row in range(num_ready):
            if ready[row].pending_forks:
                rows = rows or list(range(num_ready))
                children = self._fork(ready[row])
                ready.extend(children)
                rows.extend([row] * len(children))
        if rows is not None:
            logits = logits[rows]
        try:
            started = self.sampler.launch(logits, ready)
        except Exception:
            return self.sampler.sample_rows_alone(logits, ready, self._fail)
        if self.draft_model is not None:
            self.speculator.rejection_sample(logits, ready)
        return ready, started, None

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

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """Make the other n - 1 samples of a request whose prompt was just computed: they share the
        parent's full prompt blocks and recompute only the partial last block next step."""
        request = self.requests[parent.request_id]
        full_blocks = parent.num_computed // self.block_manager.block_size
        children = []
        for index in range(1, parent.pending_forks + 1):
            child = Sequence(next(self._seq_ids), parent.request_id, index, parent.token_ids[:parent.prompt_len],
                             parent.prompt_len, parent.params, parent.arrival_time,
                             num_cached_tokens=parent.num_cached_tokens, prefix_looked_up=True,
                             first_scheduled_time=parent.first_scheduled_time,
                             grammar=parent.grammar.deep_copy() if parent.grammar is not None else None,
                             logits_changes=parent.logits_changes)
            self.block_manager.share_prefix(parent, child, full_blocks)
            self.scheduler.add_running(child)
            request.seqs.append(child)
            children.append(child)
        parent.pending_forks = 0
        return children

    # -- introspection -------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": bm.usage,
            "kv_blocks_used": bm.num_used_blocks,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "block_size": bm.block_size,
            "num_blocks": bm.num_blocks,
            "weight_bytes": self.weight_bytes,
            "steps": self.num_steps,
            "step_forward_seconds": self.forward_seconds,
            "grammar_mask_seconds": self.logits_processor.mask_seconds,
            "grammar_mask_steps": self.logits_processor.mask_steps,
            "grammars_compiled": self.grammars.num_compiled,
            **(self.speculator.stats() if self.speculator is not None else {}),
        }


def advance_grammar(seq: Sequence, token: int) -> None:
    """Feed the sampled token to the sequence's matcher; a grammar that admits nothing more ends the
    sequence (finish_reason "stop"), as a sampled EOS would one step later."""
    if not seq.grammar.consume_token(token):
        log.warning("request %s: token %d rejected by its grammar (%s); ending it", seq.request_id, token,
                    seq.grammar.get_error())
        seq.finish_reason = "stop"
    elif seq.grammar.is_stopped():
        seq.finish_reason = "stop"

