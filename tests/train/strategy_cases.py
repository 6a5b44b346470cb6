"""Training cases run the same way on 2 gloo ranks (through a Session) and in one process (plain torch).

Each step sees one global batch of 16 samples; rank r trains on its half, in ``accumulate`` micro-batches.
With gradients averaged over ranks and summed over micro-batches, every step's gradient is the full
batch's, so the ranks' final weights must match the single-process reference's.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

GLOBAL_BATCH, NUM_STEPS, CLIP = 16, 3, 0.05


def data(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per step: inputs (16, 8), labels (16,), noise (16, 4)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g))
            for _ in range(NUM_STEPS)]


def classifier() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def generator() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8))


def discriminator() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}


# -- the single-process reference --------------------------------------------------------------
def reference(case: str) -> dict[str, Any]:
    if case == "gan":
        g, d = generator(), discriminator()
        g_opt, d_opt = torch.optim.Adam(g.parameters(), lr=0.01), torch.optim.Adam(d.parameters(), lr=0.01)
        for x, _, z in data():
            d_loss = F.softplus(d(g(z).detach())).mean() + F.softplus(-d(x)).mean()
            d_loss.backward()
            d_opt.step()
            d_opt.zero_grad()
            d.requires_grad_(False)
            F.softplus(-d(g(z))).mean().backward()
            g_opt.step()
            g_opt.zero_grad()
            d.requires_grad_(True)
        return {"g": _state(g), "d": _state(d)}
    model = classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for x, y, _ in data():
        F.cross_entropy(model(x), y).backward()
        if case == "accumulate_clip":
            nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return {"model": _state(model)}


# -- the same through a Session on each rank ------------------------------------------------------
def _local(batch: torch.Tensor, rank: int, world_size: int, accumulate: int) -> list[torch.Tensor]:
    return batch.chunk(world_size)[rank].chunk(accumulate)


def _gathered_state(session, module: nn.Module) -> dict[str, torch.Tensor]:
    if session.cfg.strategy == "deepspeed" and session.cfg.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return _state(module)
    return _state(module)


def distributed(case: str, run_fields: dict[str, Any]) -> dict[str, Any]:
    from labtrain.config import RunConfig
    from labtrain.train import Session

    accumulate = 2 if case == "accumulate_clip" else 1
    fields = {"num_workers": 2, "tensorboard": False, **run_fields}
    if case == "accumulate_clip":
        fields |= {"accumulate_batches": accumulate, "clip_grad_norm": CLIP}
    session = Session(RunConfig(**fields), kind="test")
    rank, world = session.rank, session.world_size
    if case == "gan":
        g, d = generator(), discriminator()
        (g, g_opt), (d, d_opt) = session.prepare((g, torch.optim.Adam(g.parameters(), lr=0.01)), (d, torch.optim.Adam(d.parameters(), lr=0.01)))
        for x, _, z in session.batches(data()):
            x, z = x.chunk(world)[rank], z.chunk(world)[rank]
            d_loss = F.softplus(d(g(z).detach())).mean() + F.softplus(-d(x)).mean()
            session.backward(d_loss, model=d)
            d_opt.step()
            d_opt.zero_grad()
            d.requires_grad_(False)  # the generator's step: the discriminator only passes gradients through
            session.backward(F.softplus(-d(g(z))).mean(), model=g)
            g_opt.step()
            g_opt.zero_grad()
            d.requires_grad_(True)
        return {"g": _gathered_state(session, session.unwrap(g)), "d": _gathered_state(session, session.unwrap(d))}

    model = classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model, optimizer, scheduler = session.prepare(model, optimizer, scheduler)
    draws = [None] * world  # each rank's first random numbers after prepare (dropout masks come from these)
    torch.distributed.all_gather_object(draws, torch.rand(4).tolist())
    reductions = {"count": 0}
    wrapped = session.strategy.entries[0].wrapped
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            reductions["count"] += 1
            return allreduce_hook(state, bucket)

        wrapped.register_comm_hook(None, counting_hook)
    micro = [(xs, ys) for x, y, _ in data() for xs, ys in zip(_local(x, rank, world, accumulate), _local(y, rank, world, accumulate))]
    for x, y in session.batches(micro):
        session.backward(F.cross_entropy(model(x), y), model=model)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    lr = optimizer.param_groups[0]["lr"]
    return {"model": _gathered_state(session, session.unwrap(model)), "reductions": reductions["count"], "lr": lr, "draws": draws,
            "broadcast_buffers": getattr(wrapped, "broadcast_buffers", None)}


def worker(rank: int, world_size: int, port: int, run_fields: dict[str, Any], cases: list[str], out: str) -> None:
    """A spawned rank: join a gloo process group, run every case, rank 0 saves the results."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {case: distributed(case, run_fields) for case in cases}
        if rank == 0:
            torch.save(results, out)
    finally:
        torch.distributed.destroy_process_group()
