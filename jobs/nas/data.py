"""Live-training data: synthetic image and clip corpora (written offline as shards) and the trial's tensors.

Images (cell space): class k is a noisy grating at orientation k * pi / num_classes, random frequency,
phase and colour, so convolutions of the right size matter. Clips (video space): class k is a blob moving
in direction k * 2 pi / num_classes, the same blob in every class, so only motion tells classes apart.
A sample is ``{"npy": float32 (C,H,W) or (C,T,H,W), "cls": label}``; any shards in that format will do.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from jobs.nas.config import InputConfig, TrainEvaluatorConfig
from labtrain.data import require_shards


def grating(label: int, cfg: InputConfig, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0 : cfg.image_size, 0 : cfg.image_size].astype(np.float32) / cfg.image_size
    theta = np.pi * label / cfg.num_classes + rng.normal(0, 0.05)
    wave = np.sin(2 * np.pi * rng.uniform(2, 4) * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
    colour = rng.uniform(0.5, 1.0, (cfg.channels, 1, 1)).astype(np.float32)
    return colour * wave + rng.normal(0, cfg.noise, (cfg.channels, cfg.image_size, cfg.image_size)).astype(np.float32)


def moving_blob(label: int, cfg: InputConfig, rng: np.random.Generator) -> np.ndarray:
    size, frames = cfg.image_size, cfg.num_frames
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = 2 * np.pi * label / cfg.num_classes
    speed = size / (2 * max(frames - 1, 1))
    start = size / 2 - np.array([np.sin(angle), np.cos(angle)]) * speed * (frames - 1) / 2 + rng.normal(0, 1, 2)
    clip = np.empty((cfg.channels, frames, size, size), np.float32)
    for t in range(frames):
        cy, cx = start + np.array([np.sin(angle), np.cos(angle)]) * speed * t
        clip[:, t] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 8) ** 2))
    return clip + rng.normal(0, cfg.noise, clip.shape).astype(np.float32)


def samples(cfg: InputConfig, *, video: bool, count: int, seed: int) -> Iterator[dict]:
    rng = np.random.default_rng(seed)
    make = moving_blob if video else grating
    for i in range(count):
        label = int(rng.integers(cfg.num_classes))
        yield {"__key__": f"s{i:07d}", "npy": make(label, cfg, rng), "cls": label}


def require_corpus(cfg: TrainEvaluatorConfig, *, video: bool) -> TrainEvaluatorConfig:
    """``cfg`` with its training and validation shards guaranteed to exist: written from the synthetic corpus
    where missing if ``input.write_synthetic`` is set, else refused with the path."""
    inp = cfg.input
    what = "clips" if video else "images"
    splits = {}
    for name, count, seed in (("train", inp.num_train_samples, inp.seed), ("val", inp.num_val_samples, inp.seed + 10_000)):
        splits[name] = require_shards(
            getattr(cfg, name), field=f"evaluator.{name}.urls", write=inp.write_synthetic, write_field="evaluator.input.write_synthetic",
            samples=lambda count=count, seed=seed: samples(inp, video=video, count=count, seed=seed), total=count,
            samples_per_shard=inp.samples_per_shard, what=what,
        )
    return cfg.model_copy(update=splits)


def to_tensors(sample: dict) -> dict:
    return {"x": torch.from_numpy(np.ascontiguousarray(sample["npy"], dtype=np.float32)), "label": int(sample["cls"])}
