"""python -m jobs.vatt --config jobs/vatt/configs/tiny.yaml [synthetic.write=true] [key.sub=value ...]"""

from __future__ import annotations

import os
import sys

from jobs.vatt import data
from jobs.vatt.config import VattConfig
from jobs.vatt.evaluate import summary
from jobs.vatt.train import train
from labtrain.data import require_shards
from labtrain.launch import job_main


def prepare(cfg: VattConfig) -> VattConfig:
    """The training and clean eval shards must exist, or be written from the synthetic corpus on request
    (the patterns then name exactly the shards written)."""
    syn, model = cfg.synthetic, cfg.model
    train_data = require_shards(
        cfg.data, field="data.urls", write=syn.write, write_field="synthetic.write",
        samples=lambda: data.samples(syn, model), total=syn.num_samples, samples_per_shard=syn.samples_per_shard, what="triplets",
    )
    eval_data = require_shards(
        cfg.data.model_copy(update={"urls": cfg.eval.urls, "index": None}), field="eval.urls", write=syn.write, write_field="synthetic.write",
        samples=lambda: data.samples(syn, model, count=cfg.eval.num_samples, split_seed=1, misaligned=0.0),
        total=cfg.eval.num_samples, samples_per_shard=syn.samples_per_shard, what="clean eval triplets",
    )
    return cfg.model_copy(update={"data": train_data, "eval": cfg.eval.model_copy(update={"urls": eval_data.urls})})


def report(cfg: VattConfig, result) -> None:
    out = cfg.out_dir
    print(f"evaluation: {summary(result.metrics)}")
    print(f"report: {os.path.join(out, cfg.run.name + '-eval.json')}")
    print(f"plot: {os.path.join(out, cfg.run.name + '-curves.png')}")
    print("metrics: each node's exporter (local cluster: http://127.0.0.1:9400/metrics and :9401), labtrain_vatt_* and labtrain_train_*")


def main(argv: list[str] | None = None) -> int:
    return job_main(VattConfig, train, kind="vatt", prepare=prepare, report=report, argv=argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
