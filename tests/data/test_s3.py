"""s3:// shards on a real S3 server (moto's server mode on 127.0.0.1) through s3fs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from labtrain.config import DataConfig
from labtrain.data import DataStream, ShardWriter, build_index, load_shards, s3
from tests.data.conftest import make_samples


def write_s3_shards(bucket: str, cfg, count: int = 96, per_shard: int = 16) -> str:
    with ShardWriter(f"s3://{bucket}/train", max_samples=per_shard, s3=cfg) as writer:
        for sample in make_samples(count):
            writer.write(sample)
    return writer.pattern


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_reads_s3_shards_in_every_worker(s3_bucket, num_workers):
    bucket, cfg = s3_bucket
    pattern = write_s3_shards(bucket, cfg)
    assert pattern.startswith(f"s3://{bucket}/train/shard-")
    data = DataConfig(urls=pattern, batch_size=8, num_workers=num_workers, s3=cfg)
    keys = sorted(k for rank in range(2) for b in DataStream(data, rank=rank, world_size=2) for k in b["__key__"])
    assert keys == [f"k{i:06d}" for i in range(96)]


def test_index_of_shards_already_on_s3(s3_bucket):
    bucket, cfg = s3_bucket
    pattern = write_s3_shards(bucket, cfg, count=40, per_shard=15)
    s3.filesystem(cfg).rm(f"s3://{bucket}/train/index.json")
    with pytest.raises(ValueError, match="no shard index"):
        load_shards(pattern, s3_cfg=cfg)
    build_index(pattern, progress=False, s3_cfg=cfg)
    assert [s.num_samples for s in load_shards(pattern, s3_cfg=cfg)] == [15, 15, 10]


def test_a_new_process_reads_s3_through_webdataset_after_importing_labtrain(s3_bucket):
    """The opener is registered on import, so any reading process (a Ray worker, say) has it; it reads the
    store of the standard AWS variables."""
    bucket, cfg = s3_bucket
    pattern = write_s3_shards(bucket, cfg, count=20, per_shard=10)
    code = (
        "import webdataset as wds, labtrain.data\n"
        f"print(sum(1 for _ in wds.WebDataset({pattern!r}, shardshuffle=False)))\n"
    )
    env_cfg = {"AWS_ENDPOINT_URL": cfg.endpoint_url}
    import os

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env_cfg}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "20"


def test_transient_errors_are_retried_with_backoff(s3_bucket, monkeypatch, caplog):
    bucket, cfg = s3_bucket
    pattern = write_s3_shards(bucket, cfg, count=16, per_shard=16)
    fs = s3.filesystem(cfg)
    real_open = fs.open
    failures = {"left": 2}

    def flaky_open(*args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("connection reset by peer")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(fs, "open", flaky_open)
    data = DataConfig(urls=pattern, batch_size=4, s3=cfg.model_copy(update={"backoff_s": 0.01}))
    with caplog.at_level("WARNING"):
        stream = DataStream(data, rank=0, world_size=1)
        keys = [k for b in stream for k in b["__key__"]]
    assert len(keys) == 16 and stream.bad_shards == set()
    assert sum("transient error" in r.getMessage() for r in caplog.records) >= 2


def test_a_missing_s3_shard_is_not_retried_but_skipped(s3_bucket):
    bucket, cfg = s3_bucket
    pattern = write_s3_shards(bucket, cfg, count=32, per_shard=16)
    s3.filesystem(cfg).rm(f"s3://{bucket}/train/shard-000001.tar")
    stream = DataStream(DataConfig(urls=pattern, batch_size=4, max_bad_shards=1, s3=cfg), rank=0, world_size=1)
    assert len(list(stream)) == 8
    assert stream.bad_shards == {f"s3://{bucket}/train/shard-000001.tar"}


def test_a_connection_lost_mid_shard_reopens_it_and_loses_no_sample(s3_bucket, monkeypatch, caplog):
    """The first read of a shard dies half-way through; the stream reopens it at the next sample."""
    bucket, cfg = s3_bucket
    pattern = write_s3_shards(bucket, cfg, count=32, per_shard=16)
    fs = s3.filesystem(cfg)
    real_open = fs.open
    broken = {"left": 1}

    def open_then_break(*args, **kwargs):
        stream = real_open(*args, **kwargs)
        if broken["left"] and str(args[0]).endswith(".tar"):
            broken["left"] -= 1
            real_read, budget = stream.read, {"bytes": 6000}  # some samples in: about 19 KB of the shard is read

            def readinto(buffer):  # what a buffered reader in front of the s3fs file calls
                if budget["bytes"] <= 0:
                    raise ConnectionResetError("connection reset by peer")
                data = real_read(min(len(buffer), budget["bytes"]))
                buffer[: len(data)] = data
                budget["bytes"] -= len(data)
                return len(data)

            def read(n=-1):
                if budget["bytes"] <= 0:
                    raise ConnectionResetError("connection reset by peer")
                data = real_read(min(n, budget["bytes"]) if n >= 0 else budget["bytes"])
                budget["bytes"] -= len(data)
                return data

            stream.read, stream.readinto = read, readinto
        return stream

    monkeypatch.setattr(fs, "open", open_then_break)
    data = DataConfig(urls=pattern, batch_size=4, s3=cfg.model_copy(update={"backoff_s": 0.01}))
    with caplog.at_level("WARNING"):
        stream = DataStream(data, rank=0, world_size=1)
        keys = [k for b in stream for k in b["__key__"]]
    assert broken["left"] == 0
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 32  # every sample once
    assert stream.bad_shards == set() and stream.skipped_samples == 0
    assert any("reopening" in r.getMessage() for r in caplog.records)


def test_a_stream_reads_from_its_own_store_whatever_another_stream_uses(s3_bucket, monkeypatch):
    """Two streams on two stores in one process, with the AWS variables pointing at neither: each reads its own."""
    from labtrain.config import S3Config

    bucket, cfg = s3_bucket
    pattern = write_s3_shards(bucket, cfg, count=16, per_shard=8)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    stream = DataStream(DataConfig(urls=pattern, batch_size=4, s3=cfg), rank=0, world_size=1)
    other = DataConfig(urls=pattern, batch_size=4, max_bad_shards=2, s3=S3Config(endpoint_url="http://127.0.0.1:9", max_attempts=1))
    with pytest.raises(Exception, match=r"127\.0\.0\.1:9"):
        DataStream(other, rank=0, world_size=1)  # the other stream asked its own (dead) store, not ours
    assert len([k for b in stream for k in b["__key__"]]) == 16 and stream.bad_shards == set()
