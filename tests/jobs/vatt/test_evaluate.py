"""The evaluation's scores on hand-made inputs."""

import numpy as np
import torch

from jobs.vatt.evaluate import add_scores, auroc, conflict_auroc, merge_scores, retrieval


def test_auroc_counts_ties_half():
    assert auroc(np.array([2.0, 1.0, 1.0]), np.array([1, 0, 1])) == 0.75
    assert np.isnan(auroc(np.array([1.0, 2.0]), np.array([0, 0])))


def test_conflict_auroc_averages_each_triplets_measurements_over_epochs():
    """One measurement per epoch is noisy; the mean over a triplet's epochs separates where each epoch alone does not."""
    rng = np.random.default_rng(0)
    ranks = [{}, {}]
    flags = rng.random(400) < 0.3
    keys = [f"k{i}" for i in range(400)]
    for epoch in range(8):
        cos = -0.5 * flags + rng.normal(0, 1.0, 400)
        order = rng.permutation(400)  # each epoch the triplets fall on other ranks
        for rank, part in enumerate(np.array_split(order, 2)):
            add_scores(ranks[rank], epoch, [keys[i] for i in part], cos[part].tolist(), flags[part].astype(int).tolist())
    scores = merge_scores(ranks)
    assert all(len(s) <= 400 for s in ranks)  # bounded by the triplets, not epochs x triplets
    report = conflict_auroc(scores, last_epoch=7)
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
