"""python -m jobs.shapes --config jobs/shapes/configs/demo.yaml [key.sub=value ...]"""

from __future__ import annotations

import sys

from jobs.shapes.config import ShapesConfig
from jobs.shapes.data import samples
from jobs.shapes.train import train
from labtrain.launch import job_main, local_shards_missing, resolve_local_paths
from labtrain.data import write_shards


def prepare(cfg: ShapesConfig) -> ShapesConfig:
    """Absolute local paths (workers may start elsewhere) and the synthetic shards if they are missing."""
    cfg = resolve_local_paths(cfg)
    if local_shards_missing(cfg.data.urls):
        out = cfg.data.urls.rsplit("/", 1)[0]
        print(f"writing {cfg.synthetic.num_samples} synthetic samples to {out}", flush=True)
        pattern = write_shards(samples(cfg.synthetic), out, total=cfg.synthetic.num_samples, max_samples=cfg.synthetic.samples_per_shard)
        if pattern != cfg.data.urls:
            raise SystemExit(f"error: wrote {pattern}, but data.urls is {cfg.data.urls}; make data.urls name exactly the shards written")
    return cfg


def main(argv: list[str] | None = None) -> int:
    return job_main(ShapesConfig, train, kind="shapes", prepare=prepare, argv=argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
