"""The GAN tests' in-process models are tiny: on one thread a step takes milliseconds, while two threads on a
2-core machine that also runs the test cluster's processes took 15-100x longer (spinning OpenMP threads)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
