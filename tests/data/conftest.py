from __future__ import annotations

import numpy as np
import pytest

from labtrain.data import write_shards


def make_samples(n: int, start: int = 0):
    for i in range(start, start + n):
        yield {"__key__": f"k{i:06d}", "npy": np.full(3, i, dtype=np.int64), "cls": i % 5}


@pytest.fixture
def uneven_shards(tmp_path):
    """Shards of very different sizes (1 to 60 samples), 171 samples in all."""
    sizes = [13, 60, 1, 7, 45, 2, 43]
    out = tmp_path / "uneven"
    from labtrain.data import ShardWriter

    with ShardWriter(str(out)) as writer:
        start = 0
        for size in sizes:
            for sample in make_samples(size, start):
                writer.write(sample)
            writer._close()  # end the shard here
            start += size
    return writer.pattern, sum(sizes)


@pytest.fixture
def even_shards(tmp_path):
    """256 samples in 8 shards of 32."""
    return write_shards(make_samples(256), str(tmp_path / "even"), max_samples=32, progress=False), 256
