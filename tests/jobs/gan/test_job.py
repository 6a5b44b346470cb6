"""The GAN job on the 2-node cluster: through the lab queue, and through `ray job submit` with a worker
killed mid-run, after which the run continues exactly."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.conftest import ray_job_submit

# 32 images at 16x16, batch 8 on each of 2 workers: 2 steps an epoch, 12 steps; InsGen on, R1 every 4 steps,
# ADA adjusting every 2 (so every state the checkpoint must carry changes inside the run).
SMALL = ["corpus.num_images=32", "corpus.eval_images=200", "corpus.samples_per_shard=16", "model.z_dim=16", "model.w_dim=16", "model.g_channels=32",
         "model.d_channels=32", "model.min_channels=8", "insgen.enabled=true", "insgen.dim=16", "loss.r1_every=4", "ada.interval=2", "ada.kimg=0.2",
         "data.batch_size=8", "data.shuffle_buffer=16", "eval.every=6", "eval.num_generated=64", "eval.extractor_steps=30", "eval.kid_subsets=10",
         "eval.kid_subset_size=50", "epochs=6", "checkpoint_every=3", "run.log_every=2", "corpus.write=true"]


def small(tmp_path, *extra: str) -> list[str]:
    return [*SMALL, f"data.urls={tmp_path}/train/shard-{{000000..000001}}.tar", f"eval.urls={tmp_path}/eval/shard-{{000000..000012}}.tar",
            f"run.storage_path={tmp_path}/ckpt", f"out_dir={tmp_path}/out", *extra]


@pytest.mark.slow
def test_a_killed_worker_resumes_and_the_run_continues_exactly(ray_cluster, tmp_path):
    """The reference run goes through the lab queue; the same run through `ray job submit`, with rank 1
    SIGKILLed at step 10, restarts from its checkpoint and must produce the same losses at every step and the
    same final FID_domain: G, D, G_ema, D_ema, both heads and their momentum copies, the four optimizers, the
    queues, ADA's p and its running r_t, the RNG and the data position all come back, and the shuffle buffer's
    order is replayed (the data path re-reads the epoch's consumed samples through it)."""
    from tests.train.test_submit import _submit_follow

    reference, out = _submit_follow(ray_cluster, tmp_path, ["jobs/gan/configs/tiny.yaml", "--job", "jobs.gan", "--workers", "2", *small(tmp_path)])
    assert "evaluation: FID_domain[" in out and "step 12/12 (100%)" in out
    want = json.loads((tmp_path / "out" / f"{reference}-eval.json").read_text())  # the queue names the run by its job id
    assert want["steps"] == 12 and want["resumed_from"] == [] and want["workers"] == 2
    assert [e["step"] for e in want["evaluations"]] == [6, 12]
    assert want["history"][-1]["ada_p"] > 0, "ADA's p moved during the run (a state the resume must carry)"
    assert (tmp_path / "out" / f"{reference}-samples-000012.png").exists()

    drilled = f"gan-{uuid.uuid4().hex[:6]}"
    proc = ray_job_submit(ray_cluster, ["python", "-m", "jobs.gan", "--config", "jobs/gan/configs/tiny.yaml",
                                        *small(tmp_path, f"run.name={drilled}", "run.kill_worker_at_step=10", "run.max_failures=1")])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "evaluation: FID_domain[" in out, out[-5000:]
    got = json.loads((tmp_path / "out" / f"{drilled}-eval.json").read_text())
    assert got["resumed_from"] in ([3], [6], [9]), "the killed run restarted once, from a checkpoint before the kill"
    assert got["metric"] == want["metric"], "both runs scored with the same extractor (its hash in the name)"
    assert [h["step"] for h in got["history"]] == list(range(1, 13))
    for a, b in zip(got["history"], want["history"]):
        for key in ("loss_generator", "loss_discriminator", "loss_real_id", "loss_fake_id", "loss_g_diversity", "ada_p", "fake_score"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), f"step {a['step']} {key}"
    assert got["fid"] == pytest.approx(want["fid"], rel=1e-5) and got["kid"] == pytest.approx(want["kid"], rel=1e-4, abs=1e-6)


P2P = ["model.arch=pix2pixhd", "corpus.kind=labelmaps", "corpus.num_images=32", "corpus.eval_images=64", "corpus.samples_per_shard=16", "images.resolution=16",
       "pix2pixhd.ngf=8", "pix2pixhd.ndf=8", "pix2pixhd.n_downsample=2", "pix2pixhd.n_blocks=1", "data.batch_size=4", "data.shuffle_buffer=16",
       "eval.every=6", "epochs=3", "checkpoint_every=3", "run.log_every=2", "corpus.write=true"]


@pytest.mark.slow
def test_pix2pixhd_through_the_queue_and_a_killed_worker_continues_exactly(ray_cluster, tmp_path):
    """pix2pixHD's reference run through the lab queue; the same run through `ray job submit` with rank 1 SIGKILLed
    at step 10 restarts from a checkpoint (G, D, both optimizers and their lr schedules, RNG, data position) and
    gives the same losses at every step and the same held-out L1/PSNR."""
    from tests.train.test_submit import _submit_follow

    paths = [f"data.urls={tmp_path}/train/shard-{{000000..000001}}.tar", f"eval.urls={tmp_path}/eval/shard-{{000000..000003}}.tar",
             f"run.storage_path={tmp_path}/ckpt", f"out_dir={tmp_path}/out"]
    reference, out = _submit_follow(ray_cluster, tmp_path, ["jobs/gan/configs/pix2pixhd-tiny.yaml", "--job", "jobs.gan", "--workers", "2", *P2P, *paths])
    assert "evaluation: pix2pixHD L1" in out and "step 12/12 (100%)" in out
    want = json.loads((tmp_path / "out" / f"{reference}-eval.json").read_text())
    assert want["steps"] == 12 and want["workers"] == 2 and [e["step"] for e in want["evaluations"]] == [6, 12]
    assert want["num_scored"] == 32 and 0 < want["l1"] < 1 and (tmp_path / "out" / f"{reference}-samples-000012.png").exists()

    drilled = f"p2p-{uuid.uuid4().hex[:6]}"
    proc = ray_job_submit(ray_cluster, ["python", "-m", "jobs.gan", "--config", "jobs/gan/configs/pix2pixhd-tiny.yaml", *P2P, *paths,
                                        f"run.name={drilled}", "run.kill_worker_at_step=10", "run.max_failures=1"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "evaluation: pix2pixHD L1" in out, out[-5000:]
    got = json.loads((tmp_path / "out" / f"{drilled}-eval.json").read_text())
    assert got["resumed_from"] in ([3], [6], [9]), "the killed run restarted once, from a checkpoint before the kill"
    assert [h["step"] for h in got["history"]] == list(range(1, 13))
    for a, b in zip(got["history"], want["history"]):
        for key in ("loss_generator", "loss_feature_matching", "loss_discriminator", "loss_discriminator_real"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), f"step {a['step']} {key}"
    assert got["l1"] == pytest.approx(want["l1"], rel=1e-5) and got["psnr"] == pytest.approx(want["psnr"], rel=1e-5)
