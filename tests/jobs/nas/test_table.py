"""Tabular oracles: the CIFAR-10 table reads whole; bad tables are refused with the line number."""

from __future__ import annotations

import pytest

from jobs.nas.space import Nb201Space
from jobs.nas.table import TableError, read_table
from tests.jobs.nas.conftest import write_subset

GOOD = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|"
OTHER = "|none~0|+|skip_connect~0|nor_conv_1x1~1|+|avg_pool_3x3~0|nor_conv_3x3~1|none~2|"


def test_the_cifar10_table_covers_the_space_and_its_best_cell_scores_94_37(nb201_table):
    table = read_table(str(nb201_table), Nb201Space())
    assert len(table.archs) == 15_625 == len({tuple(c) for c in table.choices_ND})
    assert table.best_score == pytest.approx(94.37, abs=0.01)
    assert table.lookup()[GOOD] == table.best_score


def write(tmp_path, text: str):
    path = tmp_path / "table.csv"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text, message",
    [
        (f"arch,test_accuracy\n{GOOD},94.0\n|nor_conv_3x3~0|+|bad|,80.0\n", r"line 3: '\|nor_conv_3x3~0\|\+\|bad\|' is not a NAS-Bench-201 cell"),
        (f"arch,test_accuracy\n{GOOD},94.0\n{OTHER.replace('none~2', 'conv_7x7~2')},80.0\n", r"line 3: .*unknown operation 'conv_7x7'"),
        (f"arch,accuracy\n{GOOD},94.0\n", r"line 1: the header \['arch', 'accuracy'\] has no 'test_accuracy' column"),
        (f"architecture,test_accuracy\n{GOOD},94.0\n", r"line 1: .* has no 'arch' column"),
        (f"arch,test_accuracy\n{GOOD},94.0\n{OTHER}\n", r"line 3: 1 fields, but the header has 2"),
        (f"arch,test_accuracy\n{GOOD},94.0\n\n{OTHER},n/a\n", r"line 4: score 'n/a' in column 'test_accuracy' is not a finite number"),
        (f"arch,test_accuracy\n{GOOD},94.0\n{OTHER},80\n{GOOD},93.0\n", r"line 4: .* is the same architecture as line 2"),
        ("", r"line 1: the table is empty"),
        ("arch,test_accuracy\n", r"has a header but no rows"),
    ],
    ids=["malformed-arch", "unknown-op", "missing-score-column", "missing-arch-column", "missing-field", "bad-score", "duplicate", "empty", "no-rows"],
)
def test_a_bad_table_is_refused_with_the_line_number(tmp_path, text, message):
    with pytest.raises(TableError, match=message):
        read_table(write(tmp_path, text), Nb201Space())


def test_a_table_of_the_same_shape_with_other_column_names_is_read(tmp_path, nb201_table):
    subset = write_subset(nb201_table, tmp_path / "subset.csv", 200, step=50)
    renamed = tmp_path / "renamed.csv"
    renamed.write_text("cell,valid_acc\n" + subset.read_text().split("\n", 1)[1])
    table = read_table(str(renamed), Nb201Space(), arch_column="cell", score_column="valid_acc")
    assert len(table.archs) == 201
    assert table.best_score == pytest.approx(94.37, abs=0.01)


def test_a_missing_table_says_which_path(tmp_path):
    with pytest.raises(TableError, match="does not exist"):
        read_table(str(tmp_path / "nope.csv"), Nb201Space())
