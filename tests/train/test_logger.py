"""The session's logger: progress lines and TensorBoard from rank 0 only, gauges on every rank, s3:// runs."""

from __future__ import annotations

import logging

import pytest
import torch
from prometheus_client import CollectorRegistry

from labtrain.config import RunConfig
from labtrain.metrics import TrainMetrics
from labtrain.train.logger import RunLogger
from tests.jobs.shapes.test_golden import scalars


def make_logger(cfg: RunConfig, rank: int) -> tuple[RunLogger, TrainMetrics]:
    metrics = TrainMetrics(job=cfg.name, kind="probe", rank=rank, registry=CollectorRegistry())
    logger = RunLogger(cfg, rank=rank, world_size=2, kind="probe", metrics=metrics)
    logger.total_steps = 6
    return logger, metrics


def drive(logger: RunLogger) -> None:
    logger.start()
    for step in range(1, 7):
        logger.batch_ready(num_samples=8)
        logger.batch_done(step_s=0.01, data_wait_s=0.01)
        logger.log(step, epoch=0, lrs=lambda: [0.1, 0.2], scalars={"loss": torch.tensor(2.0 / step), "conflict_rate": 0.25})
    logger.image(6, "samples", torch.rand(3, 8, 8))
    logger.close()


def test_rank_zero_prints_every_interval_and_writes_tensorboard(tmp_path, caplog):
    cfg = RunConfig(name="logged", storage_path=str(tmp_path), log_every=2)
    logger, metrics = make_logger(cfg, rank=0)
    with caplog.at_level(logging.INFO, logger="labtrain.progress"):
        drive(logger)
    lines = [r.getMessage() for r in caplog.records if r.name == "labtrain.progress"]
    assert len(lines) == 3 and lines[0].startswith("step 2/6 (33%) | epoch 0 | ") and "ETA" in lines[0]
    assert "loss 1 |" in lines[0] and "conflict_rate 0.25" in lines[0] and "lr 0.1" in lines[0] and "data wait 50%" in lines[0]
    logdir = tmp_path / "logged" / "tensorboard"
    assert [s for s, _ in scalars(logdir, "train/loss")] == [2, 4, 6]
    assert scalars(logdir, "train/lr_1")[0][1] == pytest.approx(0.2) and scalars(logdir, "train/conflict_rate")[-1][1] == 0.25
    assert 0.45 < scalars(logdir, "perf/data_wait_share")[0][1] < 0.55
    assert scalars(logdir, "perf/samples_per_s")[0][1] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [6]
    assert metrics.registry.get_sample_value("labtrain_train_loss", {"job": "logged", "kind": "probe", "rank": "0"}) == pytest.approx(2.0 / 6)


def test_other_ranks_print_nothing_and_write_no_events_but_keep_their_gauges(tmp_path, caplog):
    cfg = RunConfig(name="quiet", storage_path=str(tmp_path), log_every=2)
    logger, metrics = make_logger(cfg, rank=1)
    with caplog.at_level(logging.INFO, logger="labtrain.progress"):
        drive(logger)
        logger.info("only rank 0 says this")
    assert not [r for r in caplog.records if r.name == "labtrain.progress"]
    assert not (tmp_path / "quiet").exists()
    labels = {"job": "quiet", "kind": "probe", "rank": "1"}
    assert metrics.registry.get_sample_value("labtrain_train_learning_rate", labels) == 0.1
    assert metrics.registry.get_sample_value("labtrain_probe_conflict_rate", labels) == 0.25


def test_an_s3_run_gets_its_events_uploaded(s3_bucket, tmp_path):
    from labtrain.data import s3

    bucket, s3_cfg = s3_bucket
    cfg = RunConfig(name="remote", storage_path=f"s3://{bucket}/runs", log_every=3, s3=s3_cfg)
    logger, _ = make_logger(cfg, rank=0)
    drive(logger)
    fs = s3.filesystem(s3_cfg)
    files = fs.find(f"{bucket}/runs/remote/tensorboard")
    assert len(files) == 1 and "tfevents" in files[0]
    fs.get(files[0], str(tmp_path / "events" / "events.out.tfevents.copy"))
    assert [s for s, _ in scalars(tmp_path / "events", "train/loss")] == [3, 6]
