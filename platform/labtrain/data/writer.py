"""Shard writer: an iterable of samples -> webdataset tars of a target size, plus ``index.json``.

A sample is a dict with a ``__key__`` and one entry per file: bytes are written as they are, other
values are encoded by webdataset by their extension (``cls`` -> text, ``npy`` -> numpy, ``json`` ...).
"""

from __future__ import annotations

import io
import os
import posixpath
import time
from typing import Any, Iterable

import webdataset as wds
from tqdm import tqdm

from labtrain.config import S3Config
from labtrain.data.index import INDEX_NAME, write_index
from labtrain.data.s3 import open_url


class ShardWriter:
    """Writes ``<out>/<prefix>-000000.tar`` ... rolling over at ``target_bytes`` or ``max_samples``; an
    s3:// ``out`` is written on ``s3``'s store (default: the standard AWS environment variables)."""

    def __init__(self, out: str, *, prefix: str = "shard", target_bytes: int = 64 * 2**20, max_samples: int | None = None, s3: S3Config | None = None):
        if target_bytes <= 0:
            raise ValueError(f"target_bytes must be positive, got {target_bytes}")
        self.out = out.rstrip("/")
        self.prefix = prefix
        self.target_bytes = target_bytes
        self.max_samples = max_samples
        self.s3 = s3 or S3Config()
        self.entries: dict[str, dict[str, int]] = {}
        self._buffer: io.BytesIO | None = None
        self._tar: wds.TarWriter | None = None
        self._name = ""
        self._count = 0
        if not out.startswith("s3://"):
            os.makedirs(out, exist_ok=True)

    def _open(self) -> None:
        self._name = f"{self.prefix}-{len(self.entries):06d}.tar"
        self._buffer = io.BytesIO()
        # A whole-second mtime: a float one makes tarfile add a PAX header to every member, which doubles
        # the headers every reader parses.
        self._tar = wds.TarWriter(self._buffer, mtime=int(time.time()))
        self._count = 0

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        data = self._buffer.getvalue()
        with open_url(posixpath.join(self.out, self._name), "wb", self.s3) as stream:
            stream.write(data)
        self.entries[self._name] = {"num_samples": self._count, "size_bytes": len(data)}
        self._tar = self._buffer = None

    def write(self, sample: dict[str, Any]) -> None:
        if "__key__" not in sample:
            raise ValueError(f"sample has no '__key__' (keys: {sorted(sample)}); every sample needs a unique key")
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._count += 1
        full = self._buffer.tell() >= self.target_bytes
        if full or (self.max_samples is not None and self._count >= self.max_samples):
            self._close()

    def close(self) -> dict[str, dict[str, int]]:
        """Flush the last shard and write ``index.json``; returns the index entries."""
        self._close()
        write_index(posixpath.join(self.out, INDEX_NAME), self.entries, self.s3)
        return self.entries

    @property
    def pattern(self) -> str:
        """The brace pattern naming every shard written."""
        last = max(len(self.entries) - 1, 0)
        return posixpath.join(self.out, f"{self.prefix}-{{000000..{last:06d}}}.tar")

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_shards(samples: Iterable[dict[str, Any]], out: str, *, total: int | None = None, progress: bool = True, **kwargs) -> str:
    """Write ``samples`` as shards under ``out``; returns their brace pattern."""
    with ShardWriter(out, **kwargs) as writer:
        for sample in tqdm(samples, total=total, desc=f"writing shards to {out}", unit="sample", disable=not progress):
            writer.write(sample)
    return writer.pattern
