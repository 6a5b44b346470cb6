"""Shard lists and ``index.json``: shard name -> number of samples and bytes.

The index is what lets every rank get the same number of samples per epoch, lets a job resume mid-epoch
exactly, and gives progress bars real totals. labtrain's writer produces it; ``build_index`` computes it
once for shards written elsewhere.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from dataclasses import dataclass

import braceexpand
from tqdm import tqdm

from labtrain.config import S3Config
from labtrain.data.s3 import filesystem, open_url

INDEX_NAME = "index.json"


@dataclass(frozen=True)
class Shard:
    url: str
    num_samples: int
    size_bytes: int


def expand_urls(pattern: str) -> list[str]:
    """``name-{000000..000003}.tar`` -> four URLs; several patterns may be joined with '::'."""
    urls = [url for part in pattern.split("::") for url in braceexpand.braceexpand(part)]
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} names no shards")
    return urls


def default_index_url(pattern: str) -> str:
    first = expand_urls(pattern)[0]
    return posixpath.join(posixpath.dirname(first), INDEX_NAME)


def _read_json(url: str, s3_cfg: S3Config | None = None) -> dict:
    with open_url(url, "rb", s3_cfg) as stream:
        return json.loads(stream.read())


def write_index(url: str, entries: dict[str, dict[str, int]], s3_cfg: S3Config | None = None) -> None:
    payload = json.dumps({"version": 1, "shards": entries}, indent=1, sort_keys=True).encode()
    with open_url(url, "wb", s3_cfg) as stream:
        stream.write(payload)


def load_shards(pattern: str, index_url: str | None = None, s3_cfg: S3Config | None = None) -> list[Shard]:
    """The shards named by ``pattern``, with sizes from the index beside them (on ``s3_cfg``'s store for s3://).

    Raises ValueError naming the shard when the index does not describe it: run `labtrain shards index`.
    """
    urls = expand_urls(pattern)
    index_url = index_url or default_index_url(pattern)
    try:
        entries = _read_json(index_url, s3_cfg)["shards"]
    except FileNotFoundError:
        raise ValueError(
            f"no shard index at {index_url}; write shards with `labtrain shards write` "
            f"or build one with `labtrain shards index '{pattern}'`"
        ) from None
    shards = []
    for url in urls:
        entry = entries.get(posixpath.basename(url))
        if entry is None:
            raise ValueError(f"shard {url} is not in {index_url}; rebuild it with `labtrain shards index '{pattern}'`")
        shards.append(Shard(url, int(entry["num_samples"]), int(entry["size_bytes"])))
    return shards


def count_samples(stream) -> int:
    """Samples in one tar stream: runs of files sharing a key (webdataset's grouping rule)."""
    keys = 0
    last = None
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isreg():
                continue
            base = posixpath.basename(member.name)
            key = posixpath.join(posixpath.dirname(member.name), base.split(".", 1)[0])
            if key != last:
                keys += 1
                last = key
    return keys


def _size(url: str, s3_cfg: S3Config | None) -> int:
    if url.startswith("s3://"):
        return int(filesystem(s3_cfg).size(url))
    return os.path.getsize(url)


def build_index(pattern: str, index_url: str | None = None, *, progress: bool = True, s3_cfg: S3Config | None = None) -> dict[str, dict[str, int]]:
    """Read every shard once and write ``index.json`` beside them (or at ``index_url``); s3:// on ``s3_cfg``'s store."""
    entries: dict[str, dict[str, int]] = {}
    urls = expand_urls(pattern)
    for url in tqdm(urls, desc="indexing shards", unit="shard", disable=not progress):
        with open_url(url, "rb", s3_cfg) as stream:
            entries[posixpath.basename(url)] = {"num_samples": count_samples(stream), "size_bytes": _size(url, s3_cfg)}
    write_index(index_url or default_index_url(pattern), entries, s3_cfg)
    return entries
