"""The VATT job: config checks, bad triplets, and real runs on the 2-node cluster with every strategy."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from jobs.vatt import data as vatt_data
from jobs.vatt.__main__ import prepare
from jobs.vatt.config import ModelConfig, SyntheticConfig, VattConfig
from jobs.vatt.train import train
from labtrain.config import ConfigError, DataConfig, load_config
from labtrain.data import DataStream, write_shards
from labtrain.train import run
from tests.conftest import REPO

TINY = REPO / "jobs/vatt/configs/tiny.yaml"
SMALL = ["model.frame_size=8", "model.video_patch=[2, 4]", "model.num_frames=4", "model.audio_samples=256", "model.audio_patch=32",
         "model.d_model=32", "model.d_ff=64", "synthetic.num_samples=128", "synthetic.samples_per_shard=32", "eval.num_samples=64",
         "data.batch_size=16", "epochs=1", "checkpoint_every=2", "log_every=2", "eval.probe_steps=20", "synthetic.write=true"]


def test_sizes_that_do_not_fit_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="video_patch pixels 6 does not divide frame_size 16"):
        load_config(VattConfig, TINY, ["model.video_patch=[2, 6]"])
    with pytest.raises(ConfigError, match="num_heads 3 does not divide d_model 64"):
        load_config(VattConfig, TINY, ["model.num_heads=3"])
    with pytest.raises(ConfigError, match="batch_size must be at least 2"):
        load_config(VattConfig, TINY, ["data.batch_size=1"])
    # ZeRO-3 ran on 2 ranks and failed at the conflict score's second partial backward pass (a freed weight), with
    # either target: refused before anything starts, as the queue's submit-time check (--check) refuses it too.
    with pytest.raises(ConfigError, match="run.zero_stage=3 is not supported for VATT: ZeRO-3 frees a module's gathered parameters"):
        load_config(VattConfig, TINY, ["run.strategy=deepspeed", "run.zero_stage=3"])
    load_config(VattConfig, TINY, ["run.strategy=deepspeed", "run.zero_stage=2"])


def test_the_corpus_swaps_texts_and_audio_apart_on_the_same_clips():
    model, syn = ModelConfig(frame_size=8, video_patch=(2, 4)), SyntheticConfig(num_samples=400, misaligned=0.3)
    corrupted = list(vatt_data.samples(syn, model))
    text, audio = np.array([s["json"]["text_swapped"] for s in corrupted]), np.array([s["json"]["audio_swapped"] for s in corrupted])
    assert 0.22 < text.mean() < 0.38 and 0.22 < audio.mean() < 0.38  # each pair at the share, drawn apart
    assert 0.02 < (text & audio).mean() < 0.16
    assert corrupted[0]["text.npy"].shape == (model.text_candidates, model.text_len)
    clean = list(vatt_data.samples(syn.model_copy(update={"misaligned": 0.0}), model))
    assert all(np.array_equal(a["video.npy"], b["video.npy"]) for a, b in zip(clean, corrupted))  # the oracle arm's clips
    for a, b in zip(clean, corrupted):
        assert np.array_equal(a["text.npy"], b["text.npy"]) != bool(b["json"]["text_swapped"])
        assert np.array_equal(a["audio.npy"], b["audio.npy"]) != bool(b["json"]["audio_swapped"])
    eval_split = [s["json"]["misaligned"] for s in vatt_data.samples(syn, model, count=100, split_seed=1, misaligned=0.0)]
    assert sum(eval_split) == 0


def test_bad_triplets_are_skipped_by_name_and_counted(tmp_path, caplog):
    model = ModelConfig(frame_size=8, video_patch=(2, 4))
    good = list(vatt_data.samples(SyntheticConfig(num_samples=29, misaligned=0.0), model))
    no_audio = {k: v for k, v in good[3].items() if k != "audio.npy"}
    wrong_shape = dict(good[7], **{"video.npy": np.zeros((2, 8, 8, 3), np.uint8)})
    empty_text = dict(good[11], **{"text.npy": np.stack([good[11]["text.npy"][0], np.zeros(model.text_len, np.int16), good[11]["text.npy"][2]])})  # one empty candidate
    samples = good[:3] + [no_audio] + good[4:7] + [wrong_shape] + good[8:11] + [empty_text] + good[12:]
    pattern = write_shards(samples, str(tmp_path), max_samples=10, progress=False)
    stream = DataStream(DataConfig(urls=pattern, batch_size=4), decoder=vatt_data.TripletDecoder(model), transform=vatt_data.to_tensors, rank=0, world_size=1)
    with caplog.at_level("WARNING"):
        batches = list(stream)
    assert len(batches) == 29 // 4  # the run goes on with full batches
    assert stream.skipped_samples == 3
    text = caplog.text
    assert "has no audio.npy" in text and "has shape (2, 8, 8, 3)" in text and "empty text" in text
    for bad in (no_audio, wrong_shape, empty_text):
        assert bad["__key__"] in text


def test_word_ids_of_base_vocabulary_survive_the_shards(tmp_path):
    """Base's 2**16 words: ids above 32,767 used to overflow the corpus' int16 text arrays before a shard was written."""
    model = ModelConfig(frame_size=8, video_patch=(2, 4), vocab_size=1 << 16)
    written = list(vatt_data.samples(SyntheticConfig(num_samples=16, misaligned=0.0), model))
    pattern = write_shards(written, str(tmp_path), max_samples=8, progress=False)
    stream = DataStream(DataConfig(urls=pattern, batch_size=16, shuffle_buffer=0), decoder=vatt_data.TripletDecoder(model), transform=vatt_data.to_tensors, rank=0, world_size=1)
    (batch,) = list(stream)
    by_key = {s["__key__"]: s["text.npy"].astype(np.int64) for s in written}
    expected = np.stack([by_key[k] for k in batch["__key__"]])  # in the stream's order
    assert expected.max() > 32_767 and stream.skipped_samples == 0
    assert np.array_equal(batch["text"].numpy(), expected)


def small_cfg(tmp_path, *extra: str) -> VattConfig:
    name = f"vatt-{uuid.uuid4().hex[:6]}"
    overrides = [*SMALL, f"run.name={name}", f"data.urls={tmp_path}/train/shard-{{000000..000003}}.tar",
                 f"eval.urls={tmp_path}/eval/shard-{{000000..000001}}.tar", f"run.storage_path={tmp_path}/ckpt", f"out_dir={tmp_path}/out", *extra]
    return prepare(load_config(VattConfig, TINY, overrides))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed", "accelerate"])
def test_vatt_trains_on_two_workers_with_each_strategy(ray_cluster, tmp_path, strategy):
    cfg = small_cfg(tmp_path, f"run.strategy={strategy}")
    result = run(train, cfg, cfg.run, kind="vatt")
    assert result.error is None
    report = json.loads((tmp_path / "out" / f"{cfg.run.name}-eval.json").read_text())
    assert (tmp_path / "out" / f"{cfg.run.name}-curves.png").stat().st_size > 10_000
    assert report["steps"] == 128 // 2 // 16
    for key in ("t2v_group_r1", "t2v_group_map", "a2v_group_r1", "t2v_class_r1", "class_probe_accuracy", "style_probe_accuracy", "conflict_auroc", "loss_auroc", "drop_precision", "drop_base_rate"):
        assert 0 <= report[key] <= 1, key
    assert len(report["epochs"]) == 1 and 0 <= report["epochs"][0]["conflict_auroc"] <= 1
    assert report["history"] and all(0 <= h["conflict_rate"] <= 1 for h in report["history"])


@pytest.mark.slow
def test_vatt_resumes_from_its_checkpoint(ray_cluster, tmp_path):
    cfg = small_cfg(tmp_path)
    assert run(train, cfg, cfg.run, kind="vatt").error is None
    longer = cfg.model_copy(update={"epochs": 2})
    assert run(train, longer, longer.run, kind="vatt").error is None
    history = json.loads((tmp_path / "out" / f"{cfg.run.name}-eval.json").read_text())["history"]
    steps = [h["step"] for h in history]
    assert steps == sorted(set(steps)) and steps[-1] == 2 * 4  # the second run continued the first's steps


def test_base_preset_matches_vatt_base():
    from jobs.vatt.model import VattModel

    cfg = load_config(VattConfig, REPO / "jobs/vatt/configs/base.yaml")
    assert (cfg.model.num_video_tokens, cfg.model.num_audio_tokens) == (8 * 14 * 14, 1200)
    backbone = VattModel(cfg.model).backbone
    assert len(backbone.encoder.layers) == 12 and backbone.encoder.layers[0].self_attn.num_heads == 12


@pytest.mark.slow
def test_experiment_runs_at_small_size(tmp_path, capsys):
    """The harmonization experiment end to end at a small size: one seed, three arms, with the planted swaps."""
    from jobs.vatt import experiment

    overrides = [o for o in SMALL if not o.startswith("data.batch_size")] + ["data.batch_size=32"]
    argv = ["--config", str(TINY), "--seeds", "0", "--misaligned", "0.3", "--arms", "perfect", "plain", "both", "--out", str(tmp_path), *overrides]
    assert experiment.main(argv) == 0
    result = json.loads((tmp_path / "experiment.json").read_text())
    runs = {r["arm"]: r for r in result["runs"]}
    assert set(runs) == {"perfect", "plain", "both"}
    assert runs["perfect"]["drop_precision"] == 1.0  # the oracle drops exactly the swapped pairs
    for row in result["runs"]:
        assert 0 <= row["conflict_auroc"] <= 1 and 0 <= row["t2v_group_r1"] <= 1
    verdict = result["verdicts"]["30%"]
    assert verdict["gap_perfect_minus_plain"] == runs["perfect"]["t2v_group_r1"] - runs["plain"]["t2v_group_r1"]
    assert {p["arm"] for p in result["paired"]} == {"perfect", "both"}
    assert (tmp_path / "experiment.png").stat().st_size > 10_000
    # The same command into the same folder trains nothing again; another config there is refused (it would resume
    # these runs' checkpoints as its own).
    capsys.readouterr()
    assert experiment.main(argv) == 0
    assert "reusing 3 runs" in capsys.readouterr().out
    again = json.loads((tmp_path / "experiment.json").read_text())
    assert again["runs"] == result["runs"] and again["verdicts"] == result["verdicts"]
    with pytest.raises(SystemExit, match=r"another config \(differs in lr\)"):
        experiment.main(argv + ["lr=0.5"])


def test_the_conflict_target_diagnostic_scores_every_target(tmp_path):
    """jobs.vatt.conflict_targets at a small size: each target's score (and the loss) gets an AUROC per third of
    training, from real per-sample gradients, the last block's parameters included."""
    from jobs.vatt import conflict_targets

    argv = ["--config", str(TINY), "--seeds", "0", "--every", "2", "--out", str(tmp_path), "epochs=2", "synthetic.num_samples=256",
            "eval.num_samples=64", "data.batch_size=32"]
    assert conflict_targets.main(argv) == 0
    report = json.loads((tmp_path / "conflict_targets.json").read_text())
    (row,) = report["rows"]
    assert row["steps"] == 16 and row["measured_triplets"] == 8 * 32
    for name in conflict_targets.TARGETS:
        assert all(0 <= row[f"{name}_{third}"] <= 1 for third in (*conflict_targets.THIRDS, "all")), name
    assert row["params_all"] != row["pooled_all"]  # a score of its own, not the pooled one again
    assert (tmp_path / "conflict_targets.png").stat().st_size > 10_000
