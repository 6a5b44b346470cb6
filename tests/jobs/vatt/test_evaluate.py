"""The evaluation's scores on hand-made inputs."""

import numpy as np
import pytest
import torch

from jobs.vatt.evaluate import add_scores, auroc, average_precision, conflict_auroc, drop_counts, drop_precision, epoch_auroc, group_retrieval, merge_scores


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
        loss = 1.0 * flags + rng.normal(0, 1.0, 400)
        order = rng.permutation(400)  # each epoch the triplets fall on other ranks
        for rank, part in enumerate(np.array_split(order, 2)):
            add_scores(ranks[rank], epoch, [keys[i] for i in part], flags[part].astype(int).tolist(), loss[part].tolist(), cos[part].tolist())
        per_epoch = epoch_auroc(merge_scores(ranks), epoch)
        assert per_epoch["conflict_auroc"] < 0.75 and 0.6 < per_epoch["loss_auroc"] < 0.85  # one measurement each
    scores = merge_scores(ranks)
    assert all(len(s) <= 400 for s in ranks)  # bounded by the triplets, not epochs x triplets
    report = conflict_auroc(scores, last_epoch=7)
    assert report["conflict_auroc_samples"] == 400
    assert report["conflict_auroc_last_epoch"] < 0.7
    assert report["conflict_auroc"] > 0.8
    assert report["loss_auroc"] > report["conflict_auroc"]  # the loss was planted with the larger shift
    assert per_epoch["conflict_auroc_mean"] > 0.8  # the running mean at the last epoch


def test_group_retrieval_counts_any_clip_of_the_texts_group():
    video = torch.eye(4)
    text = torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 1, 0], [0, 0.5, 1, 0], [0, 0, 0, 1]])  # text 1 finds clip 2, then clip 1
    labels, groups = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 3])
    report = group_retrieval(text, video, labels, groups, "t2v")
    assert report["t2v_group_r1"] == 0.75  # clip 2 is of another group...
    assert report["t2v_class_r1"] == 1.0  # ... but of text 1's class
    same = group_retrieval(text, video, labels, torch.tensor([0, 1, 1, 3]), "t2v")
    assert same["t2v_group_r1"] == 1.0 and same["t2v_group_map"] == 1.0  # clips 1 and 2 share a group: both right, ranked first
    assert same["t2v_group_r1_chance"] == (0.25 + 0.5 + 0.5 + 0.25) / 4


def test_average_precision():
    sims = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    relevant = torch.tensor([[True, False, True, False]])
    assert float(average_precision(sims, relevant)[0]) == pytest.approx((1 / 1 + 2 / 3) / 2)


def test_drop_precision_against_the_base_rate_sums_the_ranks():
    counts = drop_counts(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 1.0, 1.0]), torch.tensor([0, 1, 0, 0]), torch.tensor([1, 0, 0, 0]))
    assert counts.tolist() == [2.0, 2.0, 8.0, 2.0]  # both dropped pairs were the swapped ones
    other = [2.0, 0.0, 8.0, 2.0]
    report = drop_precision([counts.tolist(), other])
    assert report == {"drop_precision": 0.5, "drop_base_rate": 0.25, "dropped_share": 0.25}
