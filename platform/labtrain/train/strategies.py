"""Distributed strategies: how models are wrapped, how a loss is backpropagated, how optimizers step, and
how all of it is saved and loaded.

A job prepares one or several (model, optimizer[, scheduler]) triples; a model with no optimizer (an EMA copy,
a momentum encoder) is only moved to the device and checkpointed. Each strategy answers five questions for one
prepared model: ``backward`` (all-reduced unless ``set_gradient_sync(False)`` came before the forward), ``clip``, ``optimizer_step``,
``zero_grad``, and ``save``/``load`` of every model and optimizer into a checkpoint directory that every rank
writes into (Ray Train merges the ranks' directories). Schedulers and untrained models are the session's to
save, the same under every strategy. The process group is already up: Ray Train's TorchTrainer starts it
(gloo on CPU, NCCL on GPU) before the training function runs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from labtrain import dist
from labtrain.config import ConfigError, RunConfig


def device() -> torch.device:
    """This worker's device: the GPU Ray Train assigned it (not LOCAL_RANK, which two workers sharing one GPU
    or one worker holding two would get wrong), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    # TF32 for fp32 matmuls and convolutions (Ampere and later): fp32 weights, 10-bit mantissa products.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        import ray.train.torch

        return ray.train.torch.get_device()
    except (ImportError, RuntimeError, ValueError):  # outside a Ray Train worker
        return torch.device("cuda", dist.local_rank())


def backend(cfg: RunConfig) -> str:
    """The process group's backend: NCCL when each worker has a GPU of its own; gloo on CPU, and for
    workers sharing a GPU (``gpus_per_worker`` < 1), which NCCL refuses ("duplicate GPU detected")."""
    return "nccl" if cfg.gpus_per_worker >= 1 else "gloo"


def check_support(cfg: RunConfig, *, num_models: int = 1, shared_parameters: bool = False) -> None:
    """Refuse, before anything starts, what ``cfg.strategy`` cannot do for a job that trains ``num_models``
    models (``shared_parameters``: some parameter is in two of them), and GPU shapes a worker cannot use.
    Raises ConfigError naming the field."""
    if cfg.gpus_per_worker > 1:
        # A worker trains on the one device Ray Train gives it (get_device: the first of its GPUs); a second GPU
        # would sit idle, held from everyone else.
        raise ConfigError(
            f"run.gpus_per_worker: value {cfg.gpus_per_worker:g} is not allowed: a worker trains on one GPU, or on a share of one "
            "(below 1: workers then share it over gloo). For more GPUs, raise run.num_workers (one worker per GPU)"
        )
    if cfg.strategy == "deepspeed" and cfg.zero_stage == 3 and num_models > 1 and shared_parameters:
        raise ConfigError(
            f"run.zero_stage: value 3 is not allowed for this job: it trains {num_models} models that share parameters, and "
            "ZeRO-3 partitions each DeepSpeed engine's parameters on its own. Use run.zero_stage=2 (or 1), or run.strategy=ddp"
        )


@dataclasses.dataclass(eq=False)
class Prepared:
    """One prepared model: what the job calls (``model``), the plain module, and how the strategy steps it."""

    index: int
    module: nn.Module  # the plain module: its parameters, its state_dict
    model: nn.Module  # what the job calls: the strategy's wrapper, under autocast for precision=bf16
    optimizer: Any | None  # the strategy's optimizer; None for a model that is only carried (EMA, momentum encoder)
    scheduler: Any | None  # the job's scheduler, as the job made it
    wrapped: Any = None  # DistributedDataParallel, DeepSpeed engine or Accelerate's model; None if not wrapped

    @property
    def trained(self) -> bool:
        return self.optimizer is not None


class Autocast(nn.Module):
    """Runs the wrapped model's forward under bf16 autocast; floating outputs come back as fp32, so losses
    are computed at full precision."""

    def __init__(self, inner: nn.Module, device_type: str):
        super().__init__()
        self.inner = inner
        self.device_type = device_type

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.inner(*args, **kwargs)
        return _to_fp32(out)


def _to_fp32(out):
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return dataclasses.replace(out, **{f.name: _to_fp32(getattr(out, f.name)) for f in dataclasses.fields(out) if f.init})
    return tree_map(lambda t: t.float() if torch.is_tensor(t) and t.is_floating_point() else t, out)


def _check_precision(cfg: RunConfig, dev: torch.device) -> None:
    if cfg.precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"run.precision: value 'bf16' is not allowed on {torch.cuda.get_device_name(dev)}: it has no bf16 support; use run.precision=fp32")


