"""The evaluation's scores on hand-made inputs."""

import numpy as np
import torch

from jobs.vatt.evaluate import auroc, conflict_auroc, retrieval


def test_auroc_counts_ties_half():
    assert auroc(np.array([2.0, 1.0, 1.0]), np.array([1, 0, 1])) == 0.75
    assert np.isnan(auroc(np.array([1.0, 2.0]), np.array([0, 0])))


def test_conflict_auroc_averages_each_triplets_measurements_over_epochs():
    """One measurement per epoch is noisy; the mean over a triplet's epochs separates where each epoch alone does not."""
    rng = np.random.default_rng(0)
    rows = []
    flags = rng.random(400) < 0.3
    for epoch in range(8):
        noise = rng.normal(0, 1.0, 400)
        for i in range(400):
            rows.append([epoch, f"k{i}", float(-0.4 * flags[i] + noise[i]), int(flags[i])])
    report = conflict_auroc(rows, last_epoch=7)
    assert report["conflict_auroc_samples"] == 400
    assert report["conflict_auroc_last_epoch"] < 0.7
    assert report["conflict_auroc"] > 0.8


def test_retrieval_recall_and_class_recall():
    video = torch.eye(4)
    text = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # text 1 finds clip 2
    labels = torch.tensor([0, 1, 1, 2])  # ... which has its class
    report = retrieval(text, video, labels)
    assert report["retrieval_r1"] == 0.75 and report["retrieval_r5"] == 1.0
    assert report["retrieval_class_r1"] == 1.0
