"""One live trial: train a network briefly on streamed shards and return its validation accuracy.

Runs inside a Ray task on one worker (no process group): the shards stream through ``labtrain.data`` as
rank 0 of 1. The recipe is NAS-Bench-201's (SGD with Nesterov momentum, cosine learning rate, weight
decay), shortened to ``epochs`` passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jobs.nas.config import TrainEvaluatorConfig
from jobs.nas.data import to_tensors
from labtrain.data import DataStream


def device() -> torch.device:
    """The trial's GPU when Ray gave it one (trials.gpus_per_trial), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def train_and_validate(net: nn.Module, cfg: TrainEvaluatorConfig) -> float:
    dev = device()
    net = net.to(dev)
    data = DataStream(cfg.train, transform=to_tensors, rank=0, world_size=1)
    total_steps = cfg.epochs * len(data)
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    net.train()
    while data.epoch < cfg.epochs:
        for batch in data:
            loss = F.cross_entropy(net(batch["x"].to(dev)), batch["label"].to(dev))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return validate(net, cfg)


@torch.no_grad()
def validate(net: nn.Module, cfg: TrainEvaluatorConfig) -> float:
    """Accuracy (0..1) over one pass of the validation shards."""
    net.eval()
    dev = next(net.parameters()).device
    correct = total = 0
    for batch in DataStream(cfg.val, transform=to_tensors, rank=0, world_size=1):
        correct += int((net(batch["x"].to(dev)).argmax(1).cpu() == batch["label"]).sum())
        total += len(batch["label"])
    return correct / total