class Strategy:
    """What every strategy shares: devices, precision, plain-torch clipping and stepping."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.device = device()
        self.entries: list[Prepared] = []

    def _autocast(self, model: nn.Module) -> nn.Module:
        return Autocast(model, self.device.type) if self.cfg.precision == "bf16" else model

    def _carried(self, index: int, model: nn.Module) -> Prepared:
        model = model.to(self.device)
        return Prepared(index, model, model, None, None)

    def clip(self, entry: Prepared) -> None:
        if self.cfg.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(entry.module.parameters(), self.cfg.clip_grad_norm)

    def optimizer_step(self, entry: Prepared) -> None:
        entry.optimizer.step()

    def zero_grad(self, entry: Prepared) -> None:
        entry.optimizer.zero_grad(set_to_none=True)

    def unwrap(self, entry: Prepared) -> nn.Module:
        return entry.module

    def set_gradient_sync(self, sync: bool) -> None:
        """Called as each batch arrives, before its forward: DDP decides at forward time whether the backward
        that follows all-reduces (what ``no_sync()`` toggles), so skipping it must be set here."""
        for entry in self.entries:
            if isinstance(entry.wrapped, nn.parallel.DistributedDataParallel):
                entry.wrapped.require_backward_grad_sync = sync


class DDPStrategy(Strategy):
    """torch DistributedDataParallel per trained model; rank 0 writes the models and optimizers."""

    def prepare(self, triples: list[tuple]) -> list[Prepared]:
        _check_precision(self.cfg, self.device)
        for index, (model, optimizer, scheduler) in enumerate(triples):
            if optimizer is None:
                self.entries.append(self._carried(index, model))
                continue
            model = model.to(self.device)
            wrapped = model
            if dist.world_size() > 1:
                ids = [self.device.index] if self.device.type == "cuda" else None
                # broadcast_buffers=False: DDP would otherwise send every buffer from rank 0 before each forward (VATT's
                # frozen 79 MB word table, every step). Running statistics stay per rank; rank 0's are checkpointed.
                wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
            self.entries.append(Prepared(index, model, self._autocast(wrapped), optimizer, scheduler, wrapped))
        return self.entries

    def backward(self, loss: torch.Tensor, entry: Prepared) -> None:
        (loss / self.cfg.accumulate_batches).backward()  # all-reduced or not as set_gradient_sync said at the forward

    def save(self, path: str) -> None:
        if dist.is_main():
            trained = [e for e in self.entries if e.trained]
            state = {"models": [e.module.state_dict() for e in trained], "optimizers": [e.optimizer.state_dict() for e in trained]}
            torch.save(state, os.path.join(path, "model.pt"))

    def load(self, path: str) -> None:
        state = torch.load(os.path.join(path, "model.pt"), map_location=self.device, weights_only=False)
        trained = [e for e in self.entries if e.trained]
        if len(state["models"]) != len(trained):
            raise RuntimeError(f"checkpoint {path} holds {len(state['models'])} trained models; this job prepares {len(trained)}")
        for entry, model_state, optimizer_state in zip(trained, state["models"], state["optimizers"]):
            entry.module.load_state_dict(model_state)
            entry.optimizer.load_state_dict(optimizer_state)


class DeepSpeedStrategy(Strategy):
    """One DeepSpeed engine per trained model (ZeRO stage from config); every rank writes its partitions.

    Schedulers stay the job's (DeepSpeed is not given them), clipping is the engine's ``gradient_clipping``,
    and with ``accumulate_batches`` > 1 the engines run DeepSpeed's unmanaged accumulation: the job's
    ``optimizer.step()`` on the boundary batch is the engine's one reduction and update."""

    TAG = "deepspeed"

    def prepare(self, triples: list[tuple]) -> list[Prepared]:
        import deepspeed

        _check_precision(self.cfg, self.device)
        params = [{id(p) for p in model.parameters()} for model, optimizer, _ in triples if optimizer is not None]
        shared = any(a & b for i, a in enumerate(params) for b in params[i + 1:])
        check_support(self.cfg, num_models=len(params), shared_parameters=shared)
        ds_config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,  # DeepSpeed's own sample counting only; labtrain counts samples itself
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": self.cfg.zero_stage},
            # jobs bring plain torch optimizers (Adam, SGD); ZeRO partitions their state like its own
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,  # labtrain reports progress itself
            "gradient_clipping": self.cfg.clip_grad_norm or 0.0,
        }
        if self.cfg.precision == "bf16":
            # DeepSpeed turns off an autocast around its engine unless its own section asks for it (its bf16 section
            # would cast the weights, not autocast). No module's gradients are reduced in bf16: as DDP, fp32.
            ds_config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
        if self.cfg.accumulate_batches > 1:
            ds_config["managed_gradient_accumulation"] = False
        for index, (model, optimizer, scheduler) in enumerate(triples):
            if optimizer is None:
                self.entries.append(self._carried(index, model))
                continue
            engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
            self.entries.append(Prepared(index, engine.module, self._autocast(engine), ds_optimizer, scheduler, engine))
        return self.entries

    def backward(self, loss: torch.Tensor, entry: Prepared) -> None:
        # unmanaged accumulation: the engine reduces in step(), which the session calls on the boundary only
        entry.wrapped.backward(loss / self.cfg.accumulate_batches)

    def clip(self, entry: Prepared) -> None:
        del entry  # the engine clips (gradient_clipping), after its reduction

    def optimizer_step(self, entry: Prepared) -> None:
        entry.wrapped.step()  # optimizer step and zero_grad; the job steps its own scheduler

    def zero_grad(self, entry: Prepared) -> None:
        engine = entry.wrapped
        if engine.zero_optimization():
            engine.optimizer.zero_grad()
        else:
            engine.zero_grad()

    def _dir(self, path: str, entry: Prepared) -> str:
        return os.path.join(path, f"deepspeed-{entry.index}")

    def save(self, path: str) -> None:
        for entry in self.entries:
            if entry.trained:
                entry.wrapped.save_checkpoint(self._dir(path, entry), tag=self.TAG)  # collective: every rank writes its shard

    def load(self, path: str) -> None:
        for entry in self.entries:
            if entry.trained:
                loaded, _ = entry.wrapped.load_checkpoint(self._dir(path, entry), tag=self.TAG)
                if loaded is None:
                    raise RuntimeError(f"DeepSpeed found no checkpoint under {self._dir(path, entry)}/{self.TAG}; was it written with strategy=deepspeed?")


