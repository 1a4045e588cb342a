"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step fills a token budget (max_num_batched_tokens): first one token for each
decoding sequence, then chunks of unfinished prompts (a long prompt is split over
several steps, decodes keep running beside it), then new requests in arrival order,
up to max_num_seqs running at once. When the KV pool has no block for a running
sequence, the newest running sequence is preempted: its blocks are freed and it goes
back to the front of the queue, to be recomputed later (prompt and the tokens it has
generated so far, mostly from the prefix cache).

A request with n samples is queued as its first sample; the others (its forks) join the
front of the queue once that sample's full prompt blocks are computed, and start with
those blocks shared (reference-counted), computing only the prompt's last partial block.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_tokens: int = 0  # sum of num_new_tokens, kept as they change (read per sequence)

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)
        self.num_tokens += num_new_tokens

    def discard(self, seq: Sequence) -> None:
        if seq in self.seqs:
            index = self.seqs.index(seq)
            self.num_tokens -= self.num_new_tokens[index]
            del self.seqs[index], self.num_new_tokens[index]


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order, newest last
        self.num_preemptions = 0
        self.num_cache_hit_tokens = 0

    def add(self, seq: Sequence, forks: list[Sequence] | None = None) -> None:
        """Queue a request's first sample and the other samples of its prompt (forks)."""
        forks = forks or []
        for fork in forks:
            fork.prompt_source = seq
        if forks and self.block_manager.num_shareable_prompt_blocks(seq) > 0:
            seq.forks = forks
            self.waiting.append(seq)
        else:  # a prompt within one block: nothing to share, nothing to wait for
            self.waiting.extend([seq, *forks])

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        self._release_forks()
        batch = ScheduledBatch()
        decoding = [seq for seq in self.running if seq.is_decoding]
        prefilling = [seq for seq in self.running if not seq.is_decoding]
        preempted = False
        for seq in decoding + prefilling:
            budget = self.max_num_batched_tokens - batch.num_tokens
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(seq.num_uncomputed_tokens, budget)
            if self._make_room(seq, num_new, batch):
                batch.add(seq, num_new)
            else:
                preempted = True
        # Blocks freed by preemption go to running sequences, not to new ones, lest the
        # newcomer be preempted again right away.
        if not preempted:
            self._admit_waiting(batch)
        return batch

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence that is done (or aborted) and release its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq.status is SequenceStatus.WAITING:
            source = seq.prompt_source
            if source is not None and seq in source.forks:
                source.forks.remove(seq)
            else:
                self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        # Forks still waiting on it run on their own (or from the prefix cache).
        self.waiting.extendleft(reversed(seq.forks))
        seq.forks = []

    def _release_forks(self) -> None:
        """Queue, first, the forks of running samples whose shareable prompt blocks are
        computed."""
        block_size = self.block_manager.block_size
        ready = [
            seq for seq in self.running
            if seq.forks and seq.num_computed_tokens
            >= self.block_manager.num_shareable_prompt_blocks(seq) * block_size
        ]
        for seq in reversed(ready):
            self.waiting.extendleft(reversed(seq.forks))
            seq.forks = []

    def _reusable_prefix(self, seq: Sequence) -> list[int]:
        """The computed blocks seq can start from: the prefix cache's hits, or its first
        sample's prompt blocks while that sample runs, whichever is longer."""
        manager = self.block_manager
        hits = manager.find_cached_prefix(seq)
        source = seq.prompt_source
        if source is None or source.status is not SequenceStatus.RUNNING:
            return hits
        num_shared = min(manager.num_shareable_prompt_blocks(seq),
                         source.num_computed_tokens // manager.block_size)
        return source.block_table[:num_shared] if num_shared > len(hits) else hits

    def _make_room(self, seq: Sequence, num_new: int, batch: ScheduledBatch) -> bool:
        """Allocate seq's blocks for num_new tokens, preempting the newest running sequences
        as needed (also ones already in this batch). False if seq itself was preempted."""
        needed = self.block_manager.blocks_needed(seq, num_new)
        while needed > self.block_manager.num_free_blocks:
            victim = self.running[-1]
            self._preempt(victim)
            batch.discard(victim)
            if victim is seq:
                return False
        self.block_manager.allocate(seq, needed)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _admit_waiting(self, batch: ScheduledBatch) -> None:
        manager = self.block_manager
        budget = self.max_num_batched_tokens - batch.num_tokens
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # Prompt logprobs need the logits of every prompt position: such a prompt is
            # computed whole (as in vLLM), though its blocks still go to the cache.
            cached_blocks = [] if seq.prompt_logprobs_pending else self._reusable_prefix(seq)
            num_cached = len(cached_blocks) * manager.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            num_new_blocks = -(-(num_cached + num_new) // manager.block_size) - len(cached_blocks)
            if not manager.can_admit(cached_blocks, num_new_blocks):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            manager.admit(seq, cached_blocks)
            manager.allocate(seq, num_new_blocks)
            if seq.cached_tokens is None:
                seq.cached_tokens = min(num_cached, seq.num_prompt_tokens)
            self.num_cache_hit_tokens += num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num_new)
            budget -= num_new
