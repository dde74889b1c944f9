"""The synchronous engine core: admit requests, step the model, and report what each step produced."""
from __future__ import annotations

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
from scalellm.engine.lora_manager import new_lora_manager
from scalellm.engine.model_runner import ModelRunner, kv_bytes_per_token, split_batch
from scalellm.engine.output_processor import advance_grammar
from scalellm.engine.pooling import Pool, load_pooler_config
from scalellm.engine.pooling import resolve as resolve_pooling
from scalellm.engine.prompt_outputs import record as record_prompt_rows
from scalellm.engine.sampler import Sampler, needs_host_tokens
from scalellm.engine.scheduler import Scheduler
from scalellm.engine.sequence import Sequence
from scalellm.engine.spec_decode import SpeculativeConfig, Speculator, sampler_rows
from scalellm.engine.spec_decode.draft_model import DraftModel, load_draft_model
from scalellm.engine.stats import engine_stats
from scalellm.engine.step_outputs import StepOutputs
from scalellm.engine.threads import default_compute_threads, set_compute_threads  # noqa: F401 (re-exported)
from scalellm.engine.validation import validate_prompt
from scalellm.engine.warm_up import warm_up
from scalellm.model.loader import LoadedModel, load_model
from scalellm.lora_request import LoRARequest
from scalellm.outputs import StreamDelta
from scalellm.pooling_params import PoolingParams
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


