"""The self-supervised evaluation protocol (METHODS.md 2.3) on the labelled held-out split.

The held-out videos are split in two by position (even: fit, odd: score). Each video gives
``sampling.eval_clips`` evenly spaced, center-cropped slow clips:
- linear probe: a linear classifier on the frozen backbone's last-stage pooled features, averaged over clips;
- fine-tune: backbone + linear layer trained end to end for ``eval.finetune_epochs``, logits averaged over clips;
- the same two for a randomly initialised backbone of the same shape (the control every method must beat);
- RSPNet: the speed head's relative-speed accuracy on held-out clip triplets (chance 0.5).
A JSON report and a PNG (losses, similarities, accuracies against chance) go to ``out_dir``.
"""

from __future__ import annotations

import copy
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from jobs.video_ssl.config import VideoSSLConfig
from jobs.video_ssl.data import ClipSampler
from jobs.video_ssl.model import Encoder, ResNet3d
from labtrain.data import DataStream, load_shards


def _stream(cfg: VideoSSLConfig, sampler: ClipSampler) -> DataStream:
    total = sum(shard.num_samples for shard in load_shards(cfg.eval.urls))
    batch_size = max(d for d in range(1, min(cfg.eval.batch_size, total) + 1) if total % d == 0)  # every video once
    data_cfg = cfg.data.model_copy(update={"urls": cfg.eval.urls, "index": None, "batch_size": batch_size, "shuffle_buffer": 0, "num_workers": 0, "seed": 0})
    return DataStream(data_cfg, decoder=sampler, rank=0, world_size=1)


