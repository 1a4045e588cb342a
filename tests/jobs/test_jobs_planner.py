"""Sharding by row ranges, cut at row-group boundaries where possible, from the footer alone."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.errors import UserError
from jobs.keys import MAX_SHARDS
from jobs.planner import Shard, plan_shards, row_group_bounds


def metadata_for(tmp_path, group_sizes: list[int]) -> pq.FileMetaData:
    path = tmp_path / "in.parquet"
    with pq.ParquetWriter(path, pa.schema([("prompt", pa.string())])) as writer:
        for size in group_sizes:
            writer.write_table(pa.table({"prompt": ["p"] * size}))
    metadata = pq.read_metadata(path)
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == group_sizes
    return metadata


def ranges(shards: list[Shard]) -> list[tuple[int, int]]:
    return [(s.row_start, s.row_end) for s in shards]


@pytest.mark.parametrize(("groups", "shard_size", "expected"), [
    # Small groups are packed whole, never cut.
    ([100] * 10, 250, [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)]),
    ([100] * 10, 300, [(0, 300), (300, 600), (600, 900), (900, 1000)]),
    # One big group (the usual pandas file) is cut into exact shard sizes.
    ([1000], 300, [(0, 300), (300, 600), (600, 900), (900, 1000)]),
    # A big group's tail shares a shard with the small groups after it.
    ([250, 30, 30], 100, [(0, 100), (100, 200), (200, 280), (280, 310)]),
    # Group boundaries win over full shards.
    ([60, 60, 60], 100, [(0, 60), (60, 120), (120, 180)]),
    ([40, 150, 40], 100, [(0, 40), (40, 140), (140, 230)]),
    ([7], 1000, [(0, 7)]),
    ([5, 5, 5], 1, [(i, i + 1) for i in range(15)]),
])
def test_exact_ranges(tmp_path, groups, shard_size, expected):
    shards = plan_shards(metadata_for(tmp_path, groups), shard_size)
    assert ranges(shards) == expected
    assert [s.index for s in shards] == list(range(len(expected)))


@pytest.mark.parametrize("groups", [[1], [3, 1, 4, 1, 5, 9, 2, 6], [1000, 1, 999], [64] * 20])
@pytest.mark.parametrize("shard_size", [1, 2, 7, 64, 100, 5000])
def test_shards_cover_every_row_once_and_respect_the_size(tmp_path, groups, shard_size):
    metadata = metadata_for(tmp_path, groups)
    shards = plan_shards(metadata, shard_size)
    assert shards[0].row_start == 0 and shards[-1].row_end == sum(groups)
    assert all(a.row_end == b.row_start for a, b in zip(shards, shards[1:], strict=False))
    assert all(0 < s.num_rows <= shard_size for s in shards)
    assert sum(s.num_rows for s in shards) == metadata.num_rows
    # A cut falls inside a row group only when that group is larger than a shard.
    group_starts = {start for start, _ in row_group_bounds(metadata)}
    for shard in shards[1:]:
        if shard.row_start not in group_starts:
            inside = [(s, e) for s, e in row_group_bounds(metadata) if s < shard.row_start < e]
            assert inside and inside[0][1] - inside[0][0] > shard_size


def test_row_group_bounds(tmp_path):
    assert row_group_bounds(metadata_for(tmp_path, [3, 4, 5])) == [(0, 3), (3, 7), (7, 12)]


def test_too_many_shards_is_a_user_error(tmp_path):
    metadata = metadata_for(tmp_path, [MAX_SHARDS + 1])
    with pytest.raises(UserError, match="at most 100000 are allowed"):
        plan_shards(metadata, 1)
    with pytest.raises(UserError, match="at least 1"):
        plan_shards(metadata, 0)


def test_shard_to_dict():
    assert Shard(2, 10, 20).to_dict() == {"index": 2, "row_start": 10, "row_end": 20}
