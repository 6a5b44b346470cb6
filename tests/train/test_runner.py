"""The runner on a real 2-node local Ray cluster: strategies, checkpoints, failures, placement, S3."""

from __future__ import annotations

import collections
import json
import os
import uuid

import pytest
import torch

from labtrain.config import DataConfig, RunConfig
from labtrain.data import write_shards
from labtrain.train import run
from tests.data.conftest import make_samples
from tests.train.helpers import ProbeConfig, StallFirstController, probe_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """256 samples in 8 shards: with 2 ranks and batch 8, 16 steps per epoch and nothing dropped."""
    return write_shards(make_samples(256), str(tmp_path_factory.mktemp("shards")), max_samples=32, progress=False)


def probe(shards: str, tmp_path, **run_fields) -> ProbeConfig:
    run_cfg = RunConfig(name=f"probe-{uuid.uuid4().hex[:8]}", num_workers=2, storage_path=str(tmp_path / "ckpt"), **run_fields)
    return ProbeConfig(data=DataConfig(urls=shards, batch_size=8, seed=1), run=run_cfg)


def rank_states(result) -> list[dict]:
    with result.checkpoint.as_directory() as path:
        files = sorted(f for f in os.listdir(path) if f.startswith("rank-"))
        return [torch.load(os.path.join(path, f), weights_only=False) for f in files]


@pytest.mark.parametrize(
    "strategy",
    [{"strategy": "ddp"}, {"strategy": "accelerate"}, {"strategy": "deepspeed", "zero_stage": 2}],
    ids=["ddp", "accelerate", "deepspeed-zero2"],
)
def test_strategy_trains_on_two_workers_and_resumes_its_own_checkpoint(ray_cluster, shards, tmp_path, strategy):
    cfg = probe(shards, tmp_path, **strategy).model_copy(update={"max_steps": 4})
    first = run(probe_train, cfg, cfg.run, kind="probe")
    assert first.error is None
    second_cfg = cfg.model_copy(update={"max_steps": 9})
    second = run(probe_train, second_cfg, second_cfg.run, kind="probe")  # same name: continues the run
    assert second.error is None and second.metrics["step"] == 9
    states = rank_states(second)
    assert len(states) == 2
    for state in states:
        extra = state["extra"]
        assert extra["restored_from"] == [4]
        assert extra["info"]["world_size"] == 2
        if strategy["strategy"] == "accelerate":
            assert extra["info"]["num_processes"] == 2
        if strategy["strategy"] == "deepspeed":
            assert extra["info"]["zero_stage"] == 2
        assert len(extra["keys"]) == 9 * 8 == len(set(extra["keys"]))
    all_keys = states[0]["extra"]["keys"] + states[1]["extra"]["keys"]
    assert len(set(all_keys)) == len(all_keys)  # the two ranks never share a sample
    # Different samples, so different losses on each rank; the same weights only if gradients were averaged.
    assert states[0]["extra"]["losses"] != states[1]["extra"]["losses"]
    assert abs(states[0]["extra"]["param_sum"] - states[1]["extra"]["param_sum"]) < 1e-5


@pytest.mark.parametrize("stage", [1, 3])
def test_deepspeed_zero_stages(ray_cluster, shards, tmp_path, stage):
    cfg = probe(shards, tmp_path, strategy="deepspeed", zero_stage=stage).model_copy(update={"max_steps": 3})
    result = run(probe_train, cfg, cfg.run, kind="probe")
    assert result.error is None
    assert {s["extra"]["info"]["zero_stage"] for s in rank_states(result)} == {stage}


def test_killed_worker_resumes_from_checkpoint_without_losing_or_repeating_a_sample(ray_cluster, shards, tmp_path):
    marker = tmp_path / "killed"
    cfg = probe(shards, tmp_path, max_failures=1).model_copy(
        # Ray Train registers a reported checkpoint when its controller next polls the workers (about
        # once a second, later on a loaded machine): steps of a quarter second leave it two checkpoints
        # (steps 3 and 6) and over 1.5 s to register one of them before the kill at 9.
        update={"epochs": 2, "checkpoint_every": 3, "kill_rank_at_step": 9, "kill_marker": str(marker), "step_sleep_s": 0.25}
    )
    result = run(probe_train, cfg, cfg.run, kind="probe")
    assert marker.exists(), "the worker was never killed"
    assert result.error is None
    assert result.metrics["step"] == 32
    states = rank_states(result)
    pids = set()
    restored = {tuple(state["extra"]["restored_from"]) for state in states}
    assert restored in ({(3,)}, {(6,)}), f"both ranks resume once, from a checkpoint before the kill: {restored}"
    for state in states:
        pids.add(state["extra"]["info"]["pid"])
    counts = collections.Counter(k for s in states for k in s["extra"]["keys"])
    assert len(counts) == 256 and set(counts.values()) == {2}, "every sample exactly once per epoch"


def test_workers_are_placed_on_both_nodes(ray_cluster, shards, tmp_path):
    cfg = probe(shards, tmp_path, resources_per_worker={"labtrain_node": 1}).model_copy(update={"max_steps": 2})
    result = run(probe_train, cfg, cfg.run, kind="probe")
    assert result.error is None
    assert len({s["extra"]["info"]["node"] for s in rank_states(result)}) == 2


