"""Networks of both spaces and the live evaluator, in this process (no Ray)."""

from __future__ import annotations

import pytest
import torch

from jobs.nas.config import Nb201SpaceConfig, X3dSpaceConfig
from jobs.nas.data import require_corpus
from jobs.nas.evaluate import TrainEvaluator
from jobs.nas.model import SpaceError, build_network, check_space
from jobs.nas.space import Nb201Space, X3dSpace
from tests.jobs.nas.conftest import live_config

CONV = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"
EMPTY = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"


def test_the_cell_network_follows_the_nas_bench_201_skeleton():
    space = Nb201Space()
    net = build_network(space, space.parse(CONV), Nb201SpaceConfig(), in_channels=3, num_classes=10)
    # 3 stages x 5 cells and 2 residual reductions: 16 -> 32 -> 64 channels, 32x32 -> 8x8
    assert sum(type(m).__name__ == "Cell" for m in net.modules()) == 15
    assert net.classifier.in_features == 64
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    empty = build_network(space, space.parse(EMPTY), Nb201SpaceConfig(channels=4, cells_per_stage=1), in_channels=3, num_classes=10)
    assert torch.equal(empty.features(torch.randn(2, 3, 8, 8)), torch.zeros(2, 16, 1, 1))  # a cell of 'none' cuts the graph


def test_every_video_block_and_attention_choice_builds_and_runs():
    space = X3dSpace(X3dSpaceConfig(num_stages=2))
    for arch in space.probe_archs():
        net = build_network(space, arch, space.cfg, in_channels=1, num_classes=4)
        assert net(torch.randn(2, 1, 4, 16, 16)).shape == (2, 4)
    check_space(space, space.cfg, channels=1, image_size=16, num_frames=4, num_classes=4)


def test_a_space_that_cannot_build_a_network_for_the_input_is_refused():
    with pytest.raises(SpaceError, match=r"nb201 space cannot build a network for input \(3, 2, 2\)"):
        check_space(Nb201Space(), Nb201SpaceConfig(channels=4, cells_per_stage=1), channels=3, image_size=2, num_frames=1, num_classes=4)


def test_live_training_scores_a_convolutional_cell_above_an_empty_one(tmp_path):
    cfg = live_config(tmp_path, space={"kind": "nb201", "channels": 4, "cells_per_stage": 1}, name="m", budget=1)
    evaluator = TrainEvaluator(cfg.space, require_corpus(cfg.evaluator, video=False))
    conv, empty = evaluator.evaluate(CONV), evaluator.evaluate(EMPTY)
    assert conv >= 0.5  # 4 classes
    assert empty <= conv - 0.2  # no path from the input to the classifier: one class for everything
    assert evaluator.evaluate(CONV) == conv  # the seed comes from the architecture: reruns agree


def test_live_training_of_a_video_network_returns_an_accuracy(tmp_path):
    cfg = live_config(tmp_path, space={"kind": "x3d", "num_stages": 2, "widths": [4, 8]}, name="v", budget=1, video=True)
    accuracy = TrainEvaluator(cfg.space, require_corpus(cfg.evaluator, video=True)).evaluate("|r21d,w8,e2,se|x3d,w8,e1,none|")
    assert 0.0 <= accuracy <= 1.0
