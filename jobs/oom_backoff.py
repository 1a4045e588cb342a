"""How many requests a shard keeps in flight while the device runs out of memory.

When an engine step runs out of memory (the batch was too big for the device), every
request in flight is taken back, the cap on requests in flight is halved and the rows go
back in. A row that runs out of memory even alone becomes an error row of kind
"transient" (retry it on a bigger worker, or after lowering the token budget), and after
MAX_LONE_OOM_ROWS such rows in a row the shard fails with the reason.
"""

from __future__ import annotations

# A shard gives up when this many rows in a row ran out of memory even alone: the engine
# cannot run anything on this worker, and the failure should say so.
MAX_LONE_OOM_ROWS = 3


class ShardOutOfMemory(RuntimeError):
    """The engine ran out of memory even with one request in flight, row after row."""


class OomBackoff:
    """The cap on requests in flight: `limit` until memory runs out, then lower."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.cap = limit
        self.retries = 0  # times the engine ran out of memory
        self._first_cut: int | None = None  # requests in flight at the first cut
        self._lone_rows = 0  # rows in a row that ran out of memory alone

    def batch_ran_out(self, in_flight: int) -> int:
        """`in_flight` (> 1) requests ran out of memory together; returns the new cap."""
        self.retries += 1
        self._first_cut = self._first_cut or in_flight
        self.cap = max(1, min(self.cap, in_flight) // 2)
        return self.cap

    def row_ran_out_alone(self, reason: str) -> None:
        """One request ran out of memory alone: the others go on at half the first cut,
        unless too many rows in a row did (ShardOutOfMemory)."""
        self.retries += 1
        self._lone_rows += 1
        if self._lone_rows >= MAX_LONE_OOM_ROWS:
            raise ShardOutOfMemory(
                f"{self._lone_rows} rows in a row ran out of memory even alone (last: "
                f"{reason}); lower BATCHINFER_MAX_NUM_BATCHED_TOKENS or "
                f"BATCHINFER_KV_CACHE_MEMORY, or use a bigger device")
        self.cap = max(1, (self._first_cut or self.limit) // 2)

    def row_finished(self) -> None:
        """A request came out of the engine: the run of lone out-of-memory rows is over."""
        self._lone_rows = 0
