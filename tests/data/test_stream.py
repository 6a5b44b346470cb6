"""The rank's stream: equal batches on every rank, exact resume, bad shards skipped and counted."""

from __future__ import annotations

import collections
import os

import pytest

from labtrain.config import DataConfig
from labtrain.data import DataError, DataStream, load_shards
from labtrain.data.stages import plan_epoch


def keys_of(batch) -> list[str]:
    return list(batch["__key__"])


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_rank_gets_the_same_number_of_batches_and_no_key_twice(uneven_shards, world_size, num_workers):
    pattern, total = uneven_shards
    cfg = DataConfig(urls=pattern, batch_size=4, num_workers=num_workers, seed=3)
    per_rank_batches, seen = [], collections.Counter()
    for rank in range(world_size):
        stream = DataStream(cfg, rank=rank, world_size=world_size)
        expected = len(stream)
        batches = [keys_of(b) for b in stream]
        assert len(batches) == expected
        per_rank_batches.append(len(batches))
        for keys in batches:
            seen.update(keys)
    assert len(set(per_rank_batches)) == 1, per_rank_batches
    assert per_rank_batches[0] == (total // world_size) // 4
    assert max(seen.values()) == 1
    assert sum(seen.values()) == world_size * per_rank_batches[0] * 4


def test_a_rank_is_never_left_with_nothing(tmp_path):
    """Two shards, five ranks: positions, not shards, are split, so every rank still trains."""
    from labtrain.data import write_shards
    from tests.data.conftest import make_samples

    pattern = write_shards(make_samples(23), str(tmp_path), max_samples=20, progress=False)
    assert len(load_shards(pattern)) == 2
    counts = [len(list(DataStream(DataConfig(urls=pattern, batch_size=2), rank=r, world_size=5))) for r in range(5)]
    assert counts == [2] * 5


def test_too_few_samples_for_the_batch_is_a_clear_error(even_shards):
    pattern, _ = even_shards
    with pytest.raises(DataError, match="fewer than batch_size=200; lower data.batch_size"):
        DataStream(DataConfig(urls=pattern, batch_size=200), rank=0, world_size=2)


def test_epochs_change_the_shard_order_reproducibly(even_shards):
    pattern, _ = even_shards
    shards = load_shards(pattern)
    orders = [[s.url for s in plan_epoch(shards, seed=1, epoch=e, rank=0, world_size=1).shards] for e in range(3)]
    assert orders[0] != orders[1]
    assert orders[0] == [s.url for s in plan_epoch(shards, seed=1, epoch=0, rank=0, world_size=1).shards]


@pytest.mark.parametrize(
    ("num_workers", "resume_workers", "shuffle_buffer"),
    [(0, 0, 0), (0, 0, 16), (1, 1, 16), (2, 2, 0), (3, 3, 16), (2, 2, 8), (2, 3, 8), (3, 0, 16)],
)
def test_exact_resume_mid_epoch(uneven_shards, num_workers, resume_workers, shuffle_buffer):
    """Interrupt after k batches, restore the saved state into a new stream: over the epoch every key
    of the rank's share is seen exactly once, whatever the number of dataloader workers; with as many workers
    as the epoch began with, the remaining batches are the very ones, in the order, of an uninterrupted run
    (a shuffle buffer included)."""
    pattern, _ = uneven_shards
    world_size = 2
    for rank in range(world_size):
        cfg = DataConfig(urls=pattern, batch_size=4, num_workers=num_workers, shuffle_buffer=shuffle_buffer, seed=7)
        reference = DataStream(cfg, rank=rank, world_size=world_size)
        reference_batches = [keys_of(b) for b in reference]
        expected = collections.Counter(k for b in reference_batches for k in b)

        first = DataStream(cfg, rank=rank, world_size=world_size)
        seen: collections.Counter = collections.Counter()
        for i, batch in enumerate(first):
            seen.update(keys_of(batch))
            if i == 6:
                break
        state = first.state_dict()
        del first  # the interrupted run is gone; only its state survives

        resumed = DataStream(cfg.model_copy(update={"num_workers": resume_workers}), rank=rank, world_size=world_size)
        resumed.load_state_dict(state)
        remaining = len(resumed)
        batches = [keys_of(b) for b in resumed]
        assert len(batches) == remaining == sum(expected.values()) // 4 - 7
        for keys in batches:
            seen.update(keys)
        assert seen == expected, f"rank {rank}: lost {set(expected) - set(seen)}, twice {[k for k, n in seen.items() if n > 1]}"
        assert resumed.epoch == 1  # and the stream moved on to the next epoch
        if max(resume_workers, 1) == max(num_workers, 1):
            assert batches == reference_batches[7:], f"rank {rank}: the resumed batches differ from the uninterrupted run's"
        elif shuffle_buffer > 1:
            assert batches != reference_batches[7:]  # the documented limit: another worker count, another order


def test_resume_refuses_a_different_world_size(even_shards):
    pattern, _ = even_shards
    stream = DataStream(DataConfig(urls=pattern, batch_size=4), rank=0, world_size=2)
    with pytest.raises(ValueError, match="saved with 2 ranks but this run has 4"):
        DataStream(DataConfig(urls=pattern, batch_size=4), rank=0, world_size=4).load_state_dict(stream.state_dict())


def _break_shards(pattern: str) -> tuple[str, str, str]:
    shards = [s.url for s in load_shards(pattern)]
    corrupt, truncated, missing = shards[1], shards[4], shards[6]
    with open(corrupt, "r+b") as f:  # garbage over the first header
        f.write(os.urandom(2048))
    with open(truncated, "r+b") as f:  # cut mid-way through
        f.truncate(os.path.getsize(truncated) // 3)
    os.remove(missing)
    return corrupt, truncated, missing


class CountingMetrics:
    def __init__(self):
        self.shards = self.samples = 0

    def skipped(self, *, shards: int, samples: int) -> None:
        self.shards += shards
        self.samples += samples


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_shards_are_skipped_named_and_counted(uneven_shards, caplog, num_workers):
    pattern, total = uneven_shards
    broken = _break_shards(pattern)
    cfg = DataConfig(urls=pattern, batch_size=4, num_workers=num_workers, max_bad_shards=3)
    metrics = CountingMetrics()
    stream = DataStream(cfg, rank=0, world_size=1, metrics=metrics)
    expected_batches = len(stream)
    with caplog.at_level("WARNING"):
        batches = list(stream)
    assert len(batches) == expected_batches  # batch counts stay equal: lost samples are filled
    assert stream.bad_shards == set(broken)
    assert metrics.shards == 3
    assert metrics.samples == stream.skipped_samples > 0
    if num_workers == 0:  # worker processes log in their own process
        assert all(any(url in r.getMessage() for r in caplog.records) for url in broken)


def test_past_the_limit_the_job_fails_with_the_shard_names(uneven_shards):
    pattern, _ = uneven_shards
    broken = _break_shards(pattern)
    stream = DataStream(DataConfig(urls=pattern, batch_size=4, max_bad_shards=1), rank=0, world_size=1)
    with pytest.raises(DataError, match="more than data.max_bad_shards=1") as info:
        list(stream)
    assert sum(url in str(info.value) for url in broken) >= 2


def test_undecodable_samples_are_skipped_and_counted(even_shards, caplog):
    pattern, _ = even_shards

    def flaky(sample):
        if sample["__key__"].endswith("7"):
            raise KeyError("jpg") if sample["__key__"].endswith("77") else ValueError()  # a message-less error too
        return {"__key__": sample["__key__"]}

    stream = DataStream(DataConfig(urls=pattern, batch_size=8), rank=0, world_size=1, decoder=flaky)
    keys = [k for b in stream for k in keys_of(b)]
    assert len(keys) == 256
    assert stream.skipped_samples == 25  # k000007, k000017, ..., k000247
    assert not any(k.endswith("7") for k in keys)  # each was replaced by a copy of a good sample
    assert len(set(keys)) == 256 - 25
    # every skip says which sample and why, even for an exception without a message
    assert "skipping sample k000007 of " in caplog.text and ": ValueError: " in caplog.text
    assert "skipping sample k000077 of " in caplog.text and "KeyError: 'jpg'" in caplog.text


def test_a_shard_cut_between_two_files_of_one_sample_is_bad_not_a_partial_sample(even_shards):
    """A cut at a file boundary leaves a tar that ends cleanly, with its last sample missing a file."""
    import tarfile

    pattern, _ = even_shards
    shard = load_shards(pattern)[2].url
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    assert members[0].name.rsplit(".", 1)[0] == members[1].name.rsplit(".", 1)[0]  # one sample's two files
    with open(shard, "r+b") as f:
        f.truncate(members[11].offset)  # sample 5 keeps its first file, loses its second
    stream = DataStream(DataConfig(urls=pattern, batch_size=8, max_bad_shards=1), rank=0, world_size=1)
    batches = list(stream)
    assert all(set(b) == {"__key__", "npy", "cls"} for b in batches)
    assert stream.bad_shards == {shard} and stream.skipped_samples == 32


def test_a_worker_whose_whole_share_is_lost_fills_from_another_shard(tmp_path):
    """8 ranks over 8 shards of 8, one shard missing: its rank still yields its batches (stand-ins from
    another shard), counts the loss, and nothing fails while under max_bad_shards."""
    from labtrain.data import write_shards
    from tests.data.conftest import make_samples

    pattern = write_shards(make_samples(64), str(tmp_path), max_samples=8, progress=False)
    missing = load_shards(pattern)[3].url
    os.remove(missing)
    batches, skipped = [], 0
    for rank in range(8):
        stream = DataStream(DataConfig(urls=pattern, batch_size=4, max_bad_shards=1), rank=rank, world_size=8)
        batches.append(len(list(stream)))
        skipped += stream.skipped_samples
    assert batches == [2] * 8 and skipped == 8


def test_resume_refuses_state_saved_for_other_data(even_shards):
    pattern, _ = even_shards
    stream = DataStream(DataConfig(urls=pattern, batch_size=4), rank=0, world_size=1)
    state = stream.state_dict()
    with pytest.raises(ValueError, match="batch_size changed"):
        DataStream(DataConfig(urls=pattern, batch_size=8), rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed changed"):
        DataStream(DataConfig(urls=pattern, batch_size=4, seed=1), rank=0, world_size=1).load_state_dict(state)
    DataStream(DataConfig(urls=pattern, batch_size=4), rank=0, world_size=1).load_state_dict(state)  # the same data: fine


def test_the_shuffle_buffer_holds_samples_as_read_not_decoded(even_shards):
    """Decoding comes after the buffer: the first batch of 4 from a 64-sample buffer decodes 4 samples, and
    what the buffer holds is the tar's bytes (a decoded video clip would be ~100x larger)."""
    decoded = []

    def decoder(sample):
        assert all(isinstance(v, bytes) for k, v in sample.items() if not k.startswith("__")), "the decoder sees raw bytes"
        decoded.append(sample["__key__"])
        return {"__key__": sample["__key__"], "cls": int(sample["cls"])}

    stream = DataStream(DataConfig(urls=even_shards[0], batch_size=4, shuffle_buffer=64), decoder=decoder, rank=0, world_size=1)
    first = next(iter(stream))
    assert len(first["cls"]) == 4 and len(decoded) == 4


def test_the_shuffle_buffer_is_bounded_in_bytes():
    from labtrain.data.stages import shuffle

    samples = [{"__key__": f"k{i}", "mp4": bytes(1000)} for i in range(100)]
    peak, held, out = 0, 0, []
    consumed = iter(samples)

    def counting():
        nonlocal held, peak
        for sample in consumed:
            held += 1
            peak = max(peak, held - len(out))
            yield sample

    for sample in shuffle(counting(), buffer_size=64, seed="s", max_bytes=10_000):
        out.append(sample)
    assert sorted(s["__key__"] for s in out) == sorted(s["__key__"] for s in samples)
    assert peak <= 11, f"the buffer held {peak} samples of 1000 bytes under a 10,000-byte bound"
    unbounded = [s["__key__"] for s in shuffle(iter(samples), buffer_size=64, seed="s")]
    assert unbounded != [s["__key__"] for s in out]  # the bound changed what the buffer could mix


class _LoggingDecoder:
    """Decodes a sample and appends its key to a file: the dataloader worker's progress, seen from the test."""

    def __init__(self, path):
        self.path = path

    def __call__(self, sample):
        with open(self.path, "a") as log:
            log.write(sample["__key__"] + "\n")
        return {"__key__": sample["__key__"], "cls": int(sample["cls"])}


@pytest.mark.parametrize("prefetch", [1, 3])
def test_a_worker_runs_at_most_prefetch_batches_ahead(even_shards, tmp_path, prefetch):
    """data.prefetch_batches bounds the finished batches waiting in shared memory (labtrain.sizing counts them):
    while the rank holds its first batch, one worker has made that batch and `prefetch` more, then waits."""
    import time

    log = tmp_path / "decoded.txt"
    cfg = DataConfig(urls=even_shards[0], batch_size=4, num_workers=1, prefetch_batches=prefetch)
    batches = iter(DataStream(cfg, decoder=_LoggingDecoder(log), rank=0, world_size=1))
    next(batches)
    expected = 4 * (1 + prefetch)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (not log.exists() or len(log.read_text().split()) < expected):
        time.sleep(0.05)
    time.sleep(1.0)  # had the worker gone further ahead, it would have by now
    assert len(log.read_text().split()) == expected
    del batches
