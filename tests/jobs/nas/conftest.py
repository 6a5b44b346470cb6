"""Fixtures of the NAS tests: the NAS-Bench-201 CIFAR-10 table, small tables of the same shape, tiny live configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.nas.config import NasConfig
from labtrain.config import build_config
from tests.conftest import SHARED

NB201_TABLE = SHARED / "data" / "nas-bench-201" / "cifar10.csv"


@pytest.fixture(scope="session")
def nb201_table() -> Path:
    assert NB201_TABLE.is_file(), f"the reference table {NB201_TABLE} is missing: the NAS tests read the lab's shared folder beside the checkout or one of its parents, or LABTRAIN_SHARED_DIR"
    return NB201_TABLE


def write_subset(table: Path, out: Path, rows: int, *, step: int = 1, keep_best: bool = True) -> Path:
    """Every ``step``-th row of ``table`` (up to ``rows``), plus the best row if ``keep_best``."""
    lines = table.read_text().splitlines()
    header, body = lines[0], lines[1:]
    chosen = body[::step][:rows]
    if keep_best:
        best = max(body, key=lambda line: float(line.rsplit(",", 1)[1]))
        chosen = [line for line in chosen if line != best] + [best]
    out.write_text("\n".join([header, *chosen]) + "\n")
    return out


def live_config(tmp_path: Path, *, space: dict, name: str, budget: int, video: bool = False, **search) -> NasConfig:
    """A live search small enough for 2 cores: 8x8 inputs, 96 training samples, 3 epochs (18 steps), and
    a 2 x 64 MLP predictor (the default 4 x 1000 takes seconds per fit)."""
    data = tmp_path / "data" / name
    weaknas = {"predictor": {"hidden_sizes": [64, 64]}, **search.pop("weaknas", {})}
    return build_config(NasConfig, {
        "name": name,
        "output": str(tmp_path / "out"),
        "space": space,
        "evaluator": {
            "kind": "train",
            "train": {"urls": str(data / "train" / "shard-{000000..000002}.tar"), "batch_size": 16},
            "val": {"urls": str(data / "val" / "shard-{000000..000001}.tar"), "batch_size": 32},
            "input": {"num_classes": 4, "channels": 1 if video else 3, "image_size": 8, "num_frames": 3, "noise": 0.5,
                      "num_train_samples": 96, "num_val_samples": 64, "samples_per_shard": 32, "write_synthetic": True},
            "epochs": 3,
        },
        "search": {"methods": ["weaknas"], "budget": budget, "weaknas": weaknas, **search},
        "trials": {"max_concurrent": 4, "cpus_per_trial": 1, "max_retries": 2},
    })
