"""The shapes corpus (written offline through labtrain's shard writer) and its pipeline pieces."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from jobs.shapes.config import SyntheticConfig

CLASSES = ("square", "disc", "cross", "stripes")


def render(label: int, size: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    """One (size, size) float32 image of shape ``CLASSES[label]`` at a random place and scale, plus noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = rng.uniform(size * 0.2, size * 0.35)
    cy, cx = rng.uniform(r, size - r, 2)
    if label == 0:
        img = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
    elif label == 1:
        img = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    elif label == 2:
        img = ((np.abs(yy - cy) < r / 3) & (np.abs(xx - cx) < r)) | ((np.abs(xx - cx) < r / 3) & (np.abs(yy - cy) < r))
    else:
        img = (np.sin((xx + yy) * np.pi / max(r / 2, 1.0)) > 0)
    return img.astype(np.float32) + rng.normal(0, noise, (size, size)).astype(np.float32)


def samples(cfg: SyntheticConfig, *, seed: int | None = None, count: int | None = None) -> Iterator[dict]:
    rng = np.random.default_rng(cfg.seed if seed is None else seed)
    for i in range(cfg.num_samples if count is None else count):
        label = int(rng.integers(len(CLASSES)))
        yield {"__key__": f"shape{i:07d}", "npy": render(label, cfg.image_size, rng, cfg.noise), "cls": label}


def to_tensors(sample: dict) -> dict:
    """Decoded sample -> model inputs: image (1, H, W) float32 and integer label."""
    return {"image": torch.from_numpy(sample["npy"]).unsqueeze(0), "label": int(sample["cls"]), "__key__": sample["__key__"]}


def validation_set(cfg: SyntheticConfig, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A held-out set drawn with another seed: images (N, 1, H, W), labels (N,)."""
    items = list(samples(cfg, seed=cfg.seed + 10_000, count=count))
    images = torch.from_numpy(np.stack([s["npy"] for s in items])).unsqueeze(1)
    return images, torch.tensor([s["cls"] for s in items])
