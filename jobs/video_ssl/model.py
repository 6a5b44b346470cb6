"""A 3-D ResNet backbone, the contrastive heads, and the momentum key encoder with its queues."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from jobs.video_ssl.config import ModelConfig, VideoSSLConfig


class BasicBlock3d(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), nn.GroupNorm(groups, cout))

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet3d(nn.Module):
    """R3D-style: stem, then stages of BasicBlocks; every stage after the first halves time and space.
    ``forward`` returns the globally pooled features of every stage (index 0 is stage 1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        kt, ks = cfg.stem_kernel
        stem = [nn.Conv3d(3, cfg.stem_width, (kt, ks, ks), (1, cfg.stem_stride, cfg.stem_stride), (kt // 2, ks // 2, ks // 2), bias=False),
                nn.GroupNorm(cfg.groups, cfg.stem_width), nn.ReLU(inplace=True)]
        if cfg.stem_pool:
            stem.append(nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)))
        self.stem = nn.Sequential(*stem)
        stages, cin = [], cfg.stem_width
        for i, (width, count) in enumerate(zip(cfg.widths, cfg.blocks)):
            blocks = [BasicBlock3d(cin if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1, cfg.groups) for j in range(count)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.widths = list(cfg.widths)

    def forward(self, video_BCTHW: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(video_BCTHW)
        pooled = []
        for stage in self.stages:
            x = stage(x)
            pooled.append(x.mean(dim=(2, 3, 4)))
        return pooled


def mlp(cin: int, hidden: int, dim: int) -> nn.Sequential:
    """The projection head: Linear, BatchNorm, ReLU, Linear. The batch norm centres the pooled features over
    the batch: without it a fresh network maps every clip to nearly the same direction (pooled ReLU features
    share a large mean; cosine ~0.999 between any two clips), the momentum keys carry no signal, and
    training collapses instead of spreading the embeddings (seen: negative similarity rising to 0.8)."""
    return nn.Sequential(nn.Linear(cin, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


class Encoder(nn.Module):
    """Backbone plus one projection head per contrasted stage (and RSPNet's speed head). ``forward``
    returns L2-normalized embeddings: ``{"stage<i>": (B, dim), ["speed": (B, dim)]}``."""

    def __init__(self, cfg: VideoSSLConfig):
        super().__init__()
        o = cfg.objective
        self.backbone = ResNet3d(cfg.model)
        self.stages = cfg.head_stages
        self.heads = nn.ModuleDict({f"stage{i}": mlp(cfg.model.widths[i - 1], o.hidden, o.dim) for i in self.stages})
        self.speed_head = mlp(cfg.model.widths[-1], o.hidden, o.dim) if o.name == "rspnet" else None
        self.classifier = nn.Linear(cfg.model.widths[-1], cfg.synthetic.num_classes) if o.name == "supervised" else None

    def forward(self, video_BCTHW: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.backbone(video_BCTHW)
        out = {name: F.normalize(head(pooled[int(name[5:]) - 1]), dim=1) for name, head in self.heads.items()}
        if self.speed_head is not None:
            out["speed"] = F.normalize(self.speed_head(pooled[-1]), dim=1)
        if self.classifier is not None:
            out["logits"] = self.classifier(pooled[-1])
        return out


class KeyEncoder(nn.Module):
    """The momentum copy of the query encoder, and a queue of past keys per head (MoCo). Not trained by an
    optimizer: the session carries it (moved to the device, checkpointed with its queues)."""

    def __init__(self, query: Encoder, queue_size: int, dim: int):
        super().__init__()
        self.encoder = copy.deepcopy(query)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.queue_size = queue_size
        for name in query.heads:
            self.register_buffer(f"queue_{name}", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def forward(self, video_BCTHW: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keys under batch statistics, like the queries (MoCo v3); evaluation switches to running ones."""
        return self.encoder(video_BCTHW)

    def negatives(self, name: str) -> torch.Tensor:
        """The queued keys of head ``name`` that were actually enqueued (the random init is never used)."""
        filled = int(self.queue_filled)
        return getattr(self, f"queue_{name}")[:filled]

    @torch.no_grad()
    def momentum_update(self, query: Encoder, momentum: float) -> None:
        for k, q in zip(self.encoder.parameters(), query.parameters()):
            k.mul_(momentum).add_(q.detach(), alpha=1 - momentum)

    @torch.no_grad()
    def enqueue(self, keys: dict[str, torch.Tensor]) -> None:
        """Put this step's keys of every rank (the same on every rank) in the queues, oldest out."""
        if self.queue_size == 0 or not keys:
            return
        n = next(iter(keys.values())).shape[0]
        idx = (int(self.queue_ptr) + torch.arange(n, device=self.queue_ptr.device)) % self.queue_size
        for name, k in keys.items():
            getattr(self, f"queue_{name}")[idx[-self.queue_size:]] = k[-self.queue_size:].to(self.queue_ptr.device)
        self.queue_ptr.fill_((int(self.queue_ptr) + n) % self.queue_size)
        self.queue_filled.fill_(min(self.queue_size, int(self.queue_filled) + n))
