"""Distributed strategies: how a model is wrapped, stepped, saved and loaded.

Each strategy is three things: ``prepare`` the model/optimizer/scheduler, ``step`` on a loss (backward,
optimizer, scheduler), and ``save``/``load`` its state into a checkpoint directory that every rank writes
into (Ray Train merges the ranks' directories). The process group is already up: Ray Train's
TorchTrainer starts it (gloo on CPU, NCCL on GPU) before the training function runs.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from labtrain import dist
from labtrain.config import RunConfig


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank())
    return torch.device("cpu")


class DDPStrategy:
    """torch DistributedDataParallel; rank 0 writes the model, optimizer and scheduler."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def prepare(self, model: nn.Module, optimizer, scheduler, *, batch_size: int):
        del batch_size
        model = model.to(device())
        if dist.world_size() > 1:
            ids = [device().index] if device().type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        return model, optimizer, scheduler

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def unwrap(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    def save(self, path: str) -> None:
        if dist.is_main():
            state = {"model": self.unwrap().state_dict(), "optimizer": self.optimizer.state_dict()}
            if self.scheduler is not None:
                state["scheduler"] = self.scheduler.state_dict()
            torch.save(state, os.path.join(path, "model.pt"))

    def load(self, path: str) -> None:
        state = torch.load(os.path.join(path, "model.pt"), map_location=device(), weights_only=False)
        self.unwrap().load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])


class DeepSpeedStrategy:
    """DeepSpeed ZeRO (stage from config); every rank writes its own partition of the state."""

    TAG = "deepspeed"

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def prepare(self, model: nn.Module, optimizer, scheduler, *, batch_size: int):
        import deepspeed

        ds_config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": batch_size,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": self.cfg.zero_stage},
            # jobs bring plain torch optimizers (Adam, SGD); ZeRO partitions their state like its own
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,  # labtrain reports progress itself
            "bf16": {"enabled": torch.cuda.is_available() and torch.cuda.is_bf16_supported()},
        }
        self.engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
        )
        return self.engine, optimizer, scheduler

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()  # optimizer, scheduler and zero_grad

    def unwrap(self) -> nn.Module:
        return self.engine.module

    def save(self, path: str) -> None:
        self.engine.save_checkpoint(path, tag=self.TAG)  # collective: every rank writes its shard

    def load(self, path: str) -> None:
        loaded, _ = self.engine.load_checkpoint(path, tag=self.TAG)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {path}/{self.TAG}; was it written with strategy=deepspeed?")


class AccelerateStrategy:
    """Hugging Face Accelerate on Ray Train's process group. The scheduler stays labtrain's to step, so
    a schedule means the same thing under every strategy (Accelerate would step it once per process)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def prepare(self, model: nn.Module, optimizer, scheduler, *, batch_size: int):
        from accelerate import Accelerator

        del batch_size
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        model, optimizer = self.accelerator.prepare(model, optimizer)
        if scheduler is not None:
            self.accelerator.register_for_checkpointing(scheduler)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        return model, optimizer, scheduler

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def unwrap(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def save(self, path: str) -> None:
        self.accelerator.save_state(os.path.join(path, "accelerate"))

    def load(self, path: str) -> None:
        self.accelerator.load_state(os.path.join(path, "accelerate"))


STRATEGIES = {"ddp": DDPStrategy, "deepspeed": DeepSpeedStrategy, "accelerate": AccelerateStrategy}


def make_strategy(cfg: RunConfig):
    return STRATEGIES[cfg.strategy](cfg)
