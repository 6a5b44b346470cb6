"""The moving-sprite corpus (H.264 clips in shards) and the clip sampler that decodes only what it needs.

Corpus (METHODS.md 2.4): a sprite of one of ``shapes`` shapes moves with one of ``motions`` patterns; the
class is (shape, motion). Per video the speed (the period of the motion), phase, amplitude, sprite size,
the sprite's hue (one of six saturated ones) and the dark background are random, so neither colour nor
tempo gives the class away, and the frame stride changes the visual tempo. Each sample is ``<key>.mp4`` (H.264) and ``<key>.json`` ({fps, frames,
width, height, label, period}), with ``<key>.cls``.

Sampler: every clip of a sample comes from the same video; its window start, crop, flip and colour jitter
are drawn from the sample's seed (``__seed__``, set by the platform per sample and epoch), so a resumed
run cuts the same clips. Only the frames of the windows are decoded (:func:`labtrain.data.video.decode_frames`).
"""

from __future__ import annotations

import json
import time
from typing import Iterator

import numpy as np
import torch

from jobs.video_ssl.config import SamplingConfig, SyntheticConfig, VideoSSLConfig
from labtrain.data.video import decode_frames, encode_mp4, probe

SHAPES = ("square", "disc", "triangle", "cross")
# Sprite colours: saturated hues, so a clip's channel shuffle turns one into another and colour cannot tell
# one video from another (instance discrimination would learn colour instead of shape and motion).
PALETTE = np.array([(255, 70, 70), (70, 255, 70), (70, 70, 255), (255, 255, 70), (255, 70, 255), (70, 255, 255)], dtype=np.float64)
MOTIONS = ("horizontal", "vertical", "circle", "diagonal")


