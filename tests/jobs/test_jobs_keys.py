"""Object keys come only from validated job ids and fixed names."""

from __future__ import annotations

import uuid
from datetime import date

import pytest

from jobs import keys
from jobs.errors import UserError


def test_new_job_ids_are_uuid4_hex_and_valid():
    job_id = keys.new_job_id()
    assert len(job_id) == 32 and uuid.UUID(hex=job_id).version == 4
    assert keys.validate_job_id(job_id) == job_id
    assert keys.new_job_id() != job_id


@pytest.mark.parametrize("bad", [
    "../../etc", "..", "", "x" * 32, uuid.uuid4().hex.upper(), uuid.uuid4().hex[:31],
    uuid.uuid4().hex + "0", uuid.uuid1().hex, f"{uuid.uuid4().hex[:31]}/", str(uuid.uuid4()),
    f"../{uuid.uuid4().hex}", None, 12,
])
def test_anything_but_a_uuid4_hex_is_refused(bad):
    with pytest.raises(UserError, match="invalid job id"):
        keys.validate_job_id(bad)
    with pytest.raises(UserError):
        keys.manifest_key(bad)


def test_keys_follow_the_documented_layout():
    job_id = keys.new_job_id()
    assert keys.spec_key(job_id) == f"jobs/{job_id}/spec.json"
    assert keys.input_key(job_id) == f"jobs/{job_id}/input.parquet"
    assert keys.manifest_key(job_id) == f"jobs/{job_id}/manifest.json"
    assert keys.result_key(job_id, 3) == f"jobs/{job_id}/results/part-00003.parquet"
    assert keys.error_key(job_id, 12) == f"jobs/{job_id}/errors/part-00012.parquet"
    assert keys.progress_key(job_id, 0) == f"jobs/{job_id}/progress/shard-00000.json"
    assert keys.failure_key(job_id, 4) == f"jobs/{job_id}/failures/shard-00004.json"
    assert (keys.usage_key(date(2024, 2, 9), job_id, 7)
            == f"usage/date=2024-02-09/{job_id}-00007.parquet")
    for key in (keys.result_key(job_id, 99), keys.progress_key(job_id, 99),
                keys.failure_key(job_id, 99),
                keys.usage_key(date(2024, 1, 1), job_id, 99)):
        assert keys.part_of_key(key) == (99, 0)


@pytest.mark.parametrize("shard", [-1, keys.MAX_SHARDS, 1.0, True, "1"])
def test_shard_numbers_are_bounded_integers(shard):
    with pytest.raises(ValueError, match="shard index"):
        keys.result_key(keys.new_job_id(), shard)


def test_part_of_key_rejects_other_keys():
    with pytest.raises(ValueError):
        keys.part_of_key("jobs/x/spec.json")
