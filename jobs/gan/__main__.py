"""python -m jobs.gan --config jobs/gan/configs/tiny.yaml [corpus.write=true] [key.sub=value ...]"""

from __future__ import annotations

import os
import sys

from jobs.gan import data, evaluate
from jobs.gan.config import GANConfig
from jobs.gan.train import train
from labtrain.config import ConfigError
from labtrain.data import require_shards
from labtrain.launch import job_main


def prepare(cfg: GANConfig) -> GANConfig:
    """Training and held-out shards must exist (or be written from the corpus on request); the FID_domain
    extractor is trained here if its file is missing, so a run never starts without its metric."""
    c, res, classes = cfg.corpus, cfg.images.resolution, cfg.pix2pixhd.label_classes
    train_data = require_shards(
        cfg.data, field="data.urls", write=c.write, write_field="corpus.write",
        samples=lambda: data.samples(c, res, heldout=False, classes=classes), total=c.num_images, samples_per_shard=c.samples_per_shard, what=f"{c.kind} images",
    )
    eval_data = require_shards(
        cfg.data.model_copy(update={"urls": cfg.eval.urls, "index": None}), field="eval.urls", write=c.write, write_field="corpus.write",
        samples=lambda: data.samples(c, res, heldout=True, classes=classes), total=c.eval_images, samples_per_shard=c.samples_per_shard,
        what=f"held-out {c.kind} images",
    )
    cfg = cfg.model_copy(update={"data": train_data, "eval": cfg.eval.model_copy(update={"urls": eval_data.urls})})
    if cfg.mode == "genda":  # a readable target and a source checkpoint that fits, before any worker starts
        from jobs.gan.genda import prepare_genda

        return prepare_genda(cfg)
    if cfg.model.arch == "pix2pixhd":
        print("metric: pix2pixHD's L1 and PSNR to the ground truth on the second half of the held-out pairs (no FID_domain: the extractor is StyleGAN2's)", flush=True)
        return cfg
    try:
        ext = evaluate.extractor(cfg)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"eval: {error}") from error
    print(f"metric: {ext.name} ({ext.path}; its classifier scores {ext.classifier_accuracy:.3f} on the held-out reference half)", flush=True)
    return cfg


def report(cfg: GANConfig, result) -> None:
    out = cfg.out_dir
    if cfg.mode == "genda":
        stem = os.path.join(out, cfg.run.name + "-genda")
        print(f"adapted generator: {stem}-generator.pt (jobs.gan.genda.load_adapted reads it)")
        print(f"losses: {stem}.json")
        print(f"samples: {stem}-samples.png")
        return
    if "fid" in result.metrics:
        print(f"evaluation: {evaluate.summary(result.metrics)}")
    if "psnr" in result.metrics:
        from jobs.gan.pix2pixhd import summary

        print(f"evaluation: {summary(result.metrics)}")
    print(f"report: {os.path.join(out, cfg.run.name + '-eval.json')}")
    print(f"plot: {os.path.join(out, cfg.run.name + '-eval.png')}")
    print(f"sample grids: {os.path.join(out, cfg.run.name + '-samples-*.png')}")
    print("metrics: each node's exporter (local cluster: http://127.0.0.1:9400/metrics and :9401), labtrain_gan_* and labtrain_train_*")


def main(argv: list[str] | None = None) -> int:
    return job_main(GANConfig, train, kind="gan", prepare=prepare, report=report, num_models=2, argv=argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
