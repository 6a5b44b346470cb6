"""The VATT training function: runs on every Ray Train worker, top to bottom."""

from __future__ import annotations

import math

import torch

from jobs.vatt import evaluate
from jobs.vatt.config import VattConfig
from jobs.vatt.data import TripletDecoder, to_tensors
from jobs.vatt.losses import objective
from jobs.vatt.model import VattModel
from labtrain import dist
from labtrain.train import Session


def lr_schedule(cfg: VattConfig, total_steps: int):
    """VATT's schedule: linear warmup, then cosine down to lr_end_ratio of the peak."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.lr_end_ratio + (1 - cfg.lr_end_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train(session: Session, cfg: VattConfig) -> None:
    torch.manual_seed(cfg.synthetic.seed)  # same initial weights on every rank
    data = session.data(cfg.data, decoder=TripletDecoder(cfg.model), transform=to_tensors)
    total_steps = cfg.epochs * (data.samples_per_epoch // cfg.data.batch_size)
    model = VattModel(cfg.model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-7, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg, total_steps))
    model, optimizer, scheduler = session.prepare(model, optimizer, scheduler)
    restored = session.restore(data)
    step = restored.step
    history: list[dict] = restored.extra.get("history", [])
    scores: dict[str, list] = restored.extra.get("scores", {})  # per triplet, see evaluate.add_scores: bounded by the data
    session.total_steps = total_steps
    session.info("VATT: %d steps on %d workers (%s), harmonize %s, from step %d", total_steps, session.world_size, cfg.run.strategy, cfg.harmonize.model_dump(), step)

    model.train()
    while data.epoch < cfg.epochs:
        for batch in session.batches(data):
            measure = cfg.harmonize.enabled or step % cfg.log_every == 0  # per-sample gradients cost two small backward passes
            emb = model(batch["video"].to(session.device, non_blocking=True), batch["audio"].to(session.device, non_blocking=True), batch["text"].to(session.device, non_blocking=True))
            loss, stats = objective(emb, cfg.harmonize, cfg.model.temperature, step=step, total_steps=total_steps, measure=measure)
            session.backward(loss, model=model)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1
            if stats.cos is not None:
                evaluate.add_scores(scores, data.epoch, batch["__key__"], stats.cos.tolist(), batch["misaligned"].tolist())
            signals = {"loss_va": stats.loss_va, "loss_vt": stats.loss_vt}
            if stats.cos is not None:
                signals.update(conflict_rate=stats.conflict_rate, mean_cos=stats.mean_cos, kept=stats.kept)
            if step % cfg.log_every == 0:
                history.append({"step": step, "loss": float(loss.detach()), **signals})
            session.log(step, loss=loss, **signals)
            if step % cfg.checkpoint_every == 0:
                session.checkpoint(step, data, extra={"history": history, "scores": scores})

    all_scores = evaluate.merge_scores(dist.all_gather_object(scores))
    report = evaluate.evaluate(session.unwrap(model), cfg, session.device)
    report.update(evaluate.conflict_auroc(all_scores, last_epoch=cfg.epochs - 1), steps=step, history=history)
    if session.rank == 0:
        paths = evaluate.write_report(report, cfg)
        session.info("evaluation: %s", evaluate.summary(report))
        session.info("wrote %s", ", ".join(paths))
    session.checkpoint(step, data, extra={"history": history, "scores": scores}, metrics={k: v for k, v in report.items() if isinstance(v, float)})
