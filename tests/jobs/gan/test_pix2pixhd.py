"""pix2pixHD's parts on one process: the paired corpus and its decoder, the networks, LSGAN and feature matching
with pix2pixHD's weights, the scorer's baseline, a few steps that learn, the config's refusals."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jobs.gan import data, pix2pixhd
from jobs.gan.config import GANConfig, ImagesConfig, Pix2PixHDConfig

TINY = Pix2PixHDConfig(label_classes=4, ngf=8, n_downsample=2, n_blocks=1, ndf=8, n_layers_d=3, num_d=2)


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def test_the_paired_corpus_renders_each_class_with_its_texture_from_its_map():
    maps, images, clean = data.labelmaps(50, 32, 4, seed=0)
    assert maps.shape == (50, 32, 32) and images.shape == clean.shape == (50, 32, 32, 3)
    assert set(np.unique(maps)) == {0, 1, 2, 3}
    again = data.labelmaps(50, 32, 4, seed=0)
    assert all((a == b).all() for a, b in zip(again, (maps, images, clean)))
    noise = images.astype(float) - clean
    assert 2.0 < noise.std() < 4.0  # the noise the oracle does not have
    # the texture is in the map's regions: the red class' pixels are red, the background's dark
    red = clean[maps == 1]
    assert (red[:, 0] > red[:, 1] + 40).all() and clean[maps == 0].max() < 60


def test_the_pair_decoder_one_hots_the_map_and_skips_what_it_cannot_use():
    maps, images, _ = data.labelmaps(1, 16, 4, seed=1)
    decode = data.PairDecoder(ImagesConfig(resolution=16), classes=4)
    out = decode({"__key__": "a", "png": _png(images[0]), "label.png": _png(maps[0])})
    assert out["label_map"].shape == (4, 16, 16) and (out["label_map"].sum(0) == 1).all()
    assert (out["label_map"].argmax(0).numpy() == maps[0]).all() and out["image"].shape == (3, 16, 16)
    # a map of another size is resized with nearest neighbours (no blended classes)
    big = np.kron(maps[0], np.ones((2, 2), np.uint8))
    resized = decode({"__key__": "b", "png": _png(images[0]), "label.png": _png(big)})["label_map"]
    assert (resized.argmax(0).numpy() == maps[0]).all()
    with pytest.raises(ValueError, match="c has no label map"):
        decode({"__key__": "c", "png": _png(images[0])})
    with pytest.raises(ValueError, match="d: the label map has class 3, but pix2pixhd.label_classes=3"):
        data.PairDecoder(ImagesConfig(resolution=16), classes=3)({"__key__": "d", "png": _png(images[0]), "label.png": _png(np.full((16, 16), 3, np.uint8))})
    with pytest.raises(ValueError, match="e: the label map is RGB"):
        decode({"__key__": "e", "png": _png(images[0]), "label.png": _png(images[0])})
    # a flip flips the image and its map together
    flip = data.PairDecoder(ImagesConfig(resolution=16, xflip=True), classes=4)
    flipped = [flip({"__key__": "f", "__seed__": s, "png": _png(images[0]), "label.png": _png(maps[0])}) for s in range(8)]
    for f in flipped:
        same = torch.equal(f["label_map"], out["label_map"])
        assert same == torch.equal(f["image"], out["image"]) and (same or torch.equal(f["label_map"].flip(-1), out["label_map"]))
    assert not all(torch.equal(f["image"], out["image"]) for f in flipped)


def test_generator_and_multiscale_discriminator_shapes():
    G, D = pix2pixhd.GlobalGenerator(TINY), pix2pixhd.MultiscaleDiscriminator(TINY)
    label = F.one_hot(torch.randint(0, 4, (2, 32, 32)), 4).permute(0, 3, 1, 2).float()
    fake = G(label)
    assert fake.shape == (2, 3, 32, 32) and fake.abs().max() <= 1
    out = D(torch.cat([label, fake], 1))
    assert len(out) == 2 and all(len(scale) == TINY.n_layers_d + 2 for scale in out)  # n_layers stride-2, one stride-1, the prediction
    assert out[0][-1].shape[1] == 1 and out[1][-1].shape[-1] < out[0][-1].shape[-1]  # the second scale sees the input pooled once
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in G.modules())
    assert all(not m.affine for m in G.modules() if isinstance(m, torch.nn.InstanceNorm2d))


def test_lsgan_and_feature_matching_use_pix2pixhds_targets_and_weights():
    ones = [[torch.zeros(2, 4, 3, 3), torch.ones(2, 1, 3, 3)], [torch.zeros(2, 4, 2, 2), torch.ones(2, 1, 2, 2)]]
    assert pix2pixhd.lsgan(ones, 1.0) == 0 and pix2pixhd.lsgan(ones, 0.0) == 2  # mean squared error per scale, summed
    cfg = TINY.model_copy(update={"n_layers_d": 3, "num_d": 2, "lambda_feat": 10.0})
    fake = [[torch.full((1, 2, 2, 2), 1.0)] * 4 + [torch.zeros(1, 1, 2, 2)] for _ in range(2)]
    real = [[torch.zeros(1, 2, 2, 2)] * 4 + [torch.full((1, 1, 2, 2), 9.0)] for _ in range(2)]
    # 2 scales x 4 layers (the prediction excluded), each L1 = 1, weighted 10 x 4/(3+1) / 2 = 5
    assert pix2pixhd.feature_matching(fake, real, cfg).item() == pytest.approx(40.0)
    real[0][0].requires_grad_(True)
    assert not pix2pixhd.feature_matching(fake, real, cfg).requires_grad  # the real features are targets, not trained through


def test_the_lr_is_constant_then_decays_linearly_to_zero():
    f = pix2pixhd.linear_decay(100, 0.5)
    assert [f(0), f(49), f(50), f(75), f(100)] == [1.0, 1.0, 1.0, 0.5, 0.0]


def test_the_class_mean_baseline_is_exact_on_flat_classes_and_a_few_steps_beat_the_start():
    maps, images, _ = data.labelmaps(64, 16, 4, seed=2)
    one_hot = F.one_hot(torch.from_numpy(maps).long(), 4).permute(0, 3, 1, 2).float()
    palette = torch.tensor([[-1.0, -1, -1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]])
    flat = torch.einsum("nkhw,kc->nchw", one_hot, palette)
    assert pix2pixhd.PairScorer(one_hot, flat).baseline() == {"l1": 0.0, "psnr": pytest.approx(100.0)}

    torch.manual_seed(0)
    cfg = GANConfig(data={"urls": "x/shard-000000.tar", "batch_size": 16}, eval={"urls": "y/shard-000000.tar"}, model={"arch": "pix2pixhd"},
                    images={"resolution": 16}, pix2pixhd=TINY.model_dump())
    phases = pix2pixhd.Phases(cfg, pix2pixhd.build(cfg, total_steps=60), backward=lambda loss, model: loss.backward(), unwrap=lambda m: m)
    real = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    scorer = pix2pixhd.PairScorer(one_hot, real)
    before = scorer(phases.G, torch.device("cpu"))
    for step in range(60):
        i = (step % 2) * 16
        signals = phases(one_hot[i:i + 16], real[i:i + 16])
    after = scorer(phases.G, torch.device("cpu"))
    assert after["l1"] < 0.7 * before["l1"] and after["psnr"] > before["psnr"] + 3, (before, after)
    assert {"loss_generator_gan", "loss_feature_matching", "loss_discriminator_real", "loss_discriminator_fake"} <= set(signals)
    assert phases.opt_G.param_groups[0]["lr"] == pytest.approx(0.0)  # the decay reached zero at the last step


def test_the_config_refuses_what_pix2pixhd_cannot_run():
    base = {"data": {"urls": "x/shard-000000.tar"}, "eval": {"urls": "y/shard-000000.tar"}}
    for update, message in (({"model": {"arch": "pix2pixhd"}, "insgen": {"enabled": True}}, "InsGen and GenDA are StyleGAN2's"),
                            ({"model": {"arch": "pix2pixhd"}, "corpus": {"write": True, "kind": "shapes"}}, "has no label maps; use corpus.kind=labelmaps"),
                            ({"model": {"arch": "pix2pixhd"}, "images": {"resolution": 16}, "pix2pixhd": {"n_downsample": 5}}, "divisible by 2"),
                            ({"corpus": {"write": True, "kind": "labelmaps"}}, "use model.arch=pix2pixhd")):
        with pytest.raises(ValueError, match=message):
            GANConfig(**base, **update)


def test_every_pix2pixhd_signal_is_a_metric_name_promtool_accepts():
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    from labtrain.train.logger import _metric_name
    from tests.test_metrics import promtool_check

    signals = ["loss_generator", "loss_generator_gan", "loss_feature_matching", "loss_discriminator", "loss_discriminator_real", "loss_discriminator_fake", "l1", "psnr"]
    cfg = GANConfig(data={"urls": "x/shard-000000.tar", "batch_size": 4}, eval={"urls": "y/shard-000000.tar"}, model={"arch": "pix2pixhd"},
                    images={"resolution": 16}, pix2pixhd=TINY.model_dump())
    phases = pix2pixhd.Phases(cfg, pix2pixhd.build(cfg, total_steps=4), backward=lambda loss, model: loss.backward(), unwrap=lambda m: m)
    label = F.one_hot(torch.randint(0, 4, (4, 16, 16)), 4).permute(0, 3, 1, 2).float()
    assert set(phases(label, torch.rand(4, 3, 16, 16) * 2 - 1)) | {"l1", "psnr"} == set(signals)
    registry = CollectorRegistry()
    for name in signals:
        Gauge(_metric_name("gan", name), f"gan job: {name} (session.log).", ["job"], registry=registry).labels("x").set(1.0)
    promtool_check(generate_latest(registry).decode())


def test_the_ablation_pairs_each_arm_with_full_on_the_same_seed_and_reuses_only_a_run_of_the_same_config(tmp_path):
    import json

    from jobs.gan.experiment import finished
    from jobs.gan.pix2pixhd_experiment import markdown, summarize

    rows = [{"arm": arm, "seed": seed, "l1": l1, "psnr": psnr, "baseline_l1": 0.04, "baseline_psnr": 25.0, "num_scored": 100}
            for arm, seed, l1, psnr in (("full", 0, 0.05, 22.0), ("full", 1, 0.04, 24.0), ("no_fm", 0, 0.06, 21.0), ("no_fm", 1, 0.05, 22.0))]
    summary = summarize(rows, {"l1": 0.01, "psnr": 38.0})
    assert summary["no_fm_minus_full"]["per_seed_psnr"] == [-1.0, -2.0]
    assert summary["no_fm_minus_full"]["psnr"][0] == pytest.approx(-1.5) and summary["no_fm_minus_full"]["l1"][0] == pytest.approx(0.01)
    assert summary["arms"]["full"]["psnr"][0] == pytest.approx(23.0) and "one_scale" not in summary["arms"]
    assert "| oracle (the renderer without noise) | - | - | - | 0.0100 | 38.00 |" in markdown(summary, rows)

    cfg = GANConfig(data={"urls": "x/shard-000000.tar"}, eval={"urls": "y/shard-000000.tar"}, out_dir=str(tmp_path), run={"name": "r"})
    assert finished(cfg) is None
    (tmp_path / "r-eval.json").write_text(json.dumps({"config": cfg.model_dump(mode="json"), "l1": 0.1}))
    assert finished(cfg)["l1"] == 0.1
    assert finished(cfg.model_copy(update={"seed": 1})) is None, "a report of another config is not reused"