def test_checkpoints_on_s3_resume(ray_cluster, shards, tmp_path, s3_bucket):
    bucket, s3_cfg = s3_bucket
    cfg = probe(shards, tmp_path).model_copy(update={"max_steps": 3})
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"storage_path": f"s3://{bucket}/runs", "s3": s3_cfg})})
    assert run(probe_train, cfg, cfg.run, kind="probe").error is None
    from labtrain.data import s3

    assert any("rank-00001.pt" in p for p in s3.filesystem(s3_cfg).find(f"{bucket}/runs/{cfg.run.name}"))
    second = cfg.model_copy(update={"max_steps": 5})
    result = run(probe_train, second, second.run, kind="probe")
    assert result.error is None
    assert all(s["extra"]["restored_from"] == [3] for s in rank_states(result))


def test_a_controller_that_never_starts_its_workers_is_restarted(ray_cluster, shards, tmp_path, caplog):
    # 30 s: the second attempt's workers must start within it on a loaded 2-core machine (15 s was seen to fail)
    cfg = probe(shards, tmp_path, start_timeout_s=30)
    cfg = cfg.model_copy(update={"max_steps": 2})
    marker = tmp_path / "stalled"
    with caplog.at_level("WARNING", logger="labtrain.train"):
        result = run(probe_train, cfg, cfg.run, kind="probe", callbacks=[StallFirstController(str(marker))])
    assert marker.exists() and result.error is None
    assert result.metrics["step"] == 2
    text = caplog.text
    assert "has not started workers in 30 s; its stack" in text and "after_controller_start" in text  # py-spy's dump
    assert "attempt 1 of 2" in text


def test_a_failed_run_ends_with_one_error_line_naming_the_cause(ray_cluster, shards, tmp_path, capsys):
    """The last thing a failed job prints is one `error:` line with the job's own exception, not Ray
    Train's multi-line TrainingFailedError (the queue shows that line as the job's REASON)."""
    import yaml

    from labtrain.launch import job_main

    config = tmp_path / "probe.yaml"
    config.write_text(yaml.safe_dump({"data": {"urls": shards, "batch_size": 8}, "fail_at_step": 2}))
    status = job_main(ProbeConfig, probe_train, kind="probe", argv=["--config", str(config), "--workers", "2", "--name", f"fail-{uuid.uuid4().hex[:6]}",
                                                                   f"run.storage_path={tmp_path / 'ckpt'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert err[-1].startswith("error: the run failed: RuntimeError: the probe's loss became NaN at step 2"), err[-5:]


def test_under_an_autoscaler_the_gang_is_checked_against_the_nodes_it_may_start(monkeypatch):
    """The chart's LABTRAIN_AUTOSCALING lists the worker groups' node types and maxReplicas: a gang larger than
    the live cluster passes (the autoscaler will add nodes), one that even every node at maxReplicas could not hold
    is refused. No Ray call is made: the live nodes do not matter here."""
    from labtrain.train.runner import GangDoesNotFitError, check_gang_fits

    types = [{"group": "a100", "max": 4, "resources": {"CPU": 32, "GPU": 8, "labtrain_node": 1, "a100": 8}},
             {"group": "rtx", "max": 2, "resources": {"CPU": 16, "GPU": 2, "labtrain_node": 1}}]
    monkeypatch.setenv("LABTRAIN_AUTOSCALING", json.dumps(types))
    monkeypatch.setattr("ray.nodes", lambda: pytest.fail("the live nodes were read under an autoscaler"))
    check_gang_fits(RunConfig(name="base", num_workers=32, gpus_per_worker=1, cpus_per_worker=4))  # 4 a100 nodes x 8
    check_gang_fits(RunConfig(name="mixed", num_workers=36, gpus_per_worker=1, cpus_per_worker=4))  # and both rtx nodes' 2
    with pytest.raises(GangDoesNotFitError, match=r"37 workers of CPU=4, GPU=1 do not fit: the 6 nodes the autoscaler can start "
                                                  r"\(every group at its maxReplicas\) hold at most 36"):
        check_gang_fits(RunConfig(name="big", num_workers=37, gpus_per_worker=1, cpus_per_worker=4))
    with pytest.raises(GangDoesNotFitError, match=r"one worker needs CPU=4, GPU=16, more than any node the autoscaler can start "
                                                  r"has \(CPU=32, GPU=8; CPU=16, GPU=2\)"):
        check_gang_fits(RunConfig(name="fat", num_workers=1, gpus_per_worker=16, cpus_per_worker=4))
    monkeypatch.setenv("LABTRAIN_AUTOSCALING", "yes")
    with pytest.raises(ValueError, match="LABTRAIN_AUTOSCALING='yes' is not the chart's list of node types"):
        check_gang_fits(RunConfig(name="x"))
    monkeypatch.setenv("LABTRAIN_AUTOSCALING", "1")  # an older chart: node types unknown, nothing refused
    check_gang_fits(RunConfig(name="huge", num_workers=1000, cpus_per_worker=64))


def test_a_gang_that_fits_no_node_is_refused_before_anything_starts(ray_cluster, shards, tmp_path):
    """The test cluster's nodes have 2 CPUs each: a 64-CPU worker, or 5 workers of 1 CPU, would leave a
    placement group pending forever. Both are refused at once, naming what was asked and what exists."""
    from labtrain.train.runner import GangDoesNotFitError

    big = probe(shards, tmp_path, cpus_per_worker=64)
    with pytest.raises(GangDoesNotFitError, match=r"one worker needs CPU=64, more than any node of the cluster has \(CPU=2; CPU=2\)"):
        run(probe_train, big, big.run, kind="probe")
    many = probe(shards, tmp_path)
    many = many.model_copy(update={"run": many.run.model_copy(update={"num_workers": 9})})
    with pytest.raises(GangDoesNotFitError, match=r"9 workers of CPU=1 do not fit: the cluster's 2 nodes hold at most 4 such workers"):
        run(probe_train, many, many.run, kind="probe")
