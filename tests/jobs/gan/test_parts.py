"""The GAN job's parts on one process: the data policy, the networks, ADA, the losses, InsGen's queues, the config's refusals."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jobs.gan import data
from jobs.gan.augment import AdaState, augment
from jobs.gan.config import AdaConfig, GANConfig, ImagesConfig, ModelConfig
from jobs.gan.losses import InsGenState, info_nce, r1_penalty
from jobs.gan.model import Discriminator, Generator, Head, ModulatedConv
from jobs.gan.train import ema_beta
from labtrain.config import ConfigError, load_config


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode=mode).save(out, format="PNG")
    return out.getvalue()


def test_images_of_another_size_or_mode_are_resized_converted_or_skipped():
    grey32 = _png(np.full((32, 32), 200, np.uint8))
    resize = data.ImageDecoder(ImagesConfig(resolution=16))
    out = resize({"__key__": "a", "png": grey32, "cls": b"3"})
    assert out["image"].shape == (3, 16, 16) and out["label"] == 3
    assert torch.allclose(out["image"], torch.full((3, 16, 16), 200 / 127.5 - 1), atol=1e-2)
    with pytest.raises(ValueError, match="a is 32x32, not 16x16.*wrong_size=skip"):
        data.ImageDecoder(ImagesConfig(resolution=16, wrong_size="skip"))({"__key__": "a", "png": _png(np.zeros((32, 32, 3), np.uint8))})
    with pytest.raises(ValueError, match="b is L, not RGB.*wrong_mode=skip"):
        data.ImageDecoder(ImagesConfig(resolution=32, wrong_mode="skip"))({"__key__": "b", "png": grey32})
    with pytest.raises(ValueError, match="c has no .png/.jpg"):
        resize({"__key__": "c", "txt": b"x"})


def test_skipped_images_are_counted_by_the_data_path_and_the_run_goes_on(tmp_path):
    from labtrain.config import DataConfig
    from labtrain.data import DataStream, write_shards

    good = [{"__key__": f"g{i}", "png": _png(np.full((16, 16, 3), i, np.uint8)), "cls": 0} for i in range(6)]
    bad = [{"__key__": "big", "png": _png(np.zeros((20, 20, 3), np.uint8)), "cls": 0}, {"__key__": "broken", "png": b"not a png", "cls": 0}]
    pattern = write_shards(iter(good[:3] + bad + good[3:]), str(tmp_path), total=8, max_samples=8)
    stream = DataStream(DataConfig(urls=pattern, batch_size=2, shuffle_buffer=0, num_workers=0), decoder=data.ImageDecoder(ImagesConfig(resolution=16, wrong_size="skip")),
                        rank=0, world_size=1)
    images = torch.cat([b["image"] for b in stream])
    assert stream.skipped_samples == 2 and len(images) == 8  # the two bad ones replaced by others, as every bad sample is


def test_the_corpora_have_their_modes_and_the_digits_are_real_scans():
    images, labels = data.shapes(200, 16, 10, seed=0)
    assert images.shape == (200, 16, 16, 3) and images.dtype == np.uint8 and set(labels.tolist()) == set(range(10))
    same, _ = data.shapes(200, 16, 10, seed=0)
    assert np.array_equal(images, same)
    digits, digit_labels = data.digits(16, seed=0)
    assert digits.shape == (1797, 16, 16, 3) and set(digit_labels.tolist()) == set(range(10))


def test_the_modulated_convolution_is_one_convolution_per_sample_with_its_own_scaled_weights():
    torch.manual_seed(0)
    conv = ModulatedConv(4, 5, 3, w_dim=6)
    x, w = torch.randn(3, 4, 8, 8), torch.randn(3, 6)
    out = conv(x, w)
    for i in range(3):
        weight = conv.weight * conv.scale * conv.affine(w[i:i + 1])[0][None, :, None, None]
        weight = weight / weight.square().sum([1, 2, 3], keepdim=True).add(1e-8).sqrt()
        assert torch.allclose(out[i:i + 1], F.conv2d(x[i:i + 1], weight, padding=1), atol=1e-5)


def test_generator_and_discriminator_shapes_and_style_mixing():
    cfg = ModelConfig(z_dim=8, w_dim=8, g_channels=16, d_channels=16, min_channels=8)
    G, D = Generator(cfg, 16), Discriminator(cfg, 16)
    z = torch.randn(8, 8)
    torch.manual_seed(1)
    plain = G(z)
    assert plain.shape == (8, 3, 16, 16) and G.num_ws == 6
    torch.manual_seed(1)
    assert torch.equal(G(z, mixing=0.0), plain)
    torch.manual_seed(1)
    assert not torch.allclose(G(z, mixing=1.0), plain)
    logits, feats = D(plain)
    assert logits.shape == (8,) and feats.shape == (8, D.feature_dim)


def test_r1_is_the_squared_input_gradient_of_each_image():
    class Linear(torch.nn.Module):  # D(x) = <a_i, x>: its input gradient is a, whatever x
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.randn(3 * 4 * 4))

        def forward(self, x):
            return x.flatten(1) @ self.a, x.flatten(1)

    D = Linear()
    penalty = r1_penalty(D, torch.randn(5, 3, 4, 4), lambda x: x)
    assert torch.allclose(penalty, D.a.square().sum().expand(5).detach())
    penalty.sum().backward()
    assert torch.allclose(D.a.grad, 2 * 5 * D.a.detach())  # d/da of 5 |a|^2


def test_augmentation_is_identity_at_p0_differentiable_and_strong_at_p1():
    cfg = AdaConfig()
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    assert torch.allclose(augment(x, 0.0, cfg), x, atol=1e-6)
    assert (augment(x, 1.0, cfg) - x).abs().mean() > 0.2
    x.requires_grad_(True)
    augment(x, 0.5, cfg).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(augment(x, 1.0, AdaConfig(enabled=False)), x)


def test_ada_moves_p_by_the_heuristic_every_interval():
    ada = AdaState(AdaConfig(interval=2, kimg=0.1, target=0.6))
    for step in (1, 2):
        ada.observe(torch.tensor([1.0, 1.0, 1.0, -1.0]))  # r_t = 0.5 < 0.6: D does not overfit, p goes down (stays at 0)
        ada.maybe_adjust(step)
    assert float(ada.p) == 0.0
    for step in (3, 4):
        ada.observe(torch.tensor([1.0, 1.0, 1.0, 1.0]))  # r_t = 1 > 0.6: up by 8 images / 100
        ada.maybe_adjust(step)
    assert float(ada.p) == pytest.approx(0.08)
    ada.observe(torch.tensor([-1.0, -1.0]))
    ada.maybe_adjust(5)  # not an adjustment step
    assert float(ada.p) == pytest.approx(0.08) and float(ada.signs[1]) == 2


def test_ema_beta_follows_the_half_life_and_its_ramp_up():
    assert ema_beta(10 / 1000, None, batch=10, images_seen=10**6) == pytest.approx(0.5)  # half-life of 10 images, batch 10
    assert ema_beta(10.0, 0.05, batch=10, images_seen=200) == pytest.approx(0.5)  # ramp-up: half-life 5% of 200 = 10 images


def test_insgen_queues_wrap_and_info_nce_prefers_the_key():
    D = Discriminator(ModelConfig(d_channels=16, min_channels=8), 16)
    state = InsGenState(D, Head(D.feature_dim, 4), Head(D.feature_dim, 4), real_queue=5, fake_queue=3, dim=4)
    keys = F.normalize(torch.randn(4, 4), dim=1)
    state.enqueue("real", keys)
    state.enqueue("real", keys)
    assert torch.equal(state.queue_real[[4, 0, 1, 2]], keys) and int(state.ptr[0]) == 3  # 8 keys into 5 slots: oldest out
    state.enqueue("fake", keys)  # more keys than slots: the newest 3
    assert torch.equal(state.queue_fake, keys[1:]) and int(state.ptr[1]) == 0
    q = F.normalize(torch.randn(8, 4), dim=1)
    orthogonal = F.normalize(torch.randn(16, 4), dim=1)
    assert info_nce(q, q, orthogonal, 0.2) < info_nce(q, -q, orthogonal, 0.2)


def test_every_signal_of_a_training_step_is_a_metric_name_promtool_accepts():
    """What `session.log` exports as labtrain_gan_<signal> gauges (promtool read `loss_d` as an abbreviated unit)."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    from jobs.gan.train import Phases, build
    from labtrain.train.logger import _metric_name
    from tests.test_metrics import promtool_check

    cfg = load_config(GANConfig, "jobs/gan/configs/tiny.yaml", ["insgen.enabled=true", "loss.r1_every=1", "model.g_channels=16", "model.d_channels=16"])
    phases = Phases(cfg, build(cfg, num_images=100, global_batch=16), backward=lambda loss, model: loss.backward(), unwrap=lambda m: m,
                    device=torch.device("cpu"), global_batch=16)
    signals = phases(torch.rand(16, 3, 16, 16) * 2 - 1, 0)
    assert {"loss_generator", "loss_discriminator", "r1", "ada_p", "loss_real_id", "loss_fake_id", "loss_g_diversity"} <= set(signals)
    registry = CollectorRegistry()
    for name in [*signals, "fid_domain", "fid_inception", "kid", "mode_coverage"]:
        Gauge(_metric_name("gan", name), f"gan job: {name} (session.log).", ["job"], registry=registry).labels("x").set(1.0)
    promtool_check(generate_latest(registry).decode())


