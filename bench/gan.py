"""The GAN job's step costs, measured side by side in one run; the last line is one JSON object.

- insgen_vs_base_step_time: time of one training minibatch (G main, D main, and R1 every 16th, exactly the
  job's :class:`jobs.gan.train.Phases`) with InsGen's instance discrimination over the ADA baseline, one
  process, the tiny preset's networks; the contenders alternate and the median of each is kept.
- ddp2_vs_1_images_per_s: training images/s of the tiny preset on 2 Ray Train DDP workers (gloo) over 1
  worker (1 CPU each), through the job's real training function on a local Ray instance, from each run's
  own step timer (evaluations and checkpoints excluded), goal >= 1.2 on this 2-core machine. ``--quick``
  skips it (null): starting Ray and two runs takes longer than a minute.

    python bench/gan.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from jobs.gan.config import GANConfig
from jobs.gan.train import Phases, build
from labtrain.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "jobs/gan/configs/tiny.yaml")


def tiny(*overrides: str) -> GANConfig:
    return load_config(GANConfig, TINY, list(overrides))


def step_times(cfg: GANConfig, steps: int, batch: int) -> list[float]:
    torch.manual_seed(0)
    groups = build(cfg, num_images=100, global_batch=batch)
    phases = Phases(cfg, groups, backward=lambda loss, model: loss.backward(), unwrap=lambda model: model, device=torch.device("cpu"), global_batch=batch)
    real = torch.rand(batch, 3, cfg.images.resolution, cfg.images.resolution) * 2 - 1
    times = []
    for step in range(steps):
        start = time.perf_counter()
        phases(real, step)
        times.append(time.perf_counter() - start)
    return times


def images_per_s(workers: int, root: str, steps_per_epoch: int, epochs: int) -> float:
    from jobs.gan.__main__ import prepare
    from jobs.gan.train import train
    from labtrain.train import run

    batch = 16
    cfg = prepare(tiny(
        f"data.urls={root}/train/shard-{{000000..000001}}.tar", f"eval.urls={root}/eval/shard-{{000000..000003}}.tar", "corpus.write=true",
        f"corpus.num_images={batch * steps_per_epoch * 2}", f"corpus.samples_per_shard={batch * steps_per_epoch}", "corpus.eval_images=256",
        "eval.num_generated=64", "eval.extractor_steps=20", "eval.every=100000", "eval.kid_subset_size=64", "eval.kid_subsets=10", "data.shuffle_buffer=0",
        f"epochs={epochs}", "checkpoint_every=100000", "run.log_every=1000", f"run.num_workers={workers}", f"run.name=ddp{workers}",
        f"run.storage_path={root}/ckpt", f"out_dir={root}/out"))
    result = run(train, cfg, cfg.run, kind="gan")
    if result.error is not None:
        raise RuntimeError(f"the {workers}-worker run failed: {result.error}")
    with open(os.path.join(root, "out", f"ddp{workers}-eval.json")) as f:
        return json.load(f)["images_per_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps; skip the DDP figure (under a minute)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core per contender, as each Ray Train worker has
    rounds, steps, batch = (2, 17, 16) if args.quick else (3, 33, 16)
    base, insgen = [], []
    for _ in range(rounds):
        base += step_times(tiny(), steps, batch)[1:]  # the first step warms up
        insgen += step_times(tiny("insgen.enabled=true"), steps, batch)[1:]
    b, i = statistics.median(base), statistics.median(insgen)
    print(f"step (batch {batch}, one process): ADA baseline {1000 * b:.1f} ms, + InsGen {1000 * i:.1f} ms")
    result = {"insgen_vs_base_step_time": round(i / b, 3), "base_step_ms": round(1000 * b, 1), "insgen_step_ms": round(1000 * i, 1), "batch_per_worker": batch,
              "ddp2_vs_1_images_per_s": None, "images_per_s_1_worker": None, "images_per_s_2_workers": None}
    if not args.quick:
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            with tempfile.TemporaryDirectory(prefix="bench-gan-") as tmp:
                one = images_per_s(1, os.path.join(tmp, "one"), steps_per_epoch=20, epochs=4)
                two = images_per_s(2, os.path.join(tmp, "two"), steps_per_epoch=20, epochs=4)
        finally:
            ray.shutdown()
        print(f"DDP: 1 worker {one:.1f} images/s, 2 workers {two:.1f} images/s (batch {batch} per worker)")
        result.update(ddp2_vs_1_images_per_s=round(two / one, 3), images_per_s_1_worker=round(one, 1), images_per_s_2_workers=round(two, 1))
    result["goals"] = {"ddp2_vs_1_images_per_s": 1.2}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