def load_heldout(cfg: VideoSSLConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """All held-out clips (N, E, 3, T, C, C) as float16 and labels (N,), in a fixed order."""
    clips, labels = [], []
    for batch in _stream(cfg, ClipSampler(cfg, evaluation=True)):
        clips.append(batch["clips"].half())
        labels.append(batch["label"])
    return torch.cat(clips), torch.cat(labels)


@torch.no_grad()
def features(backbone: ResNet3d, clips: torch.Tensor, device, batch_size: int) -> torch.Tensor:
    """Last-stage pooled features averaged over each video's clips: (N, width)."""
    backbone.eval()
    out = []
    for i in range(0, len(clips), batch_size):
        part = clips[i:i + batch_size].to(device).float()
        n, e = part.shape[:2]
        out.append(backbone(part.flatten(0, 1))[-1].view(n, e, -1).mean(1).cpu())
    return torch.cat(out)


def linear_probe(train_x, train_y, test_x, test_y, *, num_classes: int, steps: int) -> float:
    """Multinomial logistic regression on standardized features (full batch, Adam); test accuracy."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(0)
    probe = nn.Linear(train_x.shape[1], num_classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.01, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(probe(train_x), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return (probe(test_x).argmax(1) == test_y).float().mean().item()


def finetune(backbone: ResNet3d, train_clips, train_y, test_clips, test_y, *, num_classes: int, cfg: VideoSSLConfig, device) -> float:
    """End-to-end fine-tune on one random clip per video per step; test accuracy of clip-averaged logits."""
    model = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "fc": nn.Linear(backbone.widths[-1], num_classes)}).to(device)

    def logits(x):
        return model["fc"](model["backbone"](x)[-1])

    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.eval.finetune_lr, weight_decay=1e-4)
    batch = min(32, len(train_clips))
    model.train()
    for _ in range(cfg.eval.finetune_epochs):
        order = torch.randperm(len(train_clips), generator=generator)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            which = torch.randint(train_clips.shape[1], (len(idx),), generator=generator)
            x = train_clips[idx, which].to(device).float()
            optimizer.zero_grad()
            F.cross_entropy(logits(x), train_y[idx].to(device)).backward()
            optimizer.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test_clips), cfg.eval.batch_size):
            part = test_clips[i:i + cfg.eval.batch_size].to(device).float()
            n, e = part.shape[:2]
            mean_logits = logits(part.flatten(0, 1)).view(n, e, -1).softmax(-1).mean(1)
            correct += (mean_logits.argmax(1).cpu() == test_y[i:i + cfg.eval.batch_size]).sum().item()
    return correct / len(test_clips)


@torch.no_grad()
def heldout_speed_accuracy(query: Encoder, key_encoder, cfg: VideoSSLConfig, device) -> float:
    """RSPNet: the share of held-out triplets whose anchor is closer (speed head) to its same-speed clip."""
    query.eval()
    hits = total = 0
    for batch in _stream(cfg, ClipSampler(cfg, objective="rspnet")):
        clips = batch["clips"].to(device)
        q, k_same, k_other = query(clips[:, 0])["speed"], key_encoder(clips[:, 1])["speed"], key_encoder(clips[:, 2])["speed"]
        hits += ((q * k_same).sum(1) > (q * k_other).sum(1)).sum().item()
        total += len(clips)
    query.train()
    return hits / max(total, 1)


def evaluate(query: Encoder, key_encoder, cfg: VideoSSLConfig, device) -> dict:
    clips, labels = load_heldout(cfg)
    num_classes = int(labels.max()) + 1
    fit, score = torch.arange(0, len(labels), 2), torch.arange(1, len(labels), 2)
    report: dict = {"heldout_videos": len(labels), "num_classes": num_classes, "chance": 1 / num_classes}
    backbones = {"": query.backbone}
    if cfg.eval.random_init:
        torch.manual_seed(cfg.seed + 10_000)
        backbones["_random_init"] = ResNet3d(cfg.model).to(device)
    for suffix, backbone in backbones.items():
        feats = features(backbone, clips, device, cfg.eval.batch_size)
        report[f"linear_probe{suffix}"] = linear_probe(feats[fit], labels[fit], feats[score], labels[score], num_classes=num_classes, steps=cfg.eval.probe_steps)
        if cfg.eval.finetune_epochs:
            report[f"finetune{suffix}"] = finetune(backbone, clips[fit], labels[fit], clips[score], labels[score], num_classes=num_classes, cfg=cfg, device=device)
    query.train()
    if cfg.objective.name == "rspnet":
        report["speed_acc_heldout"] = heldout_speed_accuracy(query, key_encoder, cfg, device)
    return report


def summary(report: dict) -> str:
    keys = ("linear_probe", "linear_probe_random_init", "finetune", "finetune_random_init", "speed_acc_heldout", "chance")
    return " ".join(f"{k} {report[k]:.3f}" for k in keys if k in report)


def write_report(report: dict, cfg: VideoSSLConfig) -> list[str]:
    """``<out_dir>/<run name>-eval.json`` and ``-eval.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = cfg.out_dir
    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, f"{cfg.run.name}-eval.json")
    with open(json_path, "w") as f:
        json.dump({"config": cfg.model_dump(mode="json"), **report}, f, indent=1, allow_nan=False)
    history = report.get("history", [])
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in sorted({k for h in history for k in h if k.startswith("loss")}):
        axes[0].plot(steps, [h.get(name, math.nan) for h in history], label=name)
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend(fontsize=7)
    for name in sorted({k for h in history for k in h if "_sim_" in k or k == "speed_acc"}):
        axes[1].plot(steps, [h.get(name, math.nan) for h in history], label=name)
    axes[1].set(title="cosine similarities (speed_acc: share)", xlabel="step")
    axes[1].legend(fontsize=7)
    bars = [k for k in ("linear_probe", "linear_probe_random_init", "finetune", "finetune_random_init", "speed_acc_heldout") if k in report]
    axes[2].bar(range(len(bars)), [report[k] for k in bars], color=["tab:blue", "tab:gray", "tab:green", "tab:gray", "tab:purple"][: len(bars)])
    axes[2].axhline(report["chance"], color="k", ls="--", lw=1, label="chance (classes)")
    axes[2].set_xticks(range(len(bars)), [b.replace("_", "\n") for b in bars], fontsize=7)
    axes[2].set(title="held-out accuracy", ylim=(0, 1))
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{cfg.run.name} ({cfg.objective.name}): {summary(report)}", fontsize=9)
    fig.tight_layout()
    png_path = os.path.join(out, f"{cfg.run.name}-eval.png")
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return [json_path, png_path]
