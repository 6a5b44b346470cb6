"""The metric sanity suite (METHODS.md section 5): FID_domain and KID must rise with added noise, blur and
dropped modes, and be near zero for two samples of the same distribution, before any GAN is scored with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jobs.gan import data, fid

N = 500


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    images, labels = data.shapes(1000, 16, 10, seed=11)
    ext = fid.domain_extractor(fid.as_tensor(images), torch.from_numpy(labels), str(tmp_path_factory.mktemp("fid") / "fid_domain.pt"), steps=150)
    reference, _ = data.shapes(N, 16, 10, seed=12)
    scorer = fid.Scorer(ext, fid.as_tensor(reference), kid_subsets=50, kid_subset_size=N, coverage_min_share=0.2, quality_threshold=0.9)
    same, same_labels = data.shapes(N, 16, 10, seed=13)
    return ext, scorer, fid.as_tensor(same), torch.from_numpy(same_labels)


def noisy(images: torch.Tensor, std: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (images.float() + torch.randn(images.shape, generator=gen) * std).round().clamp(0, 255).byte()


def blurred(images: torch.Tensor, radius: int) -> torch.Tensor:
    if radius == 0:
        return images
    k = 2 * radius + 1
    return F.avg_pool2d(images.float(), k, stride=1, padding=radius, count_include_pad=False).round().byte()


def without_modes(images: torch.Tensor, labels: torch.Tensor, dropped: int) -> torch.Tensor:
    """The same number of images, from the 10 - ``dropped`` remaining modes."""
    kept = images[labels >= dropped]
    return kept[torch.arange(len(images)) % len(kept)]


def test_the_extractor_is_named_by_its_hash_and_classifies_the_modes(setup):
    ext, *_ = setup
    assert ext.name.startswith("FID_domain[") and ext.name[11:-1] == ext.sha256[:12]
    assert ext.classifier_accuracy > 0.9


def test_two_samples_of_the_same_distribution_score_near_zero(setup):
    _, scorer, same, labels = setup
    scores = scorer(same)
    other = scorer(without_modes(same, labels, 5))  # another distribution: half the modes
    assert scores["fid"] < 0.05 * other["fid"]
    assert abs(scores["kid"]) < 0.05 * other["kid"]
    assert scores["mode_coverage"] == 1.0 and scores["high_quality"] > 0.9


@pytest.mark.parametrize("what", ["noise", "blur", "dropped_modes"])
def test_fid_and_kid_rise_monotonically_with_the_damage(setup, what):
    _, scorer, same, labels = setup
    if what == "noise":
        variants = [noisy(same, s) for s in (0, 8, 16, 32)]
    elif what == "blur":
        variants = [blurred(same, r) for r in (0, 1, 2, 3)]
    else:
        variants = [without_modes(same, labels, d) for d in (0, 2, 5, 8)]
    scores = [scorer(v) for v in variants]
    fids, kids = [s["fid"] for s in scores], [s["kid"] for s in scores]
    assert all(a < b for a, b in zip(fids, fids[1:])), f"{what}: FID {fids}"
    assert all(a < b for a, b in zip(kids, kids[1:])), f"{what}: KID {kids}"
    if what == "dropped_modes":
        assert [s["mode_coverage"] for s in scores] == [1.0, 0.8, 0.5, 0.2]


def test_a_saved_extractor_is_loaded_not_retrained(setup, tmp_path):
    ext, *_ = setup
    images, labels = data.shapes(200, 16, 10, seed=14)
    again = fid.domain_extractor(fid.as_tensor(images), torch.from_numpy(labels), ext.path, steps=1)
    assert again.sha256 == ext.sha256  # one step of training would have given other weights


def test_the_extractor_has_the_same_weights_whatever_the_thread_count():
    """A shell has 2 threads, a Ray job 1: the extractor (and so its hash) must not depend on it."""
    images, labels = data.shapes(300, 16, 10, seed=15)
    x, y = fid.as_tensor(images), torch.from_numpy(labels)
    before = torch.get_num_threads()
    states = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            states.append(fid.train_classifier(x, y, steps=15).state_dict())
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_inception_weights_that_are_not_there_are_refused_with_the_path(setup, tmp_path):
    ext, *_ = setup
    missing = str(tmp_path / "pt_inception-2015-12-05.pth")
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05.pth"):
        fid.inception_extractor(missing, ext)


def test_images_go_in_as_uint8_and_the_noise_helper_changes_them():
    images, _ = data.shapes(4, 16, 10, seed=0)
    t = fid.as_tensor(images)
    assert t.dtype == torch.uint8 and t.shape == (4, 3, 16, 16)
    assert not torch.equal(noisy(t, 8), t) and np.array_equal(blurred(t, 0).numpy(), t.numpy())
