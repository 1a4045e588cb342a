"""KV cache blocks: allocation, reference counts and prefix caching.

A full block is identified by a hash chain, hash(previous block's hash, own tokens), so
equal hashes mean equal prefixes up to and including the block. A block whose K/V are
computed is registered under its hash; a later sequence with the same prefix reuses it
(reference count + 1) instead of recomputing it. Blocks freed by every user keep their
hash and stay reusable until the pool hands them out again, least recently freed first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from engine.sequence import Sequence


class Block:
    """One block's bookkeeping; its id is its index in BlockManager.blocks."""

    __slots__ = ("ref_count", "hash", "token_ids")

    def __init__(self) -> None:
        self.ref_count = 0
        self.hash: bytes | None = None  # set while registered in the prefix cache
        self.token_ids: tuple[int, ...] = ()  # what the hash stands for, checked on reuse


def chain_hash(previous: bytes, token_ids: list[int]) -> bytes:
    return hashlib.blake2b(previous + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block() for _ in range(num_blocks)]
        # Free blocks in the order they were freed: allocation takes the oldest, so
        # recently freed cached blocks survive longest.
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}  # hash -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_ids)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so the table covers the computed tokens plus num_new_tokens."""
        covered = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, covered - len(seq.block_table))

    def num_shareable_prompt_blocks(self, seq: Sequence) -> int:
        """seq's full prompt blocks that its other samples can share: all but the one with
        the prompt's last token, which each sample computes for its own first logits (the
        same rule as the prefix cache's)."""
        return (seq.num_prompt_tokens - 1) // self.block_size

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks holding seq's leading full blocks.

        The block with the last token is never taken from the cache: that token must be
        computed for its logits, and recomputing into a shared block would write to it.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for index in range((seq.num_tokens - 1) // self.block_size):
            block_id = self.cached.get(self._block_hash(seq, index))
            if block_id is None or self.blocks[block_id].token_ids != tuple(
                self._block_tokens(seq, index)
            ):
                break
            hits.append(block_id)
        return hits

    def can_admit(self, cached_block_ids: list[int], num_new_blocks: int) -> bool:
        # Cached blocks nobody uses sit in the free list: reusing them takes them out of it.
        idle_hits = sum(1 for b in cached_block_ids if self.blocks[b].ref_count == 0)
        return self.num_free_blocks - idle_hits >= num_new_blocks

    def admit(self, seq: Sequence, cached_block_ids: list[int]) -> None:
        """Start seq's block table with its cached prefix (which then counts as computed)."""
        for block_id in cached_block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_ids[block_id]
            block.ref_count += 1
        seq.block_table = list(cached_block_ids)
        seq.num_computed_tokens = len(cached_block_ids) * self.block_size
        seq.num_registered_blocks = len(cached_block_ids)

    def allocate(self, seq: Sequence, num_blocks: int) -> None:
        if num_blocks > self.num_free_blocks:
            raise RuntimeError("KV cache blocks exhausted (the scheduler should have preempted)")
        for _ in range(num_blocks):
            block_id, _ = self.free_ids.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # evict its old contents from the prefix cache
                if self.cached.get(block.hash) == block_id:
                    del self.cached[block.hash]
                block.hash, block.token_ids = None, ()
            block.ref_count = 1
            seq.block_table.append(block_id)

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so a sequence's prefix is the last of it to be evicted.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def register_full_blocks(self, seq: Sequence) -> None:
        """Offer seq's newly computed full blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for index in range(seq.num_registered_blocks, num_full):
            block_id = seq.block_table[index]
            block = self.blocks[block_id]
            block_hash = self._block_hash(seq, index)
            # If another sequence registered the same contents first, keep that block.
            if block.hash is None and block_hash not in self.cached:
                self.cached[block_hash] = block_id
                block.hash = block_hash
                block.token_ids = tuple(self._block_tokens(seq, index))
        seq.num_registered_blocks = num_full

    def _block_tokens(self, seq: Sequence, index: int) -> list[int]:
        return seq.token_ids[index * self.block_size : (index + 1) * self.block_size]

    def _block_hash(self, seq: Sequence, index: int) -> bytes:
        hashes = seq.block_hashes
        while len(hashes) <= index:
            previous = hashes[-1] if hashes else b""
            hashes.append(chain_hash(previous, self._block_tokens(seq, len(hashes))))
        return hashes[index]
