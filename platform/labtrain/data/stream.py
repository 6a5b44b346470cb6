"""A rank's view of a sharded dataset: equal batches on every rank, exact resume, bad data counted.

``DataStream`` is what a training function iterates. It wraps a ``torch.utils.data.DataLoader`` over a
:class:`ShardStream` (the stages of :mod:`labtrain.data.stages`, one chain per dataloader worker) and keeps
the state that makes resume exact: the epoch, the rank positions not yet consumed and the number of dataloader
workers the epoch began with. A batch counts as consumed when it is handed to the training loop, so a
checkpoint taken after step k restores to the batch after k. Resumed with the same number of dataloader
workers, the rest of the epoch is the very batches the interrupted run would have made, in its order: each
worker replays its share of the epoch through the shuffle buffer from the start (reading, not decoding, the
samples already consumed) and drops what was consumed. With another number of workers, the rest of the epoch
is split anew: each remaining sample once, in another order.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from labtrain import dist
from labtrain.config import DataConfig
from labtrain.data import stages
from labtrain.data.index import Shard, load_shards
from labtrain.data.stages import DataError, Ranges

log = logging.getLogger(__name__)


def _subtract(ranges: Ranges, positions: list[int]) -> Ranges:
    """``ranges`` without ``positions`` (each must be inside)."""
    taken = sorted(positions)
    out: Ranges = []
    j = 0
    for lo, hi in ranges:
        start = lo
        while j < len(taken) and taken[j] < hi:
            p = taken[j]
            assert p >= start, f"position {p} consumed twice or outside the remaining ranges"
            if p > start:
                out.append((start, p))
            start = p + 1
            j += 1
        if start < hi:
            out.append((start, hi))
    assert j == len(taken), "a consumed position was not among the remaining ones"
    return out


class ShardStream(IterableDataset):
    """The per-worker stage chain over this rank's remaining positions of one epoch."""

    def __init__(self, cfg: DataConfig, shards: list[Shard], *, decoder, transform, collate):
        self.cfg = cfg
        self.shards = shards
        self.decoder = decoder
        self.transform = transform
        self.collate = collate
        self.epoch = 0
        self.plan: stages.EpochPlan | None = None
        self.remaining: Ranges = []
        self.epoch_workers: int | None = None  # the dataloader workers this epoch began with

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        cfg, plan = self.cfg, self.plan
        left = sum(hi - lo for lo, hi in self.remaining)
        if self.epoch_workers == num_workers:
            # The epoch began with as many workers: replay each worker's share as the epoch began, so the
            # batches still to come are the very ones (and in the order) the interrupted run would have made.
            # k batches are consumed, and the loader hands batches out round-robin from worker 0: this worker
            # plays the epoch's worker (worker + k) % num_workers, whose turn was next.
            consumed = (plan.per_rank - left) // cfg.batch_size
            role = (worker + consumed) % num_workers
            share = stages.split_for_worker([(0, plan.per_rank)], batch_size=cfg.batch_size, worker=role, num_workers=num_workers)
            seed_parts = (role, plan.per_rank)
            # The buffer's order depends on every sample that went through it: with one, read the share from the
            # start (the consumed samples are read again, not decoded) and drop the consumed ones after it.
            replay = cfg.shuffle_buffer > 1
            source: Any = stages.read_positions(share if replay else stages.intersect(share, self.remaining), plan=plan, s3_cfg=cfg.s3)
        else:
            # Resumed with another number of dataloader workers: the rest of the epoch is split anew, each
            # remaining sample once, in another order.
            seed_parts, replay = (worker, left), False
            source = stages.read_positions(
                stages.split_for_worker(self.remaining, batch_size=cfg.batch_size, worker=worker, num_workers=num_workers), plan=plan, s3_cfg=cfg.s3
            )
        # The shuffle buffer holds samples as read (encoded bytes: a JPEG, an .mp4, an npy), decoding comes
        # after it: a buffer of decoded float clips would hold ~100x the bytes (VATT base: 19 MB a clip).
        chain = [
            functools.partial(stages.shuffle, buffer_size=cfg.shuffle_buffer, max_bytes=int(cfg.shuffle_buffer_mb * 2**20),
                              seed=f"{cfg.seed}:{self.epoch}:{plan.rank_start}:{seed_parts[0]}:{seed_parts[1]}"),
            functools.partial(stages.keep_positions, ranges=self.remaining) if replay else None,
            functools.partial(stages.decode, decoder=self.decoder),
            functools.partial(stages.map_samples, fn=self.transform) if self.transform else None,
            functools.partial(stages.fill_lost, donor=functools.partial(stages.donor_sample, plan, decoder=self.decoder, transform=self.transform, s3_cfg=cfg.s3)),
            functools.partial(stages.batch, batch_size=cfg.batch_size, collate=self.collate),
        ]
        samples: Any = source
        for stage in filter(None, chain):
            samples = stage(samples)
        return samples


