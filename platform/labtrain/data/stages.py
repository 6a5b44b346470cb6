"""Streaming stages: plain generators, each ``stage(samples, *, options) -> Iterator``, composed left to right.

Positions. For one epoch the shards are put in a seeded order and their samples numbered 0..N-1 in that
order (the index gives each shard's count without reading it). Rank r owns the contiguous positions
``[r * N // W, (r + 1) * N // W)`` (every rank the same number; the last ``N % W`` are left for the next
epoch's order). Within a rank, positions are "rank positions" 0..per_rank-1. Every sample that leaves
:func:`read_positions` carries its rank position in ``__pos__``, and every position yields exactly one
sample — a real one, or a filler standing in for a lost one — so consumption can be tracked by position
and every rank yields the same number of batches whatever happens to the data.
"""

from __future__ import annotations

import bisect
import logging
import os
import random
import re
import tarfile
import time
import zlib
from collections import deque
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterable, Iterator, Sequence

from torch.utils.data import default_collate
from webdataset import autodecode
from webdataset.tariterators import group_by_keys, tar_file_iterator

from labtrain.config import S3Config
from labtrain.data import s3
from labtrain.data.index import Shard
from labtrain.data.s3 import open_url

log = logging.getLogger(__name__)

Sample = dict[str, Any]
Ranges = list[tuple[int, int]]  # half-open [start, end) intervals of rank positions


class DataError(RuntimeError):
    """The data cannot be read well enough to train on; the message names the shards."""


@dataclass(frozen=True)
class EpochPlan:
    """Which shards, in which order, and which global positions belong to this rank."""

    shards: tuple[Shard, ...]
    starts: tuple[int, ...]  # global position of each shard's first sample
    rank_start: int  # global position of this rank's position 0
    per_rank: int
    seed: int = 0
    epoch: int = 0

    def sample_seed(self, rank_pos: int) -> int:
        """The seed of the sample at ``rank_pos`` this epoch: a decoder that draws random numbers (clip
        windows, crops) seeds them from ``sample["__seed__"]``, so a resumed run draws the same numbers
        whichever dataloader worker decodes the sample."""
        return zlib.crc32(f"{self.seed}:{self.epoch}:{self.rank_start + rank_pos}".encode())

    def locate(self, rank_pos: int) -> tuple[int, int]:
        """(shard number, sample offset inside it) of a rank position."""
        pos = self.rank_start + rank_pos
        i = bisect.bisect_right(self.starts, pos) - 1
        return i, pos - self.starts[i]


def plan_epoch(shards: Sequence[Shard], *, seed: int, epoch: int, rank: int, world_size: int) -> EpochPlan:
    """Seeded shard order for ``epoch`` and this rank's equal share of its positions."""
    order = list(shards)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    starts, total = [], 0
    for shard in order:
        starts.append(total)
        total += shard.num_samples
    per_rank = total // world_size
    if per_rank == 0:
        raise DataError(f"the shards hold {total} samples, fewer than the {world_size} ranks; every rank needs at least one")
    return EpochPlan(tuple(order), tuple(starts), rank * per_rank, per_rank, seed, epoch)


def take(ranges: Ranges, start: int, count: int) -> Ranges:
    """The ``count`` positions after the first ``start`` positions of ``ranges``, as ranges."""
    out: Ranges = []
    for lo, hi in ranges:
        size = hi - lo
        if start >= size:
            start -= size
            continue
        lo += start
        start = 0
        n = min(hi - lo, count)
        if n > 0:
            out.append((lo, lo + n))
            count -= n
        if count == 0:
            break
    return out


def intersect(a: Ranges, b: Ranges) -> Ranges:
    """The positions in both (each a sorted list of disjoint half-open ranges), in order."""
    out: Ranges = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def keep_positions(samples: Iterable[Sample], *, ranges: Ranges) -> Iterator[Sample]:
    """Only the samples whose ``__pos__`` is in ``ranges`` (sorted, disjoint)."""
    starts = [lo for lo, _ in ranges]
    for sample in samples:
        i = bisect.bisect_right(starts, sample["__pos__"]) - 1
        if i >= 0 and sample["__pos__"] < ranges[i][1]:
            yield sample


