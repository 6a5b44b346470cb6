"""python -m jobs.video_ssl --config jobs/video_ssl/configs/tiny.yaml [synthetic.write=true] [key.sub=value ...]"""

from __future__ import annotations

import os
import sys

from jobs.video_ssl import data
from jobs.video_ssl.config import VideoSSLConfig
from jobs.video_ssl.evaluate import summary
from jobs.video_ssl.train import train
from labtrain.config import ConfigError
from labtrain.data import load_shards, require_shards
from labtrain.data.stages import first_sample
from labtrain.data.video import VideoError, probe
from labtrain.launch import job_main


def check_sampling(cfg: VideoSSLConfig, urls: str, index: str | None, field: str) -> None:
    """Refuse a clip length, stride or crop that the shards' videos cannot give (read from the first video),
    and a queue of negatives that would hold the query's own video, before anything starts."""
    shards = load_shards(urls, index, cfg.data.s3)
    videos = sum(shard.num_samples for shard in shards)
    if cfg.objective.queue_size >= videos:
        raise ConfigError(
            f"objective.queue_size={cfg.objective.queue_size} is not smaller than the {videos} training videos of {field}: the queue would hold "
            "keys of every video (its own included) as negatives. Use at most half as many (MoCo: 65536 of Kinetics' 240k)"
        )
    sample = first_sample(shards, cfg.data.s3)
    if sample is None or "mp4" not in sample:
        raise ConfigError(f"{field}: the first shard at {urls} holds no readable .mp4 sample")
    try:
        info = probe(sample["mp4"])
    except VideoError as error:
        raise ConfigError(f"{field}: the first video of {urls} ({sample.get('__key__')}) cannot be read: {error}") from error
    s = cfg.sampling
    span = s.span(s.fast_stride)
    if s.crop_size > min(info.width, info.height):
        raise ConfigError(f"sampling.crop_size={s.crop_size} does not fit the {info.width}x{info.height} frames of {urls}: lower it")
    if s.short_clips == "skip" and span > info.num_frames:
        raise ConfigError(
            f"the fast clip spans {span} frames but the videos of {urls} have {info.num_frames} (first video {sample.get('__key__')}): "
            "every video that short would be skipped. Lower sampling.num_frames, slow_stride or fast_factor, or set sampling.short_clips=pad"
        )


def prepare(cfg: VideoSSLConfig) -> VideoSSLConfig:
    """Training and held-out shards must exist (or be written from the synthetic corpus on request), and
    the sampling must fit their videos."""
    syn = cfg.synthetic
    train_data = require_shards(
        cfg.data, field="data.urls", write=syn.write, write_field="synthetic.write",
        samples=lambda: data.samples(syn), total=syn.num_videos, samples_per_shard=syn.samples_per_shard, what="videos",
    )
    eval_data = require_shards(
        cfg.data.model_copy(update={"urls": cfg.eval.urls, "index": None}), field="eval.urls", write=syn.write, write_field="synthetic.write",
        samples=lambda: data.samples(syn, count=syn.eval_videos, split_seed=1), total=syn.eval_videos,
        samples_per_shard=syn.samples_per_shard, what="held-out videos",
    )
    check_sampling(cfg, train_data.urls, train_data.index, "data.urls")
    return cfg.model_copy(update={"data": train_data, "eval": cfg.eval.model_copy(update={"urls": eval_data.urls})})


def report(cfg: VideoSSLConfig, result) -> None:
    out = cfg.out_dir
    shown = {k: v for k, v in result.metrics.items() if isinstance(v, float)}
    print(f"evaluation: {summary(shown)}")
    print(f"report: {os.path.join(out, cfg.run.name + '-eval.json')}")
    print(f"plot: {os.path.join(out, cfg.run.name + '-eval.png')}")
    print("metrics: each node's exporter (local cluster: http://127.0.0.1:9400/metrics and :9401), labtrain_video_ssl_* and labtrain_train_*")


def main(argv: list[str] | None = None) -> int:
    return job_main(VideoSSLConfig, train, kind="video_ssl", prepare=prepare, report=report, argv=argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
