"""Search spaces: the NAS-Bench-201 string notation, one-hot features, neighbours, the x3d space."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.nas.config import X3dSpaceConfig
from jobs.nas.space import NB201_OPS, ArchError, Nb201Space, X3dSpace

BEST = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|"


def test_nb201_enumerates_15625_cells_whose_strings_round_trip():
    space = Nb201Space()
    cells = space.candidates(max_candidates=20_000, seed=0)
    assert cells.shape == (15_625, 6)
    strings = [space.format(tuple(c)) for c in cells]
    assert len(set(strings)) == 15_625
    assert all(space.parse(s) == tuple(c) for s, c in zip(strings, cells))
    assert space.format(space.parse(BEST)) == BEST
    # node 3 = skip(node 0) + conv3x3(node 1) + conv1x1(node 2): edges in string order
    assert [NB201_OPS[c] for c in space.parse(BEST)] == ["nor_conv_3x3", "nor_conv_3x3", "nor_conv_3x3", "skip_connect", "nor_conv_3x3", "nor_conv_1x1"]


@pytest.mark.parametrize("text", [
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|",  # two nodes only
    "|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|",  # wrong input index
    "|conv_5x5~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|",  # unknown op
    "nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|",
    "",
])
def test_nb201_rejects_malformed_strings_and_says_what_is_expected(text):
    with pytest.raises(ArchError, match="NAS-Bench-201|unknown operation"):
        Nb201Space().parse(text)


def test_one_hot_features_are_30_dimensional_with_one_op_per_edge():
    space = Nb201Space()
    features = space.encode(np.array([space.parse(BEST)]))
    assert features.shape == (1, 30)
    assert features.reshape(6, 5).sum(axis=1).tolist() == [1] * 6
    assert features.reshape(6, 5).argmax(axis=1).tolist() == list(space.parse(BEST))


def test_neighbours_differ_in_exactly_one_decision():
    space = Nb201Space()
    arch = space.parse(BEST)
    neighbours = space.neighbours(arch)
    assert len(neighbours) == 6 * 4 == len(set(neighbours))
    assert all(sum(a != b for a, b in zip(arch, n)) == 1 for n in neighbours)


def test_probe_architectures_use_every_choice_of_every_decision():
    space = X3dSpace(X3dSpaceConfig(num_stages=2, widths=[4, 8, 12, 16]))
    probes = np.array(space.probe_archs())
    for d, decision in enumerate(space.decisions):
        assert set(probes[:, d]) == set(range(len(decision.choices)))


def test_x3d_space_notation_round_trips_and_rejects_unknown_choices():
    space = X3dSpace(X3dSpaceConfig())
    assert space.size == (3 * 3 * 3 * 2) ** 3
    cells = space.candidates(max_candidates=1000, seed=0)  # larger than 1000: a seeded pool
    assert cells.shape == (1000, 12) and len({tuple(c) for c in cells}) == 1000
    assert np.array_equal(cells, space.candidates(max_candidates=1000, seed=0))
    for d, decision in enumerate(space.decisions):  # a uniform sample: every choice of every decision is in it
        counts = np.bincount(cells[:, d], minlength=len(decision.choices))
        assert counts.min() > 1000 / len(decision.choices) / 2, (decision.name, counts)
    text = space.format(tuple(cells[7]))
    assert space.parse(text) == tuple(cells[7])
    assert text.count("|") == 4 and text.startswith("|")
    with pytest.raises(ArchError, match="width '10' is not one of 8, 12, 16"):
        space.parse("|x3d,w10,e1,se|res,w8,e1,none|r21d,w8,e1,none|")
    with pytest.raises(ArchError, match="3 stages"):
        space.parse("|x3d,w8,e1,se|")
