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
    if strategy in ("ddp", "accelerate"):
        # One bucket: 3 all-reduces without accumulation, and still 3 for 6 batches of which 3 only accumulate.
        assert one["reductions"] == 3 and accumulated["reductions"] == 3


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