def test_the_config_refuses_what_the_gan_job_cannot_run(tmp_path):
    base = {"data": {"urls": "x/shard-000000.tar", "batch_size": 16}, "eval": {"urls": "y/shard-000000.tar"}}
    GANConfig(**base)
    for change, message in ((("run", {"strategy": "deepspeed"}), "runs on ddp only"), (("run", {"precision": "bf16"}), "trains in fp32"),
                            (("images", {"resolution": 24}), "power of two"), (("model", {"mbstd_group": 5}), "must divide data.batch_size"),
                            (("eval", {"urls": "y", "extractor": "inception"}), "needs eval.inception_weights")):
        with pytest.raises(ValueError, match=message):
            GANConfig(**{**base, change[0]: {**base.get(change[0], {}), **change[1]}})
    with pytest.raises(ConfigError, match="run.strategy"):
        load_config(GANConfig, "jobs/gan/configs/tiny.yaml", ["run.strategy=accelerate"])


def test_a_missing_corpus_is_refused_before_anything_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.gan", "--config", "jobs/gan/configs/tiny.yaml", f"data.urls={tmp_path}/none/shard-000000.tar",
                           f"eval.urls={tmp_path}/none/eval-000000.tar"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "data.urls: no shards at" in proc.stderr and "corpus.write=true" in proc.stderr