def _mask(shape: str, size: int, radius: float) -> np.ndarray:
    """A (2r+1, 2r+1) boolean sprite."""
    r = int(radius)
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    if shape == "square":
        return np.ones_like(dx, bool)
    if shape == "disc":
        return dx**2 + dy**2 <= r**2
    if shape == "triangle":
        return np.abs(dx) <= (dy + r) / 2
    return (np.abs(dx) <= max(1, r // 3)) | (np.abs(dy) <= max(1, r // 3))  # cross


def render(syn: SyntheticConfig, label: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """One video (T, S, S, 3) uint8 of class ``label`` and its random nuisance parameters."""
    shape, motion = SHAPES[label // syn.motions], MOTIONS[label % syn.motions]
    size, frames = syn.frame_size, syn.num_frames
    radius = rng.uniform(0.18, 0.25) * size
    sprite = _mask(shape, size, radius)
    r = sprite.shape[0] // 2
    period = rng.uniform(10, 22)  # frames per cycle: the video's own tempo
    phase = rng.uniform(0, 2 * np.pi)
    amplitude = rng.uniform(0.22, 0.3) * size
    center = size / 2 + rng.uniform(-0.08, 0.08, 2) * size
    sign = rng.choice([-1.0, 1.0])
    background = rng.uniform(30, 60) + rng.uniform(-8, 8, 3)  # dark, nearly gray
    colour = PALETTE[rng.integers(len(PALETTE))] * rng.uniform(0.85, 1.0)
    video = np.empty((frames, size, size, 3), np.float32)
    for t in range(frames):
        angle = 2 * np.pi * t / period + phase
        wave = amplitude * np.sin(angle)
        if motion == "horizontal":
            x, y = center[0] + wave, center[1]
        elif motion == "vertical":
            x, y = center[0], center[1] + wave
        elif motion == "circle":
            x, y = center[0] + amplitude * np.cos(angle), center[1] + sign * wave
        else:
            x, y = center[0] + wave, center[1] + sign * wave
        frame = np.broadcast_to(background, (size, size, 3)).copy()
        cx, cy = int(round(x)), int(round(y))
        y0, y1, x0, x1 = cy - r, cy + r + 1, cx - r, cx + r + 1
        sy0, sx0 = max(0, -y0), max(0, -x0)
        y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, size), min(x1, size)
        part = sprite[sy0:sy0 + y1 - y0, sx0:sx0 + x1 - x0]
        frame[y0:y1, x0:x1][part] = colour
        video[t] = frame
    video += rng.normal(0, syn.noise, video.shape)
    meta = {"shape": shape, "motion": motion, "period": round(float(period), 3)}
    return np.clip(video, 0, 255).astype(np.uint8), meta


def samples(syn: SyntheticConfig, *, count: int | None = None, split_seed: int = 0) -> Iterator[dict]:
    """Encoded videos for the shard writer; ``split_seed`` draws another split (the held-out set uses 1)."""
    rng = np.random.default_rng([syn.seed, split_seed, 2])
    count = syn.num_videos if count is None else count
    for i in range(count):
        label = int(rng.integers(syn.num_classes))
        video, meta = render(syn, label, rng)
        info = {"fps": syn.fps, "frames": syn.num_frames, "width": syn.frame_size, "height": syn.frame_size, "label": label, **meta}
        yield {"__key__": f"v{split_seed:02d}{i:07d}", "mp4": encode_mp4(video, fps=syn.fps, gop=syn.gop), "json": info, "cls": label}


def _metadata(sample: dict) -> dict:
    raw = sample.get("json")
    if raw is None:
        return {}
    meta = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
    if not isinstance(meta, dict):
        raise ValueError(f"video {sample.get('__key__')}: its .json is not an object")
    return meta


def _label(sample: dict, meta: dict) -> int:
    if "label" in meta:
        return int(meta["label"])
    raw = sample.get("cls")
    return int(raw.decode() if isinstance(raw, bytes) else raw) if raw is not None else -1


class ClipSampler:
    """A webdataset sample (``mp4`` bytes, optional ``json``/``cls``) -> clips of one video.

    Training (``evaluation=False``): ``clips`` (K, 3, T, C, C) float in [-1, 1] and ``speed`` (K,) (0 slow,
    1 fast): vthcl/infonce cut [slow, fast]; rspnet cuts [anchor, same speed, other speed] with the anchor's
    speed drawn per video. Evaluation: ``sampling.eval_clips`` slow clips spaced evenly, center-cropped,
    unjittered, and the label (required). Every sample also carries ``decode_s`` (seconds in PyAV).
    A video that cannot be decoded, or is too short under ``short_clips=skip``, raises: the data path skips it and counts it.
    """

    def __init__(self, cfg: VideoSSLConfig, *, evaluation: bool = False, objective: str | None = None):
        self.s: SamplingConfig = cfg.sampling
        self.objective = objective or cfg.objective.name
        self.evaluation = evaluation

    def strides(self, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        s = self.s
        if self.evaluation:
            return [s.slow_stride] * s.eval_clips, [0] * s.eval_clips
        if self.objective == "rspnet":
            anchor = int(rng.integers(2))
            other = 1 - anchor
            speeds = [anchor, anchor, other]
        else:
            speeds = [0, 1]
        return [s.fast_stride if v else s.slow_stride for v in speeds], speeds

    def windows(self, num_frames: int, strides: list[int], rng: np.random.Generator, key: str) -> list[np.ndarray]:
        s, out = self.s, []
        for i, stride in enumerate(strides):
            span = s.span(stride)
            if span > num_frames and s.short_clips == "skip":
                raise ValueError(f"video {key} has {num_frames} frames, fewer than the {span} a clip at stride {stride} spans "
                                 "(skipped; sampling.short_clips=pad repeats its last frame instead)")
            room = max(0, num_frames - span)
            if self.evaluation:
                start = round(i * room / (len(strides) - 1)) if len(strides) > 1 else room // 2
            else:
                start = int(rng.integers(room + 1))
            out.append(np.minimum(start + stride * np.arange(s.num_frames), num_frames - 1))
        return out

    def augment(self, frames_THWC: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        s = self.s
        _, height, width, _ = frames_THWC.shape
        crop = s.crop_size
        if crop > min(height, width):
            raise ValueError(f"frames are {height}x{width}, smaller than sampling.crop_size={crop}")
        if self.evaluation:
            top, left = (height - crop) // 2, (width - crop) // 2
        else:
            top, left = int(rng.integers(height - crop + 1)), int(rng.integers(width - crop + 1))
        clip = torch.from_numpy(np.ascontiguousarray(frames_THWC[:, top:top + crop, left:left + crop])).permute(3, 0, 1, 2).float() / 255.0
        if not self.evaluation:
            if s.flip and rng.random() < 0.5:
                clip = clip.flip(-1)
            j = s.color_jitter
            if j > 0:
                brightness, contrast, saturation = rng.uniform(1 - j, 1 + j, 3)
                clip = clip * brightness
                mean = clip.mean()
                clip = (clip - mean) * contrast + mean
                gray = clip.mean(0, keepdim=True)
                clip = (gray + (clip - gray) * saturation).clamp(0, 1)
            if s.channel_shuffle:
                clip = clip[torch.from_numpy(rng.permutation(3))]
            if rng.random() < s.grayscale:
                clip = clip.mean(0, keepdim=True).expand_as(clip).contiguous()
        return clip * 2 - 1

    def __call__(self, sample: dict) -> dict:
        key = sample.get("__key__", "?")
        data = sample.get("mp4")
        if data is None:
            raise ValueError(f"video {key} has no .mp4 (found {', '.join(k for k in sample if not k.startswith('__')) or 'nothing'})")
        meta = _metadata(sample)
        label = _label(sample, meta)
        if self.evaluation and label < 0:
            raise ValueError(f"video {key} has no label (.json 'label' or .cls): evaluation needs one")
        rng = np.random.default_rng(sample.get("__seed__", 0))
        start = time.perf_counter()
        num_frames = int(meta["frames"]) if meta.get("frames") else probe(data).num_frames
        strides, speeds = self.strides(rng)
        windows = self.windows(num_frames, strides, rng, key)
        frames = decode_frames(data, np.concatenate(windows))
        decode_s = time.perf_counter() - start
        T = self.s.num_frames
        clips = [self.augment(frames[i * T:(i + 1) * T], rng) for i in range(len(windows))]
        return {"clips": torch.stack(clips), "speed": torch.tensor(speeds), "label": label, "decode_s": decode_s, "__key__": key}
