"""python -m jobs.shapes --config jobs/shapes/configs/demo.yaml [synthetic.write=true] [key.sub=value ...]"""

from __future__ import annotations

import sys

from jobs.shapes.config import ShapesConfig
from jobs.shapes.data import samples
from jobs.shapes.train import train
from labtrain.data import require_shards
from labtrain.launch import job_main


def prepare(cfg: ShapesConfig) -> ShapesConfig:
    """The training shards must exist, or be written from the synthetic corpus on request."""
    syn = cfg.synthetic
    data = require_shards(
        cfg.data, field="data.urls", write=syn.write, write_field="synthetic.write",
        samples=lambda: samples(syn), total=syn.num_samples, samples_per_shard=syn.samples_per_shard, what="shape images",
    )
    return cfg.model_copy(update={"data": data})


def main(argv: list[str] | None = None) -> int:
    return job_main(ShapesConfig, train, kind="shapes", prepare=prepare, argv=argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
