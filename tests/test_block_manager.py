from scalellm.engine.block_manager import BlockManager
from scalellm.engine.sequence import Sequence
from scalellm.sampling_params import SamplingParams

_ids = iter(range(10**6))


def seq(tokens, prompt_len=None):
    return Sequence(next(_ids), "r", 0, list(tokens), prompt_len or len(tokens), SamplingParams(), 0.0)


def test_allocate_append_free_and_usage():
    bm = BlockManager(8, 4)
    s = seq(range(10))
    assert bm.ensure(s, 10) and len(s.block_table) == 3
    assert bm.num_used_blocks == 3 and abs(bm.usage - 3 / 8) < 1e-9
    assert bm.ensure(s, 12) and len(s.block_table) == 3  # still fits in the last block
    assert bm.ensure(s, 13) and len(s.block_table) == 4
    assert not bm.ensure(seq(range(40)), 40)  # needs 10 blocks, only 4 free: no partial allocation
    assert bm.num_free_blocks == 4
    bm.free_sequence(s)
    assert bm.num_used_blocks == 0 and s.block_table == []


def test_prefix_reuse_via_hash_chain():
    bm = BlockManager(16, 4)
    a = seq(list(range(11)))
    bm.reuse_prefix(a)
    assert a.num_computed == 0 and bm.prefix_hits == 0
    bm.ensure(a, 11)
    a.num_computed = 11
    bm.register_full_blocks(a)
    assert len(a.block_hashes) == 2
    # Same first 8 tokens: two blocks are shared; a different third block is not.
    b = seq(list(range(8)) + [99, 98, 97, 96, 95])
    bm.reuse_prefix(b)
    assert b.block_table == a.block_table[:2] and b.num_computed == 8
    assert bm.ref_counts[a.block_table[0]] == 2
    assert bm.prefix_hits == 8 and bm.prefix_queries == 11 + 13
    # Same block contents after a different first block: no match (the hash chains the prefix).
    c = seq([50, 51, 52, 53] + list(range(4, 8)) + [1])
    bm.reuse_prefix(c)
    assert c.num_computed == 0


def test_full_prompt_hit_leaves_one_token_to_compute():
    bm = BlockManager(16, 4)
    a = seq(list(range(8)))
    bm.ensure(a, 8)
    a.num_computed = 8
    bm.register_full_blocks(a)
    b = seq(list(range(8)))
    bm.reuse_prefix(b)
    assert b.num_computed == 4  # the last block is recomputed so the step yields logits


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(4, 4)
    a = seq(list(range(9)))
    bm.ensure(a, 9)
    a.num_computed = 9
    bm.register_full_blocks(a)
    a_blocks = a.block_table
    bm.free_sequence(a)
    assert bm.num_used_blocks == 0
    b = seq(list(range(9)))
    bm.reuse_prefix(b)
    assert b.num_computed == 8 and bm.num_used_blocks == 2
    assert b.block_table == a_blocks[:2] and all(bm.ref_counts[x] == 1 for x in b.block_table)


def computed_and_freed(bm, tokens):
    s = seq(tokens)
    bm.reuse_prefix(s)
    assert bm.ensure(s, len(tokens))
    s.num_computed = len(tokens)
    bm.register_full_blocks(s)
    bm.free_sequence(s)


def cached_tokens(bm, tokens) -> int:
    """How many leading tokens the cache would serve (the probe's blocks are handed back at once)."""
    probe = seq(tokens)
    bm.reuse_prefix(probe)
    hit = probe.num_computed
    bm.free_sequence(probe)
    return hit


A, B = list(range(9)), list(range(100, 109))  # two full blocks and a partial one each


def test_eviction_takes_the_least_recently_freed_block_first():
    survivors = []
    for k in range(7):  # allocate k fresh blocks, then see which cached blocks survived
        bm = BlockManager(6, 4)
        computed_and_freed(bm, A)  # freed first; a sequence frees its tail before its head
        computed_and_freed(bm, B)
        assert bm.ensure(seq([7] * 4 * k), 4 * k) and bm.num_free_blocks == 6 - k
        survivors.append((cached_tokens(bm, A), cached_tokens(bm, B)))
    # A's partial block, then A's second full block, then its first; then the same for B
    assert survivors == [(8, 8), (8, 8), (4, 8), (0, 8), (0, 8), (0, 4), (0, 0)]


def test_reusing_a_cached_prefix_makes_it_recent_again():
    bm = BlockManager(6, 4)
    computed_and_freed(bm, A)
    computed_and_freed(bm, B)
    assert cached_tokens(bm, A) == 8  # reused and freed again: now only A's partial block is older than B's
    bm.ensure(seq([7] * 16), 16)
    assert (cached_tokens(bm, A), cached_tokens(bm, B)) == (8, 0)


def test_fork_shares_blocks_with_reference_counts():
    bm = BlockManager(8, 4)
    parent = seq(list(range(10)))
    bm.ensure(parent, 10)
    child = seq(list(range(10)))
    bm.share_prefix(parent, child, 2)
    assert child.block_table == parent.block_table[:2] and child.num_computed == 8
    bm.free_sequence(parent)
    assert bm.num_used_blocks == 2  # still held by the child
    bm.free_sequence(child)
    assert bm.num_used_blocks == 0
