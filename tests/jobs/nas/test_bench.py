"""bench/nas.py: another table of the same shape, a few seeds; the last line is the JSON of figures."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO
from tests.jobs.nas.conftest import write_subset


def test_bench_searches_another_table_and_prints_json_last(tmp_path, nb201_table):
    table = write_subset(nb201_table, tmp_path / "subset.csv", 200, step=73)
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "nas.py"), "--seeds", "2", "--table", str(table), "--jobs", "2", "weaknas.predictor.hidden_sizes=[64,64]"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["table_size"] == 201 and figures["seeds"] == 2
    for method in ("weaknas", "random", "evolution"):
        assert 1 <= figures[f"{method}_median_queries"] <= figures[f"{method}_max_queries"] <= 201
        assert 1 <= figures[f"{method}_mean_queries"] <= 201
    assert figures["weaknas_mean_queries_queried_or_top1"] <= figures["weaknas_mean_queries"]
    assert figures["predictor"]["kind"] == "mlp" and figures["predictor"]["hidden_sizes"] == [64, 64]  # the override reached the search


def test_bench_refuses_a_bad_table(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("arch,test_accuracy\n|nor_conv_3x3~0|,1.0\n")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "nas.py"), "--quick", "--table", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "line 2:" in proc.stderr
