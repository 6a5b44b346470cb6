"""Video SSL's data and step costs, measured side by side in one run; the last line is one JSON object.

- loader_vs_webdataset: clips/s through labtrain's DataStream over clips/s of a plain webdataset pipeline
  (WebDataset -> the same PyAV ClipSampler -> batch, in a DataLoader with the same workers) on the same
  .mp4 shards (goal >= 1.0).
- window_vs_full_decode: samples/s of the sampler's windowed decode (seek to the keyframe before the
  window, decode to its end) over decoding each whole video for the same frames.
- hierarchical_vs_single_step_time: time of one training step (forward, backward, optimizer) of VTHCL
  with contrastive heads at two stages over the single-stage InfoNCE baseline.

Contenders alternate and the best of each is kept, so both see the same machine state.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, default_collate

from jobs.video_ssl import data as vdata
from jobs.video_ssl.config import VideoSSLConfig
from jobs.video_ssl.losses import objective
from jobs.video_ssl.model import Encoder, KeyEncoder
from labtrain.config import DataConfig
from labtrain.data import DataStream, write_shards
from labtrain.data.video import decode_frames


def config(frames: int, size: int, **objective) -> VideoSSLConfig:
    return VideoSSLConfig.model_validate({
        "data": {"urls": "x"}, "eval": {"urls": "y"},
        "synthetic": {"num_frames": frames, "frame_size": size},
        "sampling": {"num_frames": 8, "crop_size": size - 4},
        "objective": {"name": "vthcl", "stages": [2, 3], **objective},
    })


def rate_labtrain(pattern: str, cfg: VideoSSLConfig, batch: int, workers: int) -> float:
    stream = DataStream(DataConfig(urls=pattern, batch_size=batch, num_workers=workers), decoder=vdata.ClipSampler(cfg), rank=0, world_size=1)
    start = time.perf_counter()
    n = sum(b["clips"].shape[0] * b["clips"].shape[1] for b in stream)  # a sample is a slow and a fast clip
    return n / (time.perf_counter() - start)


def _collate(group):
    return default_collate([{k: v for k, v in s.items() if not k.startswith("__")} for s in group])


def rate_webdataset(pattern: str, cfg: VideoSSLConfig, batch: int, workers: int) -> float:
    sampler = vdata.ClipSampler(cfg)
    dataset = wds.WebDataset(pattern, shardshuffle=False, empty_check=False).map(sampler).batched(batch, collation_fn=_collate, partial=False)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    start = time.perf_counter()
    n = sum(b["clips"].shape[0] * b["clips"].shape[1] for b in loader)
    return n / (time.perf_counter() - start)


def rate_decode(videos: list[bytes], cfg: VideoSSLConfig, *, full: bool) -> float:
    """Samples/s decoding the frames of one slow and one fast clip per video (fixed windows in the second half)."""
    s = cfg.sampling
    start = time.perf_counter()
    for i, video in enumerate(videos):
        frames = cfg.synthetic.num_frames
        first = frames - s.span(s.fast_stride) - (i % 3)
        indices = np.concatenate([first + np.arange(s.num_frames) * s.slow_stride, first + np.arange(s.num_frames) * s.fast_stride])
        decode_frames(video, indices, full=full)
    return len(videos) / (time.perf_counter() - start)


def step_time(cfg: VideoSSLConfig, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    query = Encoder(cfg)
    key = KeyEncoder(query, cfg.objective.queue_size, cfg.objective.dim)
    optimizer = torch.optim.AdamW(query.parameters(), lr=1e-3)
    c = cfg.sampling.crop_size
    clips = torch.randn(batch, 2, 3, cfg.sampling.num_frames, c, c)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        out = objective(query, key, clips, cfg.objective)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        key.momentum_update(query, 0.99)
        key.enqueue(out.enqueue)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer videos and rounds (under a minute)")
    parser.add_argument("--workers", type=int, default=1, help="dataloader workers for both loaders")
    args = parser.parse_args(argv)
    count, rounds, frames, size = (128, 2, 64, 32) if args.quick else (512, 3, 96, 64)
    cfg = config(frames, size)
    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
        syn = cfg.synthetic.model_copy(update={"num_videos": count})
        pattern = write_shards(vdata.samples(syn), os.path.join(tmp, "shards"), total=count, max_samples=count // 4, progress=False)
        videos = [s["mp4"] for s in vdata.samples(syn, count=min(count, 64))]
        best = {"labtrain": 0.0, "webdataset": 0.0, "window": 0.0, "full": 0.0}
        for _ in range(rounds):
            best["labtrain"] = max(best["labtrain"], rate_labtrain(pattern, cfg, 16, args.workers))
            best["webdataset"] = max(best["webdataset"], rate_webdataset(pattern, cfg, 16, args.workers))
            best["window"] = max(best["window"], rate_decode(videos, cfg, full=False))
            best["full"] = max(best["full"], rate_decode(videos, cfg, full=True))
    small = config(frames, 32)
    batch, steps = (8, 3) if args.quick else (16, 6)
    hierarchical = step_time(small, batch, steps)
    single = step_time(small.model_copy(update={"objective": small.objective.model_copy(update={"name": "infonce"})}), batch, steps)
    print(f"loader: labtrain {best['labtrain']:.1f} clips/s, webdataset {best['webdataset']:.1f} clips/s ({args.workers} workers, {count} videos of {frames} frames at {size}px)")
    print(f"decode: window {best['window']:.1f} videos/s, whole video {best['full']:.1f} videos/s")
    print(f"step: vthcl (2 stages) {1000 * hierarchical:.0f} ms, single-stage infonce {1000 * single:.0f} ms (batch {batch})")
    print(json.dumps({
        "loader_vs_webdataset": round(best["labtrain"] / best["webdataset"], 3),
        "window_vs_full_decode": round(best["window"] / best["full"], 3),
        "hierarchical_vs_single_step_time": round(hierarchical / single, 3),
        "labtrain_clips_per_s": round(best["labtrain"], 1),
        "webdataset_clips_per_s": round(best["webdataset"], 1),
        "frames_per_video": frames,
        "workers": args.workers,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