def split_for_worker(ranges: Ranges, *, batch_size: int, worker: int, num_workers: int) -> Ranges:
    """This dataloader worker's contiguous share of whole batches of ``ranges`` (remainder dropped)."""
    num_batches = sum(hi - lo for lo, hi in ranges) // batch_size
    per_worker = [num_batches // num_workers + (w < num_batches % num_workers) for w in range(num_workers)]
    first = sum(per_worker[:worker]) * batch_size
    return take(ranges, first, per_worker[worker] * batch_size)


_META_FILE = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: files such as __index__ are not sample parts


def _tar_files(stream: IO[bytes], url: str) -> Iterator[Sample]:
    """Each regular file of a tar as webdataset's ``{fname, data, __url__}``. A plain tar on a seekable
    stream (local files and s3fs both are) is read in place, each member's bytes straight from the stream:
    about 1.25x the files/s of webdataset's streaming reader, which a compressed tar still goes through."""
    try:
        tar = tarfile.open(fileobj=stream, mode="r:")
    except tarfile.ReadError:
        stream.seek(0)
        for f in tar_file_iterator(stream):
            f["__url__"] = url
            yield f
        return
    with tar:
        for info in tar:
            if info.isreg() and not _META_FILE.match(info.name):
                stream.seek(info.offset_data)
                data = stream.read(info.size)
                if len(data) != info.size:
                    raise tarfile.ReadError(f"unexpected end of data in {info.name}")
                yield {"fname": info.name, "data": data, "__url__": url}
            tar.members = []  # TarFile keeps every header otherwise


def _size_of(stream) -> int:
    size = getattr(getattr(stream, "raw", stream), "size", None)  # s3fs files (behind their buffer) know their object's size
    return int(size) if size is not None else os.fstat(stream.fileno()).st_size


def _read_shard(shard: Shard, skip: int, count: int, s3_cfg: S3Config | None = None) -> Iterator[Sample]:
    """Samples ``skip .. skip+count`` of one tar; raises if the shard ends early or is corrupt, or is not
    the size the index says. A sample is passed on only once the next one has begun (or the shard ended
    where the index says): the group that ends a broken tar may be missing files."""
    with open_url(shard.url, "rb", s3_cfg) as stream:
        size = _size_of(stream)
        if size != shard.size_bytes:
            raise DataError(f"shard {shard.url} has {size} bytes but the index says {shard.size_bytes}: truncated or rewritten; rebuild the index with `labtrain shards index`")
        seen, held, given = 0, None, 0
        for sample in group_by_keys(_tar_files(stream, shard.url)):
            if held is not None:
                yield held
                given += 1
                if given == count:
                    return
            held = sample if seen >= skip else None
            seen += 1
        if held is not None and seen == shard.num_samples:
            yield held
            given += 1
    if given < count:
        raise DataError(f"shard {shard.url} ended after {seen} samples, but the index promises at least {skip + count}")


def first_sample(shards: Sequence[Shard], s3_cfg: S3Config | None = None) -> Sample | None:
    """The first sample of the first readable shard, undecoded (what a job checks its sampling against
    before it starts), or None."""
    for shard in shards:
        try:
            for sample in _read_shard(shard, 0, 1, s3_cfg):
                return sample
        except (DataError, tarfile.TarError, OSError, EOFError, ValueError):
            continue
    return None


def read_positions(ranges: Ranges, *, plan: EpochPlan, s3_cfg: S3Config | None = None) -> Iterator[Sample]:
    """Open, expand and group the tars behind ``ranges``. A transient error (a reset S3 connection, say)
    reopens the shard after a backoff and carries on at the next sample; a shard that fails for good
    yields ``__lost__`` markers for its remaining positions (and ``__bad_shard__`` once), so the stream
    keeps one sample per position."""
    retry = s3_cfg or S3Config()
    for lo, hi in ranges:
        pos = lo
        while pos < hi:
            i, offset = plan.locate(pos)
            shard = plan.shards[i]
            count = min(hi - pos, shard.num_samples - offset)
            done = attempt = 0
            while True:
                try:
                    for sample in _read_shard(shard, offset + done, count - done, s3_cfg):
                        sample["__pos__"] = pos + done
                        sample["__seed__"] = plan.sample_seed(pos + done)
                        yield sample
                        done += 1
                    break
                except (DataError, tarfile.TarError, OSError, EOFError, ValueError) as error:
                    if s3.is_transient(error) and attempt < retry.max_attempts - 1:
                        delay = retry.backoff_s * 2**attempt
                        log.warning("transient error reading shard %s after %d of %d samples, reopening in %.2fs: %s", shard.url, done, count, delay, error)
                        time.sleep(delay)
                        attempt += 1
                        continue
                    log.warning("skipping unreadable shard %s after %d of %d samples: %s", shard.url, done, count, error)
                    yield {"__bad_shard__": shard.url, "__pos__": pos + done, "__lost__": True}
                    yield from ({"__pos__": p, "__lost__": True} for p in range(pos + done + 1, pos + count))
                    break
            pos += count


def donor_sample(plan: EpochPlan, *, decoder: Callable[[Sample], Sample], transform: Callable[[Sample], Sample] | None, s3_cfg: S3Config | None = None) -> Sample | None:
    """A good sample from anywhere in the epoch's shards: what fills a worker whose whole share was lost
    (its positions stay lost and counted; only the stand-in comes from elsewhere). None if there is none."""
    for shard in plan.shards:
        try:
            for raw in _read_shard(shard, 0, min(shard.num_samples, 8), s3_cfg):
                try:
                    out = decoder(raw)
                    return transform(out) if transform else out
                except Exception:  # noqa: BLE001 - try the next one
                    continue
        except (DataError, tarfile.TarError, OSError, EOFError, ValueError):
            continue
    return None


def decode(samples: Iterable[Sample], *, decoder: Callable[[Sample], Sample]) -> Iterator[Sample]:
    """Decode each sample; one that fails becomes a ``__lost__`` marker at its position (counted later)."""
    for sample in samples:
        if sample.get("__lost__"):
            yield sample
            continue
        pos = sample["__pos__"]
        try:
            out = decoder(sample)
        except Exception as error:  # noqa: BLE001 - any decoder failure makes the sample unusable
            log.warning("skipping sample %s of %s: %s: %s", sample.get("__key__"), sample.get("__url__"), type(error).__name__, error)
            yield {"__pos__": pos, "__lost__": True, "__bad_sample__": sample.get("__key__")}
            continue
        out["__pos__"] = pos
        yield out


def map_samples(samples: Iterable[Sample], *, fn: Callable[[Sample], Sample]) -> Iterator[Sample]:
    for sample in samples:
        if sample.get("__lost__"):
            yield sample
            continue
        pos = sample["__pos__"]
        out = fn(sample)
        out["__pos__"] = pos
        yield out


def fill_lost(samples: Iterable[Sample], *, ring_size: int = 16, donor: Callable[[], Sample | None] | None = None) -> Iterator[Sample]:
    """Replace each lost position by a copy of a recent good sample, so batch counts stay equal on all
    ranks. Yields ``__skipped__`` (lost count) and ``__bad_shards__`` on the filler. When nothing in this
    worker's share was readable, ``donor()`` supplies the stand-in."""
    ring: deque[Sample] = deque(maxlen=ring_size)
    pending: list[Sample] = []
    bad_shards: list[str] = []

    def fillers() -> Iterator[Sample]:
        nonlocal bad_shards
        while pending and ring:
            marker = pending.pop(0)
            filler = dict(ring[marker["__pos__"] % len(ring)])
            filler.update(__pos__=marker["__pos__"], __filler__=True, __skipped__=1, __bad_shards__=bad_shards)
            bad_shards = []
            yield filler

    for sample in samples:
        if sample.get("__lost__"):
            if "__bad_shard__" in sample:
                bad_shards.append(sample["__bad_shard__"])
            pending.append(sample)
        else:
            ring.append(sample)
            yield sample
        if pending:
            yield from fillers()
    if pending and not ring and donor is not None:
        stand_in = donor()
        if stand_in is not None:
            ring.append(stand_in)
            yield from fillers()
    if pending:
        names = ", ".join(sorted(set(bad_shards))) or "(decoding failed for every sample)"
        raise DataError(f"no readable sample in this worker's share or anywhere in the epoch's shards ({len(pending)} positions lost); bad shards: {names}")


def _nbytes(sample: Sample) -> int:
    return sum(len(v) for v in sample.values() if isinstance(v, (bytes, bytearray)))


def shuffle(samples: Iterable[Sample], *, buffer_size: int, seed: str, max_bytes: int | None = None) -> Iterator[Sample]:
    """Seeded buffer shuffle; ``buffer_size`` 0 or 1 passes samples through. ``max_bytes`` bounds what the
    buffer holds (the bytes of its samples as read): large samples give a smaller buffer, never more memory."""
    if buffer_size <= 1:
        yield from samples
        return
    rng = random.Random(seed)
    buffer: list[Sample] = []
    held = 0
    for sample in samples:
        buffer.append(sample)
        held += _nbytes(sample)
        while buffer and (len(buffer) >= buffer_size or (max_bytes is not None and held > max_bytes)):
            out = buffer.pop(rng.randrange(len(buffer)))
            held -= _nbytes(out)
            yield out
    rng.shuffle(buffer)
    yield from buffer


META_KEYS = ("__pos__", "__seed__", "__filler__", "__skipped__", "__bad_shards__", "__url__", "__local_path__")


def batch(samples: Iterable[Sample], *, batch_size: int, collate: Callable[[list[Sample]], Any] = default_collate) -> Iterator[dict]:
    """Group into batches of exactly ``batch_size``; bookkeeping rides along under ``__meta__``."""
    group: list[Sample] = []
    for sample in samples:
        group.append(sample)
        if len(group) == batch_size:
            meta = {
                "positions": [s["__pos__"] for s in group],
                "skipped": sum(s.get("__skipped__", 0) for s in group),
                "bad_shards": [u for s in group for u in s.get("__bad_shards__", ())],
            }
            payload = collate([{k: v for k, v in s.items() if k not in META_KEYS} for s in group])
            yield {"data": payload, "__meta__": meta}
            group = []


def webdataset_decoder(image_spec: str | None = None) -> Callable[[Sample], Sample]:
    """webdataset's own decoder: npy, cls, json, txt ... and images as ``image_spec`` ('torchrgb', 'pil', ...)."""
    handlers = [autodecode.imagehandler(image_spec)] if image_spec else []
    return autodecode.Decoder(handlers)
