"""Block manager (allocation, reference counts, prefix cache) and scheduler policies,
on sequences without a model."""

from __future__ import annotations

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus

BLOCK = 4


def seq(name: str, tokens: list[int]) -> Sequence:
    return Sequence(name, tokens, SamplingParams(), generator=None, detokenizer=None)


def computed(manager: BlockManager, sequence: Sequence, num_tokens: int) -> None:
    """Pretend a step computed num_tokens more tokens of sequence."""
    sequence.num_computed_tokens += num_tokens
    manager.register_full_blocks(sequence)


def test_allocate_and_free_with_reference_counts():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    a = seq("a", list(range(10)))
    assert manager.blocks_needed(a, 10) == 3
    manager.allocate(a, 3)
    assert manager.num_free_blocks == 5 and len(a.block_table) == 3
    computed(manager, a, 10)

    b = seq("b", list(range(10)) + [99])  # same first two full blocks
    hits = manager.find_cached_prefix(b)
    assert hits == a.block_table[:2]
    manager.admit(b, hits)
    assert b.num_computed_tokens == 8
    assert [manager.blocks[i].ref_count for i in hits] == [2, 2]
    manager.free(a)
    assert [manager.blocks[i].ref_count for i in hits] == [1, 1]
    assert manager.num_used_blocks == 2
    manager.free(b)
    assert manager.num_free_blocks == 8


def test_blocks_are_cached_only_once_computed():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    a = seq("a", list(range(9)))
    manager.allocate(a, 3)
    assert manager.find_cached_prefix(seq("b", list(range(9)))) == []
    computed(manager, a, 5)  # a chunk: only the first block is complete
    assert manager.find_cached_prefix(seq("b", list(range(9)))) == a.block_table[:1]


def test_last_token_block_is_never_served_from_cache():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    a = seq("a", list(range(8)))
    manager.allocate(a, 2)
    computed(manager, a, 8)
    # Same 8 tokens: both blocks are cached, but the last token must be computed.
    assert manager.find_cached_prefix(seq("b", list(range(8)))) == a.block_table[:1]


def test_freed_blocks_stay_cached_until_reallocated_oldest_first():
    manager = BlockManager(num_blocks=4, block_size=BLOCK, enable_prefix_caching=True)
    a = seq("a", [1, 2, 3, 4, 5])
    manager.allocate(a, 2)
    computed(manager, a, 5)
    cached_block = a.block_table[0]
    manager.free(a)
    probe = seq("probe", [1, 2, 3, 4, 9])
    assert manager.find_cached_prefix(probe) == [cached_block]
    # Two never-used blocks go first; the cached one survives this allocation.
    manager.allocate(seq("c", [7] * 8), 2)
    assert manager.find_cached_prefix(probe) == [cached_block]
    manager.allocate(seq("d", [8] * 8), 2)  # now every block is taken: cache evicted
    assert manager.find_cached_prefix(probe) == []


def test_a_hash_hit_with_different_tokens_is_not_reused():
    manager = BlockManager(num_blocks=4, block_size=BLOCK, enable_prefix_caching=True)
    a = seq("a", [1, 2, 3, 4, 5])
    manager.allocate(a, 2)
    computed(manager, a, 5)
    manager.blocks[a.block_table[0]].token_ids = (9, 9, 9, 9)  # as if hashes collided
    assert manager.find_cached_prefix(seq("b", [1, 2, 3, 4, 5])) == []


def test_prefix_caching_off_never_hits():
    manager = BlockManager(num_blocks=4, block_size=BLOCK, enable_prefix_caching=False)
    a = seq("a", [1, 2, 3, 4, 5])
    manager.allocate(a, 2)
    computed(manager, a, 5)
    assert manager.find_cached_prefix(seq("b", [1, 2, 3, 4, 5])) == []


def run_step(scheduler: Scheduler) -> dict[str, int]:
    """Schedule a step and apply it as the engine would, sampling token 0."""
    batch = scheduler.schedule()
    for sequence, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
        sequence.num_computed_tokens += num_new
        scheduler.block_manager.register_full_blocks(sequence)
        if sequence.num_computed_tokens == sequence.num_tokens:
            sequence.token_ids.append(0)
    return {s.request_id: n for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)}


def test_decodes_first_then_prompt_chunks_within_budget():
    manager = BlockManager(num_blocks=64, block_size=BLOCK, enable_prefix_caching=False)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=10)
    scheduler.add(seq("short", [1, 2, 3]))
    scheduler.add(seq("long", list(range(30))))
    assert run_step(scheduler) == {"short": 3, "long": 7}
    # short decodes (1 token) beside long's next chunks until long is prefilled.
    assert run_step(scheduler) == {"short": 1, "long": 9}
    assert run_step(scheduler) == {"short": 1, "long": 9}
    assert run_step(scheduler) == {"short": 1, "long": 5}
    assert run_step(scheduler) == {"short": 1, "long": 1}


def test_max_num_seqs_and_first_come_first_served():
    manager = BlockManager(num_blocks=64, block_size=BLOCK, enable_prefix_caching=False)
    scheduler = Scheduler(manager, max_num_seqs=2, max_num_batched_tokens=100)
    for name in "abc":
        scheduler.add(seq(name, [1, 2]))
    assert set(run_step(scheduler)) == {"a", "b"}
    assert [s.request_id for s in scheduler.waiting] == ["c"]


def test_newest_sequence_is_preempted_and_requeued_first():
    manager = BlockManager(num_blocks=5, block_size=BLOCK, enable_prefix_caching=True)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=100)
    old, new, waiting = seq("old", [1, 2, 3, 4]), seq("new", [5, 6, 7, 8]), seq("w", [9])
    scheduler.add(old)
    scheduler.add(new)
    assert run_step(scheduler) == {"old": 4, "new": 4}
    scheduler.add(waiting)
    assert run_step(scheduler) == {"old": 1, "new": 1, "w": 1}  # 2 + 2 + 1 blocks
    for _ in range(3):
        run_step(scheduler)  # old and new fill their second blocks
    # old and new both need a third block and none is free: the newest running ("w") is
    # preempted for old, then "new" itself; nobody is admitted in a step that preempted.
    assert run_step(scheduler) == {"old": 1}
    assert [s.request_id for s in scheduler.waiting] == ["new", "w"]
    assert scheduler.num_preemptions == 2
    assert new.status is SequenceStatus.WAITING and new.block_table == []
    assert new.num_tokens == 9  # generated tokens are kept, to be recomputed


def test_a_preempted_sequence_resumes_from_the_prefix_cache():
    manager = BlockManager(num_blocks=3, block_size=BLOCK, enable_prefix_caching=True)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq("a", [1, 2, 3, 4, 5]), seq("b", [6, 7, 8])
    scheduler.add(a)
    scheduler.add(b)
    assert run_step(scheduler) == {"a": 5, "b": 3}  # all 3 blocks in use
    assert run_step(scheduler) == {"a": 1, "b": 1}  # b's first block is now full
    assert run_step(scheduler) == {"a": 1}  # b needs a second block: b preempted
    assert scheduler.num_preemptions == 1 and b.num_tokens == 5
    scheduler.finish(a)
    # b's full block [6, 7, 8, 0] comes back from the cache: only its last token is run.
    assert run_step(scheduler) == {"b": 1}
    assert scheduler.num_cache_hit_tokens == BLOCK
    assert b.cached_tokens == 0  # what its first admission found
