"""FID_domain and KID without downloadable Inception weights (METHODS.md section 5).

The feature extractor is a small classifier trained here, with a fixed seed, on the first half of the
held-out real images and their labels (the shapes' modes, the digits' classes); its weights are saved with
their SHA-256, and every figure it produces is named ``FID_domain[<hash>]``, never "FID": it is not
comparable with published Inception FIDs. FID and KID themselves are torchmetrics' (any feature module),
against the second half of the held-out images as the reference. With ``eval.extractor=inception`` and a
local weights file, the same code computes torchmetrics' Inception FID/KID instead. The classifier also
gives mode coverage and the share of high-quality (confidently classified) samples.

Images go in as uint8 (B, 3, H, W), what a PNG of them holds.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class DomainClassifier(nn.Module):
    """uint8 (B, 3, H, W) -> 128-d features (``forward``, what FID/KID use) or class logits (``logits``)."""

    num_features = 128

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.GroupNorm(8, 128), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float() / 127.5 - 1)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward(images))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, steps: int, seed: int = 0, batch_size: int = 128) -> DomainClassifier:
    """A classifier of uint8 ``images`` (N, 3, H, W), trained with random translations by up to 2 pixels, on
    the CPU with one thread: the same weights (the same hash) in a shell, a Ray job or a worker, whatever
    thread count the process has (a multithreaded reduction sums in another order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_classifier(images, labels, steps=steps, seed=seed, batch_size=batch_size)
    finally:
        torch.set_num_threads(threads)


def _train_classifier(images: torch.Tensor, labels: torch.Tensor, *, steps: int, seed: int, batch_size: int) -> DomainClassifier:
    gen = torch.Generator().manual_seed(seed)
    torch_state = torch.get_rng_state()
    torch.manual_seed(seed)
    model = DomainClassifier(int(labels.max()) + 1)
    torch.set_rng_state(torch_state)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (min(batch_size, len(images)),), generator=gen)
        x = images[idx]
        dy, dx = torch.randint(-2, 3, (2,), generator=gen).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(model.logits(x), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


@dataclass
class Extractor:
    """The feature module FID/KID use, the classifier for coverage, and the name every figure carries."""

    features: nn.Module
    classifier: DomainClassifier
    name: str  # FID_domain[<sha256[:12]>] or FID_inception
    path: str
    sha256: str
    classifier_accuracy: float


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def domain_extractor(images: torch.Tensor, labels: torch.Tensor, path: str, *, steps: int) -> Extractor:
    """Load the classifier at ``path`` or train it on the first half of the held-out ``images`` (and write it
    there); its accuracy is measured on the second half."""
    half = len(images) // 2
    if os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        classifier = DomainClassifier(state["classifier.weight"].shape[0])
        classifier.load_state_dict(state)
        classifier.eval().requires_grad_(False)
    else:
        classifier = train_classifier(images[:half], labels[:half], steps=steps)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(classifier.state_dict(), tmp)
        os.replace(tmp, path)
    with torch.no_grad():
        accuracy = float((classifier.logits(images[half:]).argmax(1) == labels[half:]).float().mean())
    sha = _sha256(path)
    return Extractor(classifier, classifier, f"FID_domain[{sha[:12]}]", path, sha, accuracy)


def inception_extractor(weights: str, classifier: Extractor) -> Extractor:
    """torchmetrics' FID InceptionV3 from a local weights file (the user's own: nothing is downloaded)."""
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"eval.inception_weights={weights}: no such file (give the local path of pt_inception-2015-12-05 weights)")
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights)
    net.num_features = 2048
    return Extractor(net, classifier.classifier, "FID_inception", weights, _sha256(weights), classifier.classifier_accuracy)


class Scorer:
    """FID and KID of generated images against a fixed reference set, plus mode coverage and quality."""

    def __init__(self, extractor: Extractor, reference: torch.Tensor, *, floor: torch.Tensor | None = None, kid_subsets: int, kid_subset_size: int,
                 coverage_min_share: float, quality_threshold: float, batch_size: int = 250):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self.extractor = extractor
        self.batch_size = batch_size
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.coverage_min_share, self.quality_threshold = coverage_min_share, quality_threshold
        self.num_reference = len(reference)
        self.floor_images = floor  # real images at the generated N, scored as the noise floor
        # sync_on_compute=False: one process scores (rank 0 of a run); torchmetrics would otherwise gather the
        # states over the run's process group, and wait forever for ranks that are not scoring
        self.fid = FrechetInceptionDistance(feature=extractor.features, reset_real_features=False, sync_on_compute=False)
        self.kid = KernelInceptionDistance(feature=extractor.features, reset_real_features=False, subsets=kid_subsets,
                                           subset_size=min(kid_subset_size, len(reference)), sync_on_compute=False)
        for chunk in reference.split(batch_size):
            self.fid.update(chunk, real=True)
            self.kid.update(chunk, real=True)
        self.num_classes = extractor.classifier.classifier.out_features

    @torch.no_grad()
    def __call__(self, generated: torch.Tensor) -> dict[str, float]:
        """Scores of uint8 ``generated`` (N, 3, H, W): ``fid``, ``kid`` (mean) and ``kid_std``, ``mode_coverage``
        (share of the K modes with at least coverage_min_share/K of the samples), ``high_quality`` (share with a
        top class probability above quality_threshold), ``mode_histogram``. KID's subsets are drawn from a fixed
        seed, and the caller's random state is left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return self._score(generated)

    def _score(self, generated: torch.Tensor) -> dict[str, float]:
        self.fid.reset()
        self.kid.reset()
        self.kid.subset_size = min(self.kid_subset_size, self.num_reference, len(generated))
        probs = []
        for chunk in generated.split(self.batch_size):
            self.fid.update(chunk, real=False)
            self.kid.update(chunk, real=False)
            probs.append(self.extractor.classifier.logits(chunk).softmax(1))
        prob = torch.cat(probs)
        hist = torch.bincount(prob.argmax(1), minlength=self.num_classes).double() / len(generated)
        kid_mean, kid_std = self.kid.compute()
        return {
            "fid": float(self.fid.compute()),
            "kid": float(kid_mean),
            "kid_std": float(kid_std),
            "mode_coverage": float((hist >= self.coverage_min_share / self.num_classes).double().mean()),
            "high_quality": float((prob.max(1).values > self.quality_threshold).double().mean()),
            "mode_histogram": [round(float(h), 4) for h in hist],
        }


def as_tensor(images_NHWC: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images_NHWC)).permute(0, 3, 1, 2).contiguous()
