"""Continuous batching with chunked prefill and preemption by recompute.

Each step gets a token budget. Running sequences go first (decodes cost one token each, plus their
speculative drafts, which shrink or go before anyone is preempted; an unfinished prompt continues with
its next chunk), then waiting sequences are admitted in arrival
order while budget, blocks and the max_num_seqs limit allow. When blocks run out, the most recently
admitted sequence is preempted: its blocks are freed and it returns to the front of the queue, to be
recomputed later (the prefix cache usually gives most of its blocks back).

A step that carries decodes carries at most `mixed_prefill_tokens` prompt tokens (None: the whole budget):
a step's time grows with its tokens, so this bounds the running streams' inter-token gap while a burst of
new prompts is admitted; steps without decodes still fill the whole budget.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from scalellm.engine.block_manager import BlockManager
from scalellm.engine.prompt_outputs import needs_prompt_rows
from scalellm.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    items: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens this step)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_loras: int | None = None, mixed_prefill_tokens: int | None = None):
        self.bm = block_manager
        self.mixed_prefill_tokens = mixed_prefill_tokens
        self.max_loras = max_loras  # LoRA adapters the running sequences may use at once (None: LoRA off)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.on_release = lambda seq: None  # told when a sequence leaves the running batch for good or a while

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        seq.status = Status.RUNNING
        self.running.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        running = self.running
        prefill_budget = self._prefill_budget(budget)
        idx = 0
        while idx < len(running) and budget > 0:
            seq = running[idx]
            if seq.last_in_flight:  # its token in flight ends it by length: nothing left to compute
                idx += 1
                continue
            if len(seq.draft) >= budget:  # drafts fit the budget or shrink
                del seq.draft[budget - 1:]
            left = seq.num_tokens + seq.num_in_flight - seq.num_computed
            if left > 1:  # a prompt (or a recompute) continues: its chunk comes out of the prefill budget
                if prefill_budget == 0:
                    idx += 1
                    continue
                left = min(left, prefill_budget)
                prefill_budget -= min(left, budget)
            n = min(left + len(seq.draft), budget)
            if seq.draft and not self.bm.ensure(seq, seq.num_computed + n):
                seq.draft = []  # drafts give way before anyone is preempted
                n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.bm.ensure(seq, seq.num_computed + n):
                victim = running.pop()
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is seq:
                    break
            else:
                batch.items.append((seq, n))
                budget -= n
                idx += 1
                continue
            break
        if batch.num_preempted:
            return batch
        loras = {s.params.lora_name for s in running} - {None} if self.max_loras else None
        skipped = 0  # waiting sequences passed over: their adapter would exceed max_loras
        held = False  # once one is, no more adapter sequences go in, so the running adapters drain (no starving)
        while len(self.waiting) > skipped and min(budget, prefill_budget) > 0 and len(running) < self.max_num_seqs:
            seq = self.waiting[skipped]
            if seq.num_in_flight:  # preempted with a token in flight: admitted again once it is read
                skipped += 1
                continue
            lora = seq.params.lora_name
            if lora is not None and loras is not None and (held or (lora not in loras and len(loras) >= self.max_loras)):
                held = True
                skipped += 1
                continue
            if not seq.prefix_looked_up:
                if not needs_prompt_rows(seq):  # the cache holds K/V, not the outputs it wants
                    self.bm.reuse_prefix(seq)
                seq.prefix_looked_up = True
            n = min(seq.num_tokens - seq.num_computed, budget, prefill_budget)
            if not self.bm.ensure(seq, seq.num_computed + n):
                break
            del self.waiting[skipped]
            if lora is not None and loras is not None:
                loras.add(lora)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            seq.status = Status.RUNNING
            running.append(seq)
            batch.items.append((seq, n))
            budget -= n
            prefill_budget -= n
        return batch

    def _prefill_budget(self, budget: int) -> int:
        """Prompt tokens this step may carry: capped when a running sequence decodes in it."""
        cap = self.mixed_prefill_tokens
        if cap is None or cap >= budget:
            return budget
        for seq in self.running:
            if seq.num_tokens + seq.num_in_flight - seq.num_computed == 1 and not seq.last_in_flight:
                return cap
        return budget

    def _preempt(self, seq: Sequence) -> None:
        seq.draft = []
        self.bm.free_sequence(seq)
        self.on_release(seq)
        seq.prefix_looked_up = False
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence wherever it is and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.status = Status.FINISHED
        self.bm.free_sequence(seq)
        self.on_release(seq)