class DataStream:
    """Iterate for one epoch's batches of this rank; ``state_dict``/``load_state_dict`` for exact resume.

    Each batch is what ``collate`` made of the samples (by default a dict of stacked tensors, with the
    sample keys under ``__key__``). Batches per epoch are equal on every rank: ``per_rank // batch_size``.
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        decoder: Callable | None = None,
        transform: Callable | None = None,
        collate: Callable | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        metrics=None,
        pin_memory: bool = False,
    ):
        self.cfg = cfg
        self.rank = dist.rank() if rank is None else rank
        self.world_size = dist.world_size() if world_size is None else world_size
        self.shards = load_shards(cfg.urls, cfg.index, cfg.s3)
        self.metrics = metrics
        self.pin_memory = pin_memory
        self.dataset = ShardStream(
            cfg,
            self.shards,
            decoder=decoder or stages.webdataset_decoder(),
            transform=transform,
            collate=collate or torch.utils.data.default_collate,
        )
        self.epoch = 0
        self.remaining: Ranges | None = None  # None: the whole epoch is ahead
        self.epoch_workers: int | None = None  # the dataloader workers (0 counts as 1) this epoch began with
        self.bad_shards: set[str] = set()
        self.skipped_samples = 0
        self._plan()

    def _plan(self) -> None:
        plan = stages.plan_epoch(self.shards, seed=self.cfg.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size)
        if plan.per_rank < self.cfg.batch_size:
            raise DataError(
                f"each of the {self.world_size} ranks gets {plan.per_rank} samples per epoch, fewer than "
                f"batch_size={self.cfg.batch_size}; lower data.batch_size or use fewer workers"
            )
        self.plan = plan
        if self.remaining is None:
            self.remaining = [(0, plan.per_rank)]

    def __len__(self) -> int:
        """Batches left in the current epoch on this rank (the same on every rank)."""
        return sum(hi - lo for lo, hi in self.remaining) // self.cfg.batch_size

    @property
    def samples_per_epoch(self) -> int:
        return self.plan.per_rank // self.cfg.batch_size * self.cfg.batch_size

    def __iter__(self) -> Iterator[Any]:
        """This epoch's remaining batches; at the end the stream moves on to the next epoch."""
        workers = max(self.cfg.num_workers, 1)
        if self.remaining == [(0, self.plan.per_rank)]:
            self.epoch_workers = workers
        elif self.epoch_workers != workers:
            log.info("rank %d: epoch %d began with %s dataloader workers and resumes with %d: its remaining samples come once each, in another "
                     "order than the interrupted run's", self.rank, self.epoch, self.epoch_workers or "unknown", workers)
        self.dataset.epoch, self.dataset.plan, self.dataset.remaining = self.epoch, self.plan, list(self.remaining)
        self.dataset.epoch_workers = self.epoch_workers
        if self.cfg.num_workers == 0:
            # In this process: a DataLoader would only walk every batch through default_convert.
            loader: Any = iter(self.dataset)
        else:
            loader = DataLoader(
                self.dataset,
                batch_size=None,
                num_workers=self.cfg.num_workers,
                pin_memory=self.pin_memory,  # page-locked batches: .to(device, non_blocking=True) overlaps the copy
                prefetch_factor=self.cfg.prefetch_batches,  # batches per worker waiting in /dev/shm (labtrain.sizing)
                persistent_workers=False,  # the worker split is recomputed from what remains each epoch
                # A generator of its own: by default each new loader draws its seed from torch's global RNG,
                # so a resumed run (which builds a loader where the first run did not) would train on other
                # random numbers from then on.
                generator=torch.Generator().manual_seed(hash((self.cfg.seed, self.epoch, self.rank)) % 2**63),
            )
        for item in loader:
            meta = item["__meta__"]
            self.remaining = _subtract(self.remaining, meta["positions"])
            self._count_bad(meta)
            yield item["data"]
        self.epoch += 1
        self.remaining = None
        self._plan()

    def _count_bad(self, meta: dict) -> None:
        new_shards = set(meta["bad_shards"]) - self.bad_shards
        self.bad_shards |= new_shards
        self.skipped_samples += meta["skipped"]
        if self.metrics is not None:
            self.metrics.skipped(shards=len(new_shards), samples=meta["skipped"])
        if len(self.bad_shards) > self.cfg.max_bad_shards:
            raise DataError(
                f"{len(self.bad_shards)} unreadable shards on rank {self.rank}, more than "
                f"data.max_bad_shards={self.cfg.max_bad_shards}: {', '.join(sorted(self.bad_shards))}. "
                "Fix or remove them (and rebuild the index), or raise data.max_bad_shards."
            )

    def fingerprint(self) -> dict[str, Any]:
        """What the positions mean: the same positions over other shards, seed or batch size are other samples."""
        return {"seed": self.cfg.seed, "batch_size": self.cfg.batch_size, "shards": [[s.url.rsplit("/", 1)[-1], s.num_samples] for s in self.shards]}

    def state_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint(),
            "epoch": self.epoch,
            "remaining": [list(r) for r in self.remaining],
            "rank": self.rank,
            "world_size": self.world_size,
            "bad_shards": sorted(self.bad_shards),
            "skipped_samples": self.skipped_samples,
            "epoch_workers": self.epoch_workers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"data state was saved with {state['world_size']} ranks but this run has {self.world_size}; "
                "resume with the same number of workers (the epoch's split depends on it)"
            )
        saved = state.get("fingerprint")
        if saved is not None and saved != self.fingerprint():
            changed = [k for k in saved if saved[k] != self.fingerprint()[k]]
            raise ValueError(
                f"data state was saved for other data ({', '.join(changed)} changed): its positions would name "
                "other samples. Resume with the same shards, index, data.seed and data.batch_size, or start a new run.name"
            )
        self.epoch = state["epoch"]
        self.remaining = [tuple(r) for r in state["remaining"]]
        self.bad_shards = set(state["bad_shards"])
        self.skipped_samples = state["skipped_samples"]
        self.epoch_workers = state.get("epoch_workers")  # absent in checkpoints from before it was kept: not replayed
        self._plan()
