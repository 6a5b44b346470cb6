"""Training functions the runner tests send to Ray Train workers (importable there via PYTHONPATH)."""

from __future__ import annotations

import os
import signal
import time

import ray
import torch
import torch.nn.functional as F
from pydantic import Field
from ray.train.v2._internal.execution.callback import ControllerCallback

from labtrain import dist
from labtrain.config import Config, DataConfig, RunConfig
from labtrain.train import Session


class ProbeConfig(Config):
    data: DataConfig
    run: RunConfig = Field(default_factory=RunConfig)
    epochs: int = 1
    max_steps: int | None = None
    checkpoint_every: int = 4
    kill_rank_at_step: int | None = None
    kill_marker: str | None = None
    step_sleep_s: float = 0.0
    fail_at_step: int | None = None


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))


def probe_train(session: Session, cfg: ProbeConfig) -> None:
    """Trains a tiny classifier on the test shards, recording which sample keys each step consumed.

    The keys go into every checkpoint (cumulatively, per rank), so the final checkpoint shows whether a
    restart lost or repeated samples. ``kill_rank_at_step`` SIGKILLs rank 1 once (guarded by a marker file).
    """
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    ema = _model()  # carried, not trained: the session checkpoints it
    (model, optimizer, scheduler), (ema,) = session.prepare((model, optimizer, scheduler), (ema,))
    data = session.data(cfg.data)
    restored = session.restore(data)
    step = restored.step
    keys: list[str] = list(restored.extra.get("keys", []))
    restored_from = list(restored.extra.get("restored_from", [])) + ([step] if restored.resumed else [])
    losses: list[float] = list(restored.extra.get("losses", []))
    param_sum = float(sum(p.detach().sum() for p in session.unwrap(model).parameters()))
    if restored.resumed and not (cfg.run.strategy == "deepspeed" and cfg.run.zero_stage == 3):  # ZeRO-3 params are partitioned
        expected = restored.extra.get("param_sum")
        assert expected is None or abs(expected - param_sum) < 1e-4, f"restored weights differ: {param_sum} vs {expected}"
    if restored.resumed:
        ema_sum = float(sum(p.sum() for p in ema.parameters()))
        assert abs(restored.extra["ema_sum"] - ema_sum) < 1e-4, f"restored EMA differs: {ema_sum} vs {restored.extra['ema_sum']}"

    info = {"world_size": dist.world_size(), "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
    if cfg.run.strategy == "accelerate":
        info["num_processes"] = session.strategy.accelerator.num_processes
    if cfg.run.strategy == "deepspeed":
        info["zero_stage"] = session.strategy.entries[0].wrapped.zero_optimization_stage()

    def extra() -> dict:
        return {
            "keys": keys, "restored_from": restored_from, "losses": losses, "info": info,
            "param_sum": float(sum(p.detach().sum() for p in session.unwrap(model).parameters())),
            "ema_sum": float(sum(p.sum() for p in ema.parameters())),
        }

    while data.epoch < cfg.epochs and (cfg.max_steps is None or step < cfg.max_steps):
        for batch in session.batches(data):
            x = batch["npy"].float() / 100.0
            loss = F.cross_entropy(model(x), batch["cls"])
            session.backward(loss, model=model)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            with torch.no_grad():
                for e, p in zip(ema.parameters(), session.unwrap(model).parameters()):
                    if p.shape == e.shape:  # not under ZeRO-3, whose parameters live partitioned
                        e.lerp_(p, 0.1)
            losses.append(float(loss))
            keys.extend(batch["__key__"])
            step += 1
            session.log(step, loss=loss)
            if cfg.step_sleep_s:
                import time

                time.sleep(cfg.step_sleep_s)
            if step % cfg.checkpoint_every == 0:
                session.checkpoint(step, data, extra=extra())
            if cfg.fail_at_step == step:
                raise RuntimeError(f"the probe's loss became NaN at step {step}")  # a job's own failure, every rank
            if cfg.kill_rank_at_step == step and session.rank == 1 and not os.path.exists(cfg.kill_marker):
                open(cfg.kill_marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)  # a worker process dies mid-run
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
    session.checkpoint(step, data, extra=extra())


class StallFirstController(ControllerCallback):
    """A Ray Train controller callback that blocks the first controller right after it starts, the way the
    stuck controllers seen in CI did (a marker file makes the next controller run normally)."""

    def __init__(self, marker: str):
        self.marker = marker

    def after_controller_start(self, train_run_context) -> None:
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            time.sleep(3600)
