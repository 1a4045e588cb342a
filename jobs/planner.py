"""Split an input into shards: contiguous row ranges, cut at row-group boundaries where it can.

Only the Parquet footer is used. A shard that covers whole row groups lets its worker
read just those groups; a row group larger than the shard size is cut inside, into
pieces of exactly shard_size rows (its last piece may be smaller, or share a shard with
the row groups that follow).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow.parquet as pq

from jobs.errors import UserError
from jobs.keys import MAX_SHARDS


@dataclass(frozen=True)
class Shard:
    index: int
    row_start: int  # first row, inclusive
    row_end: int  # last row, exclusive

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def row_group_bounds(metadata: pq.FileMetaData) -> list[tuple[int, int]]:
    """[start, end) of every row group, in file order."""
    bounds, start = [], 0
    for i in range(metadata.num_row_groups):
        end = start + metadata.row_group(i).num_rows
        bounds.append((start, end))
        start = end
    return bounds


def plan_shards(metadata: pq.FileMetaData, shard_size: int) -> list[Shard]:
    """Shards of at most shard_size rows covering every row exactly once, in order."""
    if shard_size < 1:
        raise UserError(f"shard size must be at least 1, got {shard_size}")
    ranges: list[tuple[int, int]] = []
    start = 0  # first row not yet in a shard
    for group_start, group_end in row_group_bounds(metadata):
        if group_end - start <= shard_size:
            continue  # this group fits in the shard being gathered
        if group_start > start:
            ranges.append((start, group_start))  # close the shard at the group boundary
            start = group_start
        while group_end - start > shard_size:  # a group too big for one shard
            ranges.append((start, start + shard_size))
            start += shard_size
    if metadata.num_rows > start:
        ranges.append((start, metadata.num_rows))
    if len(ranges) > MAX_SHARDS:
        raise UserError(f"shard size {shard_size} would make {len(ranges)} shards; "
                        f"at most {MAX_SHARDS} are allowed, so use a larger shard size")
    return [Shard(i, s, e) for i, (s, e) in enumerate(ranges)]
