"""The video SSL job on the 2-node cluster: a worker killed mid-run, and the run continues exactly."""

from __future__ import annotations

import json
import uuid

import pytest

from jobs.video_ssl.__main__ import prepare
from jobs.video_ssl.config import VideoSSLConfig
from jobs.video_ssl.train import train
from labtrain.config import load_config
from labtrain.train import run
from tests.conftest import REPO, ray_job_submit

TINY = REPO / "jobs/video_ssl/configs/tiny.yaml"
# 64 videos of 16 frames at 16x16, 4-frame 12x12 clips, batch 8 on each of 2 workers: 4 steps an epoch.
SMALL = ["synthetic.num_videos=64", "synthetic.eval_videos=16", "synthetic.samples_per_shard=16", "synthetic.num_frames=16", "synthetic.frame_size=16",
         "sampling.num_frames=4", "sampling.crop_size=12", "model.stem_width=8", "model.widths=[8, 16]", "model.blocks=[1, 1]",
         "objective.stages=[1, 2]", "objective.queue_size=32", "objective.dim=16", "objective.hidden=32", "data.batch_size=8", "data.shuffle_buffer=16",
         "eval.probe_steps=10", "eval.finetune_epochs=1", "eval.batch_size=8", "epochs=2", "checkpoint_every=3", "run.log_every=2", "synthetic.write=true"]


def small(tmp_path, name: str, *extra: str) -> list[str]:
    return [*SMALL, f"run.name={name}", f"data.urls={tmp_path}/train/shard-{{000000..000003}}.tar", f"eval.urls={tmp_path}/eval/shard-{{000000..000000}}.tar",
            f"run.storage_path={tmp_path}/ckpt", f"out_dir={tmp_path}/out", *extra]


@pytest.mark.slow
def test_a_killed_worker_resumes_and_the_run_continues_exactly(ray_cluster, tmp_path):
    """The reference run goes through `ray job submit`; the same run with rank 1 SIGKILLed at step 7
    (run.kill_worker_at_step) restarts from its checkpoint and must produce the same loss at every step:
    the queue of negatives, the key encoder, the data position and the clips cut all come back."""
    reference = f"vssl-{uuid.uuid4().hex[:6]}"
    proc = ray_job_submit(ray_cluster, ["python", "-m", "jobs.video_ssl", "--config", "jobs/video_ssl/configs/tiny.yaml", *small(tmp_path, reference)])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "evaluation: linear_probe" in out, out[-5000:]
    want = json.loads((tmp_path / "out" / f"{reference}-eval.json").read_text())
    assert want["steps"] == 8 and want["resumed_from"] == []

    drilled = f"vssl-{uuid.uuid4().hex[:6]}"
    cfg = prepare(load_config(VideoSSLConfig, TINY, small(tmp_path, drilled, "run.kill_worker_at_step=7", "run.max_failures=1")))
    result = run(train, cfg, cfg.run, kind="video_ssl")
    assert result.error is None
    got = json.loads((tmp_path / "out" / f"{drilled}-eval.json").read_text())
    assert got["resumed_from"] in ([3], [6]), "the killed run restarted once, from a checkpoint before the kill"
    assert [h["step"] for h in got["history"]] == list(range(1, 9))
    for a, b in zip(got["history"], want["history"]):
        for key in ("loss", "loss_stage1", "loss_stage2", "neg_sim_stage2"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), f"step {a['step']} {key}"
    assert got["linear_probe"] == pytest.approx(want["linear_probe"], abs=1e-6)
