"""Tabular oracles: a CSV of (architecture string, score), such as NAS-Bench-201's CIFAR-10 table.

Any table of the same shape can be searched: a header naming the architecture and score columns, one row
per architecture of the space. A malformed row is refused with its line number; nothing is guessed.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

import numpy as np

from jobs.nas.space import ArchError, Space
from labtrain.data.s3 import open_url


class TableError(ValueError):
    """A table that cannot be used; the message names the file, the line and what is expected."""


@dataclass(frozen=True)
class Table:
    path: str
    archs: list[str]  # as written in the table, in table order
    choices_ND: np.ndarray  # the same architectures as choice indices
    scores: np.ndarray  # (N,) float64

    def lookup(self) -> dict[str, float]:
        return dict(zip(self.archs, self.scores.tolist()))

    @property
    def best_score(self) -> float:
        return float(self.scores.max())


def _column(header: list[str], name: str, other: str, path: str) -> int:
    if name not in header:
        raise TableError(
            f"{path} line 1: the header {header} has no {name!r} column; the table needs an architecture column "
            f"and a score column (here {other!r} and {name!r}: set evaluator.arch_column / evaluator.score_column)"
        )
    return header.index(name)


def read_table(path: str, space: Space, *, arch_column: str = "arch", score_column: str = "test_accuracy") -> Table:
    """Read and check a whole table; raises TableError naming the first bad line."""
    try:
        with open_url(path, "rb") as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8", newline="").read()
    except FileNotFoundError:
        raise TableError(f"table {path!r} does not exist; set evaluator.path to a CSV of (arch, score)") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header:
        raise TableError(f"{path} line 1: the table is empty; expected a header with {arch_column!r} and {score_column!r}")
    header = [h.strip() for h in header]
    arch_at = _column(header, arch_column, score_column, path)
    score_at = _column(header, score_column, arch_column, path)
    archs: list[str] = []
    choices: list[tuple[int, ...]] = []
    scores: list[float] = []
    first_line: dict[tuple[int, ...], int] = {}
    for row in reader:
        line = reader.line_num
        if not row:
            continue
        if len(row) != len(header):
            raise TableError(f"{path} line {line}: {len(row)} fields, but the header has {len(header)} ({', '.join(header)})")
        try:
            arch = space.parse(row[arch_at])
        except ArchError as error:
            raise TableError(f"{path} line {line}: {error}") from None
        try:
            score = float(row[score_at])
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise TableError(f"{path} line {line}: score {row[score_at]!r} in column {score_column!r} is not a finite number")
        if arch in first_line:
            raise TableError(f"{path} line {line}: {row[arch_at]!r} is the same architecture as line {first_line[arch]}")
        first_line[arch] = line
        archs.append(row[arch_at].strip())
        choices.append(arch)
        scores.append(score)
    if not archs:
        raise TableError(f"{path}: the table has a header but no rows")
    return Table(path, archs, np.array(choices, dtype=np.int64), np.array(scores, dtype=np.float64))
