"""The shapes training function: runs on every Ray Train worker, top to bottom."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jobs.shapes.config import ShapesConfig
from jobs.shapes.data import CLASSES, to_tensors, validation_set
from jobs.shapes.model import ShapesNet
from labtrain.train import Session


def train(session: Session, cfg: ShapesConfig) -> None:
    torch.manual_seed(cfg.synthetic.seed)  # same initial weights on every rank
    data = session.data(cfg.data, transform=to_tensors)
    total_steps = cfg.epochs * (data.samples_per_epoch // cfg.data.batch_size)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    model = ShapesNet(len(CLASSES), cfg.model.width)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    model, optimizer, scheduler = session.prepare(model, optimizer, scheduler)
    step = session.restore(data).step
    session.total_steps = total_steps
    session.info("training %d steps on %d workers (%s), starting at step %d", total_steps, session.world_size, cfg.run.strategy, step)

    while data.epoch < cfg.epochs and step < total_steps:
        for batch in session.batches(data):
            images = batch["image"].to(session.device)
            labels = batch["label"].to(session.device)
            loss = F.cross_entropy(model(images), labels)
            session.backward(loss, model=model)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1
            session.log(step, loss=loss)
            if step % cfg.checkpoint_every == 0:
                session.checkpoint(step, data)
            if step >= total_steps:
                break

    images, labels = validation_set(cfg.synthetic, cfg.num_val_samples)
    net = session.unwrap(model).eval()
    with torch.no_grad():
        accuracy = float((net(images.to(session.device)).argmax(1).cpu() == labels).float().mean())
    session.info("final: step %d, held-out accuracy %.3f (chance %.3f)", step, accuracy, 1 / len(CLASSES))
    session.checkpoint(step, data, metrics={"val_accuracy": accuracy})
