"""One live trial: train a network briefly on streamed shards and return its validation accuracy.

Runs inside a Ray task on one worker (no process group), on the same session API as every training
function: the shards stream through ``labtrain.data`` as rank 0 of 1, on the GPU Ray gave the task if any. The recipe is NAS-Bench-201's (SGD with Nesterov momentum, cosine learning rate, weight
decay), shortened to ``epochs`` passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jobs.nas.config import TrainEvaluatorConfig
from jobs.nas.data import to_tensors
from labtrain.config import RunConfig
from labtrain.data import DataStream
from labtrain.train import Session


def train_and_validate(net: nn.Module, cfg: TrainEvaluatorConfig) -> float:
    """Train ``net`` on labtrain's session API as rank 0 of 1 (its device, its step metrics, labelled
    kind="nas" on the node's exporter), then score it."""
    session = Session(RunConfig(name="nas-trial", num_workers=1, log_every=2**31 - 1, tensorboard=False), kind="nas")
    data = session.data(cfg.train, transform=to_tensors)
    total_steps = cfg.epochs * len(data)
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    net, optimizer, scheduler = session.prepare(net, optimizer, scheduler)
    net.train()
    while data.epoch < cfg.epochs:
        for batch in session.batches(data):
            loss = F.cross_entropy(net(batch["x"].to(session.device)), batch["label"].to(session.device))
            session.backward(loss, model=net)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
    return validate(session.unwrap(net), cfg)


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
