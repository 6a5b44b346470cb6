"""Video in shards: the windowed decode, bad and short videos, sampling that cannot fit, foreign ffmpeg shards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from jobs.video_ssl import data as vdata
from jobs.video_ssl.__main__ import check_sampling
from jobs.video_ssl.config import SyntheticConfig, VideoSSLConfig
from labtrain.config import ConfigError, DataConfig
from labtrain.data import DataStream, write_shards
from labtrain.data.video import VideoError, decode_frames, probe
from tests.conftest import REPO

SYN = SyntheticConfig(num_frames=24, frame_size=16, noise=5.0)


def cfg_with(**sampling) -> VideoSSLConfig:
    return VideoSSLConfig.model_validate({"data": {"urls": "x"}, "eval": {"urls": "y"}, "sampling": {"num_frames": 4, "crop_size": 12, **sampling},
                                          "synthetic": SYN.model_dump(), "objective": {"queue_size": 2}})


def test_a_window_decodes_the_same_frames_as_the_whole_clip():
    video = next(vdata.samples(SYN.model_copy(update={"gop": 4}), count=1))
    assert probe(video["mp4"]).num_frames == 24
    whole = decode_frames(video["mp4"], range(24), full=True)
    for indices in ([13, 15, 17, 19], [0, 1, 2, 3], [20, 22, 23, 21], [9]):
        np.testing.assert_array_equal(decode_frames(video["mp4"], indices), whole[indices])
    with pytest.raises(VideoError, match="ended before frame 30"):
        decode_frames(video["mp4"], [22, 30])


def test_the_class_is_shape_and_motion():
    syn = SyntheticConfig(shapes=4, motions=2, num_frames=8, frame_size=16)
    metas = [s["json"] for s in vdata.samples(syn, count=64)]
    assert syn.num_classes == 8
    assert {(m["label"], m["shape"], m["motion"]) for m in metas} <= {(i, vdata.SHAPES[i // 2], vdata.MOTIONS[i % 2]) for i in range(8)}
    assert len({m["label"] for m in metas}) == 8


def test_clips_come_from_the_sample_seed_so_a_resume_cuts_the_same_ones():
    video = next(vdata.samples(SYN, count=1))
    sampler = vdata.ClipSampler(cfg_with(slow_stride=2))
    a, b, c = (sampler({**video, "__seed__": s}) for s in (7, 7, 8))
    assert a["clips"].shape == (2, 3, 4, 12, 12) and a["speed"].tolist() == [0, 1]
    assert torch.equal(a["clips"], b["clips"]) and not torch.equal(a["clips"], c["clips"])


def _stream(samples, tmp_path, cfg, batch_size=4):
    pattern = write_shards(samples, str(tmp_path), max_samples=10, progress=False)
    return DataStream(DataConfig(urls=pattern, batch_size=batch_size), decoder=vdata.ClipSampler(cfg), rank=0, world_size=1)


def test_corrupt_short_and_incomplete_videos_are_skipped_and_counted(tmp_path, caplog):
    good = list(vdata.samples(SYN, count=25))
    short = next(vdata.samples(SYN.model_copy(update={"num_frames": 4}), count=1, split_seed=3))
    corrupt = dict(good[5], mp4=good[5]["mp4"][:200] + bytes(400))
    no_video = {k: v for k, v in good[9].items() if k != "mp4"}
    samples = good[:2] + [dict(short, __key__="short0")] + good[2:5] + [corrupt] + good[6:9] + [no_video] + good[10:]
    stream = _stream(samples, tmp_path, cfg_with(slow_stride=2))
    with caplog.at_level("WARNING"):
        batches = list(stream)
    assert len(batches) == 26 // 4 and all(b["clips"].shape[0] == 4 for b in batches)  # the run goes on with full batches
    assert stream.skipped_samples == 3
    assert "has no .mp4" in caplog.text and "has 4 frames, fewer than the 7" in caplog.text
    for key in (corrupt["__key__"], no_video["__key__"], "short0"):
        assert key in caplog.text


def test_short_videos_are_padded_when_asked(tmp_path):
    short = list(vdata.samples(SYN.model_copy(update={"num_frames": 6}), count=8))
    stream = _stream(short, tmp_path, cfg_with(slow_stride=2, short_clips="pad"))
    batches = list(stream)
    assert stream.skipped_samples == 0 and len(batches) == 2
    fast = batches[0]["clips"][0, 1]  # stride 4 over 6 frames: the last frames repeat the 6th
    torch.testing.assert_close(fast[:, -1], fast[:, -2])


def test_sampling_that_cannot_fit_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="the fast clip spans 31 frames"):
        VideoSSLConfig.model_validate({"data": {"urls": "x"}, "eval": {"urls": "y"}, "synthetic": {"write": True, "num_frames": 24},
                                       "sampling": {"num_frames": 16, "slow_stride": 1, "fast_factor": 2}})
    with pytest.raises(ValueError, match="crop_size=40 is larger than the corpus' frames"):
        VideoSSLConfig.model_validate({"data": {"urls": "x"}, "eval": {"urls": "y"}, "synthetic": {"write": True}, "sampling": {"crop_size": 40}})
    pattern = write_shards(vdata.samples(SYN, count=4), str(tmp_path), progress=False)  # shards that exist: read their first video
    with pytest.raises(ConfigError, match="the fast clip spans 29 frames but the videos of .* have 24"):
        check_sampling(cfg_with(num_frames=8, slow_stride=2), pattern, None, "data.urls")
    with pytest.raises(ConfigError, match="crop_size=20 does not fit the 16x16 frames"):
        check_sampling(cfg_with(crop_size=20), pattern, None, "data.urls")
    with pytest.raises(ConfigError, match="objective.queue_size=256 is not smaller than the 4 training videos"):
        check_sampling(VideoSSLConfig.model_validate({**cfg_with().model_dump(), "objective": {"queue_size": 256}}), pattern, None, "data.urls")
    check_sampling(cfg_with(), pattern, None, "data.urls")


def test_shards_packed_by_plain_tar_from_ffmpeg_clips_train(tmp_path):
    """Clips encoded by the ffmpeg command (its defaults: B-frames, one keyframe), packed with tar,
    indexed with `labtrain shards index`, then trained on and evaluated by the job in one process."""
    assert shutil.which("ffmpeg"), "this test needs Debian's ffmpeg command: `make tools` installs it"
    folder = tmp_path / "clips"
    folder.mkdir()
    syn = SyntheticConfig(num_frames=20, frame_size=32, noise=5.0)
    rng = np.random.default_rng(0)
    for i in range(16):
        label = i % syn.num_classes
        video, _ = vdata.render(syn, label, rng)
        subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "32x32", "-r", "12", "-i", "-",
                        "-c:v", "libx264", "-pix_fmt", "yuv420p", str(folder / f"clip{i:03d}.mp4")], input=video.tobytes(), check=True)
        (folder / f"clip{i:03d}.cls").write_text(str(label))
    shards = tmp_path / "shards"
    shards.mkdir()
    for part in range(2):
        names = [f"clip{i:03d}.{ext}" for i in range(part * 8, part * 8 + 8) for ext in ("mp4", "cls")]
        subprocess.run(["tar", "-cf", str(shards / f"foreign-{part}.tar"), *names], cwd=folder, check=True)
    assert tarfile.is_tarfile(shards / "foreign-0.tar")
    pattern = str(shards / "foreign-{0..1}.tar")
    index = subprocess.run([sys.executable, "-m", "labtrain.cli", "shards", "index", pattern], capture_output=True, text=True, timeout=120)
    assert index.returncode == 0 and "16 samples" in index.stdout, index.stdout + index.stderr
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.video_ssl", "--config", str(REPO / "jobs/video_ssl/configs/tiny.yaml"), f"data.urls={pattern}", f"eval.urls={pattern}",
         "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=0", "run.num_workers=0", "run.name=foreign", f"run.storage_path={tmp_path}/ckpt",
         f"out_dir={out}", "epochs=1", "sampling.num_frames=4", "model.widths=[8, 16]", "model.blocks=[1, 1]", "model.stem_width=8",
         "objective.stages=[1, 2]", "objective.queue_size=4", "eval.probe_steps=5", "eval.finetune_epochs=1", "eval.batch_size=8"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((out / "foreign-eval.json").read_text())
    assert report["steps"] == 4 and report["heldout_videos"] == 16 and report["num_classes"] == 8
    assert 0 < report["history"][0]["decode_seconds_per_clip"] < 1
