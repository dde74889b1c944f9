"""The paged KV cache's bookkeeping: fixed-size blocks, reference counts, and prefix reuse.

A full block is identified by a hash chained over its tokens and every token before it, so two
sequences with the same prefix map to the same blocks. Freed blocks keep their hash and stay
reusable until the allocator hands them out again (least recently freed first).
"""
from __future__ import annotations

from collections import OrderedDict

from scalellm.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.block_of_hash: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of those, tokens found cached

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.hash_of[block]
        if old is not None:
            if self.block_of_hash.get(old) == block:
                del self.block_of_hash[old]
            self.hash_of[block] = None
        self.ref_counts[block] = 1
        return block

    def _share(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def reuse_prefix(self, seq: Sequence) -> None:
        """Attach cached blocks matching the sequence's leading tokens; call before its first chunk."""
        assert not seq.block_table and seq.num_computed == 0
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        # Keep at least one token to compute: a step must produce the logits to sample from.
        max_blocks = (seq.num_tokens - 1) // bs
        self.prefix_queries += seq.prompt_len
        parent = seq.cache_salt  # an adapter's K/V differ from the base model's: its own chain
        for i in range(max_blocks):
            h = hash((parent, tuple(seq.token_ids[i * bs:(i + 1) * bs])))
            block = self.block_of_hash.get(h)
            if block is None:
                break
            self._share(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed = len(seq.block_table) * bs
        seq.num_cached_tokens = min(seq.num_computed, seq.prompt_len)
        self.prefix_hits += seq.num_cached_tokens

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Give the sequence blocks for its first num_tokens tokens; False (and no change) if short."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > len(self.free):
            return False
        for _ in range(need):
            seq.block_table.append(self._take())
        return True

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Free the sequence's blocks past those its first num_tokens tokens need (rejected drafts')."""
        keep = self.blocks_needed(num_tokens)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None

    def share_prefix(self, parent: Sequence, child: Sequence, num_blocks: int) -> None:
        """Let a forked sample reuse the parent's first num_blocks (full) blocks."""
        for block in parent.block_table[:num_blocks]:
            self._share(block)
        child.block_table = parent.block_table[:num_blocks]
        child.block_hashes = parent.block_hashes[:num_blocks]
        child.num_computed = num_blocks * self.block_size

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish the hashes of blocks that became full of computed tokens, for later reuse."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else seq.cache_salt
        # min: one step ahead, the newest computed token may still be in flight (not in token_ids yet)
        for i in range(len(seq.block_hashes), min(seq.num_computed, seq.num_tokens) // bs):
            h = hash((parent, tuple(seq.token_ids[i * bs:(i + 1) * bs])))
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if self.hash_of[block] is None and h not in self.block_of_hash:
                self.hash_of[block] = h
                self.block_of_hash[h] = block
            parent = h

    def free_sequence(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = 0
