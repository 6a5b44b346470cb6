"""The video SSL training function: runs on every Ray Train worker, top to bottom."""

from __future__ import annotations

import math

import torch

from jobs.video_ssl import evaluate
from jobs.video_ssl.config import VideoSSLConfig
from jobs.video_ssl.data import ClipSampler
from jobs.video_ssl.losses import objective
from jobs.video_ssl.model import Encoder, KeyEncoder
from labtrain import dist
from labtrain.train import Session


def lr_schedule(cfg: VideoSSLConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def clip_grid(clips_BKCTHW: torch.Tensor, videos: int = 4) -> torch.Tensor:
    """Rows: the first videos' clips (slow, fast, ...); columns: their frames. (3, H, W) in [0, 1]."""
    clips = clips_BKCTHW[:videos].detach().float().cpu()
    rows = [torch.cat(list(clip.permute(1, 0, 2, 3)), dim=2) for video in clips for clip in video]  # each (3, C, T*C)
    return ((torch.cat(rows, dim=1) + 1) / 2).clamp(0, 1)


def train(session: Session, cfg: VideoSSLConfig) -> None:
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    data = session.data(cfg.data, decoder=ClipSampler(cfg))
    total_steps = cfg.epochs * (data.samples_per_epoch // cfg.data.batch_size)
    query = Encoder(cfg)
    key = KeyEncoder(query, cfg.objective.queue_size, cfg.objective.dim)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(query.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(query.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg, total_steps))
    (query, optimizer, scheduler), (key,) = session.prepare((query, optimizer, scheduler), (key,))
    restored = session.restore(data)
    step = restored.step
    history: list[dict] = restored.extra.get("history", [])
    resumed_from: list[int] = restored.extra.get("resumed_from", []) + ([step] if restored.resumed else [])
    session.total_steps = total_steps
    session.info("video SSL (%s, stages %s): %d steps on %d workers (%s), from step %d", cfg.objective.name, cfg.head_stages, total_steps,
                 session.world_size, cfg.run.strategy, step)

    query.train()
    while data.epoch < cfg.epochs:
        for batch in session.batches(data):
            clips = batch["clips"].to(session.device, non_blocking=True)
            labels = batch["label"].to(session.device, non_blocking=True) if cfg.objective.name == "supervised" else None
            out = objective(query, key, clips, cfg.objective, labels)
            session.backward(out.loss, model=query)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            if not session.accumulating:
                key.momentum_update(session.unwrap(query), cfg.objective.momentum)
            key.enqueue(out.enqueue)
            step += 1
            signals = {**out.signals, "decode_seconds_per_clip": batch["decode_s"].mean() / clips.shape[1]}
            history.append({"step": step, "loss": out.loss.detach(), **signals})  # tensors: read at the end, no sync per step
            session.log(step, loss=out.loss, **signals)
            if step % cfg.image_every == 0 or step == 1:
                session.log_image(step, "clips", clip_grid(clips))
            if step % cfg.checkpoint_every == 0:
                history = _plain(history)
                session.checkpoint(step, data, extra={"history": history, "resumed_from": resumed_from})

    history = _plain(history)
    metrics: dict = {}
    if session.rank == 0:
        report = evaluate.evaluate(session.unwrap(query), key, cfg, session.device)
        report.update(steps=step, history=history, workers=session.world_size, resumed_from=resumed_from)
        paths = evaluate.write_report(report, cfg)
        session.info("evaluation: %s", evaluate.summary(report))
        session.info("wrote %s", ", ".join(paths))
        metrics = {k: v for k, v in report.items() if isinstance(v, float)}
    dist.barrier()
    session.checkpoint(step, data, extra={"history": history, "resumed_from": resumed_from}, metrics=metrics)


def _plain(history: list[dict]) -> list[dict]:
    return [{k: float(v) if torch.is_tensor(v) else v for k, v in h.items()} for h in history]