class AccelerateStrategy(Strategy):
    """Hugging Face Accelerate on Ray Train's process group; one Accelerator prepares every trained model.
    bf16 is the strategies' shared Autocast around the prepared model."""

    def prepare(self, triples: list[tuple]) -> list[Prepared]:
        from accelerate import Accelerator, DistributedDataParallelKwargs

        _check_precision(self.cfg, self.device)
        # bf16 through the same Autocast as the other strategies: Accelerate's own (mixed_precision="bf16") hands back
        # a dataclass's bf16 fields as they are, and a loss then mixes bf16 and fp32 (VATT's Embeddings failed so).
        self.accelerator = Accelerator(cpu=self.device.type == "cpu", mixed_precision="no",
                                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])  # as DDPStrategy: no buffers sent every forward
        trained = [(m, o) for m, o, _ in triples if o is not None]
        prepared = iter(self.accelerator.prepare(*[x for pair in trained for x in pair]))
        for index, (model, optimizer, scheduler) in enumerate(triples):
            if optimizer is None:
                self.entries.append(self._carried(index, model))
                continue
            wrapped, acc_optimizer = next(prepared), next(prepared)
            module = self.accelerator.unwrap_model(wrapped)
            self.entries.append(Prepared(index, module, self._autocast(wrapped), acc_optimizer, scheduler, wrapped))
        return self.entries

    def backward(self, loss: torch.Tensor, entry: Prepared) -> None:
        self.accelerator.backward(loss / self.cfg.accumulate_batches)  # its model is DDP: see set_gradient_sync

    def clip(self, entry: Prepared) -> None:
        if self.cfg.clip_grad_norm is not None:
            self.accelerator.clip_grad_norm_(entry.wrapped.parameters(), self.cfg.clip_grad_norm)

    def save(self, path: str) -> None:
        self.accelerator.save_state(os.path.join(path, "accelerate"))

    def load(self, path: str) -> None:
        self.accelerator.load_state(os.path.join(path, "accelerate"))


STRATEGIES = {"ddp": DDPStrategy, "deepspeed": DeepSpeedStrategy, "accelerate": AccelerateStrategy}


def make_strategy(cfg: RunConfig) -> Strategy:
    return STRATEGIES[cfg.strategy](cfg)
