"""Shard writer and index: target sizes, counts, and indexing shards written elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds

from labtrain.data import build_index, load_shards, write_shards
from tests.data.conftest import make_samples


def test_writer_rolls_over_at_target_size_and_indexes(tmp_path):
    samples = [{"__key__": f"s{i:04d}", "bin": bytes(1000)} for i in range(50)]
    pattern = write_shards(samples, str(tmp_path), target_bytes=10_000, progress=False)
    index = json.loads((tmp_path / "index.json").read_text())["shards"]
    assert len(index) > 3
    assert sum(e["num_samples"] for e in index.values()) == 50
    for name, entry in index.items():
        assert entry["size_bytes"] == (tmp_path / name).stat().st_size
    # equal samples make equal shards: each closes on the sample that takes it past the target
    counts = [index[n]["num_samples"] for n in sorted(index)]
    assert len(set(counts[:-1])) == 1 and 1 <= counts[-1] <= counts[0]
    assert [s.num_samples for s in load_shards(pattern)] == [index[n]["num_samples"] for n in sorted(index)]


def test_sample_without_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="__key__"):
        write_shards([{"cls": 1}], str(tmp_path), progress=False)


def test_index_of_foreign_shards(tmp_path):
    """Shards written with plain webdataset get the same index by reading them once."""
    counts = [5, 9, 1]
    start = 0
    for i, count in enumerate(counts):
        with wds.TarWriter(str(tmp_path / f"foreign-{i:03d}.tar")) as sink:
            for sample in make_samples(count, start):
                sink.write(sample)
        start += count
    pattern = str(tmp_path / "foreign-{000..002}.tar")
    with pytest.raises(ValueError, match="labtrain shards index"):
        load_shards(pattern)
    build_index(pattern, progress=False)
    assert [s.num_samples for s in load_shards(pattern)] == counts


def test_cli_writes_shards_from_a_folder_of_files(tmp_path):
    src = tmp_path / "files"
    src.mkdir()
    for i in range(12):
        np.save(src / f"{i:03d}.npy", np.arange(i))
        (src / f"{i:03d}.cls").write_text(str(i % 2))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "labtrain.cli", "shards", "write", str(src), str(out), "--max-samples", "5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pattern = proc.stdout.strip().splitlines()[-1]
    assert [s.num_samples for s in load_shards(pattern)] == [5, 5, 2]
    assert "12/12" in proc.stderr  # the progress bar reached the real total
    keys = [s["__key__"] for s in wds.WebDataset(pattern, shardshuffle=False)]
    assert keys == [f"{i:03d}" for i in range(12)]
