"""python -m jobs.vatt --config jobs/vatt/configs/tiny.yaml [key.sub=value ...]"""

from __future__ import annotations

import os
import sys

from jobs.vatt import data
from jobs.vatt.config import VattConfig
from jobs.vatt.evaluate import summary
from jobs.vatt.train import train
from labtrain.data import write_shards
from labtrain.launch import job_main, local_shards_missing, resolve_local_paths, resolve_path


def _write(urls: str, samples, total: int, per_shard: int) -> str:
    """Write the synthetic shards into the folder of ``urls``; returns the pattern of what was written."""
    out = urls.rsplit("/", 1)[0]
    print(f"writing {total} synthetic triplets to {out}", flush=True)
    return write_shards(samples, out, total=total, max_samples=per_shard)


def prepare(cfg: VattConfig) -> VattConfig:
    """Absolute paths for the workers, and the synthetic train and clean eval shards if missing (the
    patterns then name exactly the shards written)."""
    cfg = resolve_local_paths(cfg)
    eval_cfg = cfg.eval.model_copy(update={"urls": resolve_path(cfg.eval.urls)})
    data_cfg = cfg.data
    syn = cfg.synthetic
    if local_shards_missing(data_cfg.urls):
        data_cfg = data_cfg.model_copy(update={"urls": _write(data_cfg.urls, data.samples(syn, cfg.model), syn.num_samples, syn.samples_per_shard)})
    if local_shards_missing(eval_cfg.urls):
        clean = data.samples(syn, cfg.model, count=eval_cfg.num_samples, split_seed=1, misaligned=0.0)
        eval_cfg = eval_cfg.model_copy(update={"urls": _write(eval_cfg.urls, clean, eval_cfg.num_samples, syn.samples_per_shard)})
    return cfg.model_copy(update={"data": data_cfg, "eval": eval_cfg, "out_dir": resolve_path(cfg.out_dir)})


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
