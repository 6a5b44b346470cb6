"""Each strategy on 2 gloo ranks against a single-process reference on the same global batches: one model
with a scheduler, two models stepped in turn (a GAN's update), and accumulation with clipping."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from labtrain.config import ConfigError, RunConfig
from labtrain.train.strategies import check_support
from tests.conftest import free_port
from tests.train import strategy_cases

pytestmark = pytest.mark.slow

CASES = ["one", "gan", "accumulate_clip"]
STRATEGIES = {
    "ddp": {"strategy": "ddp"},
    "accelerate": {"strategy": "accelerate"},
    "deepspeed-zero1": {"strategy": "deepspeed", "zero_stage": 1},
    "deepspeed-zero2": {"strategy": "deepspeed", "zero_stage": 2},
    "deepspeed-zero3": {"strategy": "deepspeed", "zero_stage": 3},
}


@pytest.fixture(scope="module")
def references():
    return {case: strategy_cases.reference(case) for case in CASES}


def run_two_ranks(run_fields: dict, tmp_path) -> dict:
    out = str(tmp_path / "results.pt")
    mp.spawn(strategy_cases.worker, args=(2, free_port(), run_fields, CASES, out), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


def assert_same_weights(got: dict, want: dict) -> None:
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_ranks_match_one_process_on_the_global_batch(strategy, references, tmp_path):
    results = run_two_ranks(STRATEGIES[strategy], tmp_path)
    for case in CASES:
        for model in references[case]:
            assert_same_weights(results[case][model], references[case][model])
    one, accumulated = results["one"], results["accumulate_clip"]
    assert one["lr"] == pytest.approx(0.01 * 0.5**3)  # the job's scheduler stepped once per step
    assert accumulated["lr"] == pytest.approx(0.01 * 0.5**3), "with accumulation the scheduler steps once per optimizer step, not per batch"
    assert one["draws"][0] != one["draws"][1], "every rank drew the same random numbers: dropout masks would repeat on each"
    if strategy in ("ddp", "accelerate"):
        # One bucket: 3 all-reduces without accumulation, and still 3 for 6 batches of which 3 only accumulate.
        assert one["reductions"] == 3 and accumulated["reductions"] == 3
        assert one["broadcast_buffers"] is False, "DDP would send every buffer (VATT's 79 MB word table) from rank 0 before each forward"


def test_a_moved_weight_would_be_caught(references):
    """The comparison can fail: a reference trained one step less differs beyond the tolerance."""
    shorter = dict(references["one"]["model"])
    shorter["0.weight"] = shorter["0.weight"] + 1e-3
    with pytest.raises(AssertionError):
        assert_same_weights(shorter, references["one"]["model"])


def test_zero3_with_two_models_sharing_parameters_is_refused_naming_the_field():
    cfg = RunConfig(strategy="deepspeed", zero_stage=3)
    with pytest.raises(ConfigError, match="run.zero_stage: value 3 is not allowed"):
        check_support(cfg, num_models=2, shared_parameters=True)
    check_support(cfg, num_models=2, shared_parameters=False)
    check_support(cfg.model_copy(update={"zero_stage": 2}), num_models=2, shared_parameters=True)


def test_each_rank_gets_its_own_random_stream_derived_from_the_jobs_seed():
    from labtrain.train.session import _seed_per_rank

    def draws(rank: int) -> list[float]:
        torch.manual_seed(7)  # the job's seed, the same on every rank
        _seed_per_rank(rank)
        return torch.rand(3).tolist()

    assert draws(0) == draws(0) and draws(1) == draws(1)  # reproducible
    assert draws(0) != draws(1)
    torch.manual_seed(8)
    _seed_per_rank(0)
    assert torch.rand(3).tolist() != draws(0), "another job seed gives other streams"


def test_gpu_shapes_a_worker_cannot_use_are_refused_and_shared_gpus_use_gloo():
    from labtrain.train.strategies import backend

    for gpus in (1.5, 2):  # the second GPU would sit idle: a worker trains on Ray Train's one device
        with pytest.raises(ConfigError, match=f"run.gpus_per_worker: value {gpus:g} is not allowed: a worker trains on one GPU.*raise run.num_workers"):
            check_support(RunConfig(gpus_per_worker=gpus))
    assert [backend(RunConfig(gpus_per_worker=g)) for g in (0, 0.5, 1)] == ["gloo", "gloo", "nccl"]
    check_support(RunConfig(gpus_per_worker=1))
    check_support(RunConfig(gpus_per_worker=0.5))
