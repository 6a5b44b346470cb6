"""A run's training curves for the queue's page, read from the TensorBoard events the run wrote (never
recomputed): loss and the job's own scalars (``train/*``), throughput and data-wait share (``perf/*``).

Where the events are comes from the run's record beside its completion record (``<done dir>/<id>.run.json``,
written by :func:`labtrain.launch.job_main` when the queue starts it), a local directory or ``s3://`` prefix.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from labtrain import storage


def run_record_file(done_file: str) -> str:
    """``<done dir>/<id>.run.json`` beside ``<done dir>/<id>.json``: where the run says its outputs are."""
    return done_file[: -len(".json")] + ".run.json"


def _downsample(points: list[tuple[int, float]], max_points: int) -> list[tuple[int, float]]:
    if len(points) <= max_points:
        return points
    stride = len(points) / max_points
    return [points[int(i * stride)] for i in range(max_points - 1)] + [points[-1]]  # the latest always shown


def read_scalars(tensorboard_dir: str, max_points: int = 300) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag under ``tensorboard_dir`` as (step, value) pairs in step order, at most ``max_points``
    each; {} when no events were written yet. s3:// prefixes are copied to a temporary directory first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory(prefix="labtrain-curves-") as tmp:
        local = tensorboard_dir
        if tensorboard_dir.startswith("s3://"):
            from labtrain.data import s3

            fs = s3.filesystem()
            names = [p for p in fs.ls(tensorboard_dir, detail=False) if "tfevents" in os.path.basename(p)] if fs.exists(tensorboard_dir) else []
            for path in names:
                fs.get_file(path, os.path.join(tmp, os.path.basename(path)))
            local = tmp
        if not os.path.isdir(local):
            return {}
        acc = EventAccumulator(local, size_guidance={"scalars": 0})  # 0: keep every point, downsampled here
        acc.Reload()
        out: dict[str, list[tuple[int, float]]] = {}
        for tag in acc.Tags().get("scalars", []):
            by_step = {e.step: e.value for e in acc.Scalars(tag)}  # a resumed run rewrites steps: the last value wins
            out[tag] = _downsample(sorted(by_step.items()), max_points)
        return out


def job_curves(done_file: str | None) -> dict[str, Any]:
    """``{"tensorboard": dir or None, "scalars": {tag: [[step, value], ...]}, "message": why empty}``."""
    if done_file is None:
        return {"tensorboard": None, "scalars": {}, "message": "this queue keeps no run records (its done dir is off)"}
    record = run_record_file(done_file)
    try:
        info = storage.read_json(record)
    except FileNotFoundError:
        return {"tensorboard": None, "scalars": {}, "message": "no curves: the run has not started, or it is not a Ray Train job"}
    tb = info.get("tensorboard")
    if not tb:
        return {"tensorboard": None, "scalars": {}, "message": "the run writes no TensorBoard events (run.tensorboard=false)"}
    scalars = read_scalars(tb)
    return {"tensorboard": tb, "scalars": scalars, "message": "" if scalars else "no points yet"}
