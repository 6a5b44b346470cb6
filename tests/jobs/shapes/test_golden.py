"""The smallest job's first steps against a golden loss file, read back from its TensorBoard events.

A change to the training API, a strategy, the data path or the model that moves the numbers fails here in
seconds, without a cluster (Ray Train's local mode: the function runs in this process). After an intended
change, rewrite the file with ``LABTRAIN_UPDATE_GOLDEN=1 pytest tests/jobs/shapes/test_golden.py`` and say why
in the commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jobs.shapes.__main__ import prepare
from jobs.shapes.config import ShapesConfig
from jobs.shapes.train import train
from labtrain import storage
from labtrain.config import load_config
from labtrain.train import run
from tests.conftest import REPO

GOLDEN = Path(__file__).with_name("golden_loss.json")
NUM_STEPS = 8


def scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_the_first_steps_match_the_golden_losses(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.STORAGE_ROOT_ENV, str(tmp_path))
    overrides = ["synthetic.write=true", "synthetic.num_samples=512", "synthetic.samples_per_shard=128", "data.urls=data/shard-{000000..000003}.tar",
                 "data.num_workers=0", "data.shuffle_buffer=32", "run.num_workers=0", "run.name=golden", "run.log_every=1",
                 f"max_steps={NUM_STEPS}", "checkpoint_every=1000", "num_val_samples=64"]
    cfg = prepare(storage.resolve_paths(load_config(ShapesConfig, REPO / "jobs/shapes/configs/demo.yaml", overrides)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run(train, cfg, cfg.run, kind="shapes")
    finally:
        torch.set_num_threads(threads)
    assert result.error is None
    logdir = tmp_path / "shapes/checkpoints/golden/tensorboard"
    losses = scalars(logdir, "train/loss")
    assert [s for s, _ in losses] == list(range(1, NUM_STEPS + 1))
    lrs = scalars(logdir, "train/lr")
    assert lrs[0][1] < cfg.lr and lrs[-1][1] == pytest.approx(0.0, abs=1e-9)  # cosine over max_steps, stepped by the job
    if os.environ.get("LABTRAIN_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"config": overrides, "loss": [v for _, v in losses]}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["config"] == overrides, "the golden file was written for other settings; rewrite it"
    torch.testing.assert_close(torch.tensor([v for _, v in losses]), torch.tensor(golden["loss"]), rtol=1e-4, atol=1e-5)
