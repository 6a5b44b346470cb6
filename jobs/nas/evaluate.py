"""Evaluators behind one interface, ``evaluate(arch_string) -> score`` (higher is better), and the trial
that runs one evaluation as a Ray task.

- :class:`TableEvaluator` answers from a tabular oracle (a CSV of arch, score; :mod:`jobs.nas.table`).
- :class:`TrainEvaluator` builds the architecture's network and trains it briefly on streamed shards.

An evaluator is sent once to the object store and shared by every trial of a search. This module imports
no torch at the top: a table trial's worker then starts in a fraction of the time.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Protocol

from jobs.nas.config import Nb201SpaceConfig, TrainEvaluatorConfig, X3dSpaceConfig
from jobs.nas.space import build_space


class Evaluator(Protocol):
    def evaluate(self, arch: str) -> float: ...


class TableEvaluator:
    """A tabular oracle: the score of ``arch`` is its row's score."""

    def __init__(self, scores: dict[str, float], seconds_per_query: float = 0.0):
        self.scores = scores
        self.seconds_per_query = seconds_per_query

    def evaluate(self, arch: str) -> float:
        if arch not in self.scores:
            raise KeyError(f"{arch!r} is not in the table")
        if self.seconds_per_query:
            time.sleep(self.seconds_per_query)
        return self.scores[arch]


class TrainEvaluator:
    """Live training: the validation accuracy (0..1) of the architecture's network after a short training.
    Each architecture gets its own seed (from its string), so a rerun trains the same network the same way."""

    def __init__(self, space_cfg: Nb201SpaceConfig | X3dSpaceConfig, cfg: TrainEvaluatorConfig, *, num_threads: int = 1):
        self.space_cfg = space_cfg
        self.cfg = cfg
        self.num_threads = num_threads

    def evaluate(self, arch: str) -> float:
        import torch

        from jobs.nas.model import build_network
        from jobs.nas.train import train_and_validate

        space = build_space(self.space_cfg)
        torch.set_num_threads(self.num_threads)
        torch.manual_seed(int.from_bytes(hashlib.sha256(arch.encode()).digest()[:4], "little"))
        net = build_network(space, space.parse(arch), self.space_cfg, in_channels=self.cfg.input.channels, num_classes=self.cfg.input.num_classes)
        return train_and_validate(net, self.cfg)


def cap_gpu_memory(share: float) -> bool:
    """A trial given a fraction of a GPU (trials.gpus_per_trial < 1) may allocate only that share of its
    memory, so trials packed on one GPU cannot starve each other; True when a cap was set."""
    if not 0 < share < 1:
        return False
    import torch  # only here: table trials stay torch-free

    if not torch.cuda.is_available():
        return False
    torch.cuda.set_per_process_memory_fraction(share)
    return True


def run_trial(evaluator: Evaluator, arch: str) -> dict:
    """The body of one trial's Ray task: the score, where it ran and how long it took."""
    import ray

    start = time.monotonic()
    cap_gpu_memory(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    score = float(evaluator.evaluate(arch))
    return {"score": score, "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "seconds": time.monotonic() - start}
