"""The VATT training function: runs on every Ray Train worker, top to bottom."""

from __future__ import annotations

import math

import torch

from jobs.vatt import evaluate
from jobs.vatt.config import VattConfig
from jobs.vatt.data import TripletDecoder, to_tensors
from jobs.vatt.losses import curriculum_active, objective
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
    epochs: list[dict] = restored.extra.get("epochs", [])  # per finished epoch: the conflict and loss AUROC of its measurements
    scores: dict[str, list] = restored.extra.get("scores", {})  # per triplet, see evaluate.add_scores: bounded by the data
    drops = torch.tensor(restored.extra.get("drops", [0.0] * 4), device=session.device)  # the curriculum's dropped pairs against the planted swaps, on the device
    session.total_steps = total_steps
    session.info("VATT: %d steps on %d workers (%s), harmonize %s, from step %d", total_steps, session.world_size, cfg.run.strategy, cfg.harmonize.model_dump(), step)

    pending: list[tuple] = []  # measured steps' per-triplet figures, still on the device

    def fold_pending() -> None:
        """Fold the measured steps into ``scores`` with one device-to-host copy (on logging steps, checkpoints and
        epoch ends, not every step: a read of a device tensor waits for the GPU to finish)."""
        if pending:
            flat = torch.cat([torch.stack([losses, cos]) for *_, losses, cos in pending], dim=1).tolist()
            start = 0
            for epoch, keys, flags, losses, _ in pending:
                end = start + len(losses)
                evaluate.add_scores(scores, epoch, keys, flags, flat[0][start:end], flat[1][start:end])
                start = end
            pending.clear()

    model.train()
    while data.epoch < cfg.epochs:
        for batch in session.batches(data):
            measure = cfg.harmonize.needs_cosine or step % cfg.log_every == 0  # per-sample gradients cost two small backward passes
            emb = model(batch["video"].to(session.device, non_blocking=True), batch["audio"].to(session.device, non_blocking=True), batch["text"].to(session.device, non_blocking=True))
            swapped = {k: batch[k].to(session.device) for k in ("text_swapped", "audio_swapped")} if cfg.harmonize.score == "oracle" else {}
            loss, stats = objective(emb, cfg.harmonize, cfg.model.temperature, step=step, total_steps=total_steps, measure=measure, **swapped)
            session.backward(loss, model=model)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1
            if stats.w_va is not None and curriculum_active(cfg.harmonize, step - 1, total_steps):
                drops += evaluate.drop_counts(stats.w_va, stats.w_vt, batch["audio_swapped"].to(session.device), batch["text_swapped"].to(session.device))
            if measure:  # the step's per-sample figures (every step when the setting needs the cosine), copied later
                pending.append((data.epoch, batch["__key__"], batch["misaligned"].tolist(), stats.losses, stats.cos.detach()))
            signals = stats.signals()
            if step % cfg.log_every == 0:
                fold_pending()
                history.append({"step": step, "epoch": data.epoch, "loss": float(loss.detach()), **{k: float(v) for k, v in signals.items()}})
            session.log(step, loss=loss, **signals)
            if step % cfg.checkpoint_every == 0:
                fold_pending()
                session.checkpoint(step, data, extra={"history": history, "scores": scores, "drops": drops.tolist(), "epochs": epochs})
        fold_pending()
        if data.epoch > len(epochs):  # an epoch ended: how well its single measurements flagged the misaligned triplets (this rank's)
            epochs.append({"epoch": data.epoch - 1, "step": step, **evaluate.epoch_auroc(scores, data.epoch - 1)})

    all_scores = evaluate.merge_scores(dist.all_gather_object(scores))
    report = evaluate.evaluate(session.unwrap(model), cfg, session.device)
    report.update(evaluate.conflict_auroc(all_scores, last_epoch=cfg.epochs - 1), steps=step, history=history, epochs=epochs)
    report.update(evaluate.drop_precision(dist.all_gather_object(drops.tolist())))
    if session.rank == 0:
        paths = evaluate.write_report(report, cfg)
        session.info("evaluation: %s", evaluate.summary(report))
        session.info("wrote %s", ", ".join(paths))
    session.checkpoint(step, data, extra={"history": history, "scores": scores, "drops": drops.tolist(), "epochs": epochs}, metrics={k: v for k, v in report.items() if isinstance(v, float)})