class LLMEngine(StepOutputs):
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
        self.loras = new_lora_manager(config, loaded)
        self.runner = ModelRunner(loaded.model, num_blocks, config.block_size, self.max_model_len,
                                  config.cuda_graph_max_batch, self.loras, config.max_num_batched_tokens)
        self.draft_model = DraftModel(draft, num_blocks, config.block_size, self.max_model_len) if draft else None
        self._fresh_scheduler()
        self.detokenizer = Detokenizer(self.tokenizer, loaded.config.vocab_size)
        self.eos_token_ids = frozenset(loaded.config.eos_token_ids)
        vocab = loaded.config.vocab_size
        self.pooler_config = load_pooler_config(loaded.path, config.pooler_config)
        self.grammars = GrammarCompiler(self.tokenizer, vocab, sorted(self.eos_token_ids), config.compact_json)
        self.logits_processor = LogitsProcessor(vocab)
        self.sampler = Sampler(sorted(self.eos_token_ids), self.runner.device if self.runner.cuda_kernels else None,
                               self.logits_processor, vocab)
        self.speculator = self._speculator(spec)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        # detokenize a step's tokens while the device computes the next (on the CUDA kernels by default)
        self.overlap = self.runner.cuda_kernels if config.overlap_steps is None else config.overlap_steps
        ahead = config.async_scheduling  # (EngineConfig refuses it with speculative decoding)
        self.async_scheduling = self.runner.device.type == "cuda" and spec is None if ahead is None else ahead
        self._in_flight = None  # one step ahead: the launched step whose ids are not read yet
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
        self.scheduler = Scheduler(self.block_manager, c.max_num_seqs, c.max_num_batched_tokens,
                                   c.max_loras if c.enable_lora else None, c.mixed_prefill_tokens)
        self.scheduler.on_release = self._release

    def _release(self, seq: Sequence) -> None:
        self.runner.release(seq)
        if self.draft_model is not None:
            self.draft_model.release(seq)

    def _warm_up(self) -> None:
        warm_up(self)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    # -- admission -----------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_prompt(prompt_token_ids, params, self.model_config.vocab_size, self.max_model_len,
                        self.block_manager)
        if params.pooling is not None:
            self.pooling(params.pooling)
        if params.lora_name is not None:
            self.lora_salt(params.lora_name)

    def lora_salt(self, name: str) -> tuple[str, int]:
        """A request's adapter checked (ValueError if not served): its prefix-cache salt."""
        if self.loras is None:
            raise ValueError(f"model {name!r} names a LoRA adapter, and LoRA is not enabled (--enable-lora)")
        return self.loras.check(name)

    def pooling(self, params: PoolingParams) -> PoolingParams:
        """An embedding request's pooling, the model's defaults filled in (ValueError if it cannot be had)."""
        return resolve_pooling(params, self.pooler_config, self.model_config.hidden_size)

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
        if params.pooling is not None:
            seq.pool = Pool(self.pooling(params.pooling))
        if params.lora_name is not None:
            seq.cache_salt = self.lora_salt(params.lora_name)
        request = Request(request_id, prompt, list(prompt_token_ids), params, [seq], now)
        self.requests[request_id] = request
        self.scheduler.add(seq)
        return request

    def _add_continuation(self, request_id, prompt, prompt_token_ids, params, compiled, changes, now) -> Request:
        """A generation resumed from its choices' earlier output (engine/continuation.py)."""
        salt = self.lora_salt(params.lora_name) if params.lora_name is not None else None

        def new_sequence(index: int) -> Sequence:
            return Sequence(next(self._seq_ids), request_id, index, list(prompt_token_ids), len(prompt_token_ids),
                            params, now, grammar=compiled.new_matcher() if compiled is not None else None,
                            logits_changes=changes, cache_salt=salt)

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

    def add_lora(self, request: LoRARequest) -> None:
        """Register a LoRA adapter (read and checked now; ValueError if it cannot be served)."""
        if self.loras is None:
            raise ValueError("LoRA is not enabled (enable_lora=True, --enable-lora)")
        self.loras.add(request)

    def remove_lora(self, name: str) -> None:
        """New requests for the adapter are refused at once; it goes when its running ones finish."""
        if self.loras is None or not self.loras.serves(name):
            raise KeyError(name)
        self.loras.remove(name)

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
        return (self.scheduler.has_work or bool(self._pending) or bool(self._replayed)
                or self._in_flight is not None)

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
        later, and a stop string ends its sequence one step later (the extra token is dropped).

        With async scheduling, step N+1 is scheduled and launched before step N's ids are read: a
        sequence's newest token is read by the next step on the device, the host waits for step N's ids
        only after step N+1 is queued, and a sequence that step N ended has its step N+1 row dropped.
        When a sequence of step N needs its token on the host to be sampled again (a grammar to advance,
        penalty counts, bad words), step N's ids are read first: that step runs synchronously."""
        replayed, self._replayed = self._replayed, []
        if self.loras is not None and self.loras.unloading:
            self.loras.drop_unused({r.params.lora_name for r in self.requests.values()})
        ahead, self._in_flight = self._in_flight, None
        if ahead is not None and any(needs_host_tokens(s) for s in ahead[0] if not s.finished):
            self._collect(ahead)
            ahead = None
        if self.speculator is not None:
            self.speculator.plan(self.scheduler.running, len(self.scheduler.waiting))
        batch = self.scheduler.schedule()
        if self.draft_model is not None:
            self.speculator.fill([s for s, _ in batch.items])
        start = time.perf_counter()
        launched = self._launch(batch) if batch.items else None
        if self.async_scheduling:
            if launched is not None and launched[1] is not None:
                self._mark_in_flight(launched)
                self._in_flight = launched
            elif launched is not None:  # sampled row by row after a fault: the ids are on the host
                if ahead is not None:  # step N's first: tokens are appended in order
                    self._collect(ahead)
                    ahead = None
                self._collect(launched)
            if ahead is not None:
                self._collect(ahead)  # the device computes step N+1 meanwhile
            if launched is not None:
                self._count_step(start)
            deltas = self._detokenize_pending()
        elif self.overlap:
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
        """The forward pass (a fault there is the whole batch's), then sampling started. A decode batch
        CUDA graphs cover runs from one (sampling included when it needs nothing from the host)."""
        decodes, chunks = split_batch(batch.items)
        forking = any(s.pending_forks for s in decodes)  # a one-token prompt left: its samples fork below
        mode = None if chunks or forking else self.runner.graph_mode(decodes, self.sampler.graph_mode)
        if mode is not None:
            mode, sampling = mode
            out = self.runner.decode_step(decodes, mode, sampling)
            for seq in decodes:
                seq.num_computed += 1
                if seq.num_computed // self.block_manager.block_size > len(seq.block_hashes):
                    self.block_manager.register_full_blocks(seq)
            if mode != "forward":
                self.runner.prev_tokens = out
                return decodes, self.sampler.sampled(decodes, out), None
            return self._sample(out, list(decodes))
        logits, ready, prompt_rows = self.runner.run(decodes, chunks)
        for seq, first, rows in prompt_rows:
            try:
                record_prompt_rows(seq, first, rows)
            except Exception as e:
                self._fail(seq.request_id, "reading its prompt's outputs", e)
        bs = self.block_manager.block_size
        for seq, n in batch.items:
            if seq.draft or seq.finished:  # drafts move by what is accepted (_collect_verified); failed ones went
                continue
            seq.num_computed += n
            if seq.num_computed // bs > len(seq.block_hashes):
                self.block_manager.register_full_blocks(seq)
            if seq.params.prompt_only and seq.num_computed == seq.num_tokens:
                self._finish_prompt(seq)
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
        return self._sample(logits, ready)

    def _sample(self, logits, ready: list) -> tuple:
        try:
            started = self.sampler.launch(logits, ready)
        except Exception:
            return self.sampler.sample_rows_alone(logits, ready, self._fail)
        self.runner.prev_tokens = started[1]
        if self.draft_model is not None:
            self.speculator.rejection_sample(logits, ready)
        return ready, started, None

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
                             logits_changes=parent.logits_changes, prompt_logprobs=parent.prompt_logprobs,
                             cache_salt=parent.cache_salt)
            self.block_manager.share_prefix(parent, child, full_blocks)
            self.scheduler.add_running(child)
            request.seqs.append(child)
            children.append(child)
        parent.pending_forks = 0
        return children

    # -- introspection -------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        return engine_stats(self)
