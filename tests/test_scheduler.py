from scalellm.engine.block_manager import BlockManager
from scalellm.engine.scheduler import Scheduler
from scalellm.engine.sequence import Sequence, Status
from scalellm.sampling_params import SamplingParams

_ids = iter(range(10**6))


def seq(n):
    return Sequence(next(_ids), f"r{n}", 0, list(range(1, n + 1)), n, SamplingParams(), 0.0)


def complete(batch):
    for s, n in batch.items:
        s.num_computed += n
        if s.num_computed == s.num_tokens:
            s.token_ids.append(7)  # the sampled token


def test_chunked_prefill_never_stalls_decodes():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=16)
    short = seq(3)
    sched.add(short)
    complete(sched.schedule())  # short's prompt
    long = seq(50)
    sched.add(long)
    chunks = []
    while long.num_computed < 50:
        batch = sched.schedule()
        assert batch.items[0] == (short, 1)  # the running decode goes first every step
        assert batch.items[1][0] is long and batch.num_tokens <= 16
        chunks.append(batch.items[1][1])
        complete(batch)
    assert chunks == [15, 15, 15, 5]
    assert long.num_tokens == 51  # sampled once, after its last chunk


def test_max_num_seqs_and_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    a, b, c = seq(5), seq(5), seq(5)
    for s in (a, b, c):
        sched.add(s)
    batch = sched.schedule()
    assert [s for s, _ in batch.items] == [a, b] and c.status is Status.WAITING
    complete(batch)
    sched.finish(a)
    batch = sched.schedule()
    assert [s for s, _ in batch.items] == [b, c]


def test_preemption_frees_the_newest_and_requeues_it_first():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq(8), seq(7)
    sched.add(a)
    sched.add(b)
    complete(sched.schedule())  # a: 2 blocks, b: 2 blocks, pool full
    assert bm.num_free_blocks == 0
    batch = sched.schedule()  # a needs a third block for its decode: b is preempted
    assert batch.num_preempted == 1 and b.status is Status.WAITING and sched.waiting[0] is b
    assert [s for s, _ in batch.items] == [a]
    assert b.block_table == [] and b.num_computed == 0 and b.num_tokens == 8  # keeps its sampled token
    assert sched.num_preemptions == 1


def test_abort_anywhere_frees_blocks():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=8)
    a, b = seq(6), seq(20)
    sched.add(a)
    sched.add(b)
    complete(sched.schedule())  # b is mid-prefill
    sched.finish(b)
    sched.finish(a)
    assert bm.num_used_blocks == 0 and not sched.has_work


def test_mixed_prefill_cap_bounds_steps_that_carry_decodes():
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=16, max_num_batched_tokens=64, mixed_prefill_tokens=10)
    burst = [seq(12) for _ in range(4)]
    for s in burst:
        sched.add(s)
    batch = sched.schedule()  # nothing decodes yet: the whole budget goes to prompts
    assert batch.items == [(burst[0], 12), (burst[1], 12), (burst[2], 12), (burst[3], 12)]
    complete(batch)
    late = [seq(7) for _ in range(3)]
    for s in late:
        sched.add(s)
    prompt_tokens = []
    while any(s.num_computed < 7 for s in late):
        batch = sched.schedule()
        assert [s for s, _ in batch.items[:4]] == burst and all(n == 1 for _, n in batch.items[:4])
        prompt_tokens.append(sum(n for s, n in batch.items[4:] if s.num_computed < 7))
        complete(batch)
    assert prompt_tokens == [10, 10, 1]  # 7 + 3, then the second prompt's rest + 6 of the third, then 1


def test_mixed_prefill_cap_chunks_a_long_prompt():
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=16, max_num_batched_tokens=32, mixed_prefill_tokens=8)
    long = seq(40)
    sched.add(long)
    complete(sched.schedule())  # 32 of its 40 tokens, alone
    short = seq(3)
    sched.add(short)
    complete(sched.schedule())  # nothing decodes: long's last 8 and short's 3
    assert long.num_computed == 40 and short.num_computed == 3
    other = seq(30)
    sched.add(other)
    chunks = []
    while other.num_computed < 30:
        batch = sched.schedule()
        assert batch.items[:2] == [(long, 1), (short, 1)]
        chunks.append(batch.items[2][1])
        complete(batch)
    assert chunks == [8, 8, 8, 6]


def test_mixed_prefill_cap_off_by_default():
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=16, max_num_batched_tokens=32)
    a = seq(3)
    sched.add(a)
    complete(sched.schedule())
    b = seq(40)
    sched.add(b)
    assert sched.schedule().items == [(a, 1), (b, 31)]
