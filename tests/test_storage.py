"""Storage paths: resolution at any depth of a config, and no silent synthetic data for a mistyped path."""

from __future__ import annotations

import pytest

from jobs.nas.config import NasConfig
from jobs.vatt.config import VattConfig
from labtrain import storage
from labtrain.config import load_config
from tests.conftest import REPO


def test_relative_paths_are_resolved_at_any_depth_and_others_kept(monkeypatch):
    monkeypatch.setenv(storage.STORAGE_ROOT_ENV, "s3://lab/root")
    cfg = storage.resolve_paths(load_config(VattConfig, REPO / "jobs/vatt/configs/tiny.yaml", ["data.urls=/abs/a.tar::rel/b.tar", "data.index=idx.json"]))
    assert cfg.data.urls == "/abs/a.tar::s3://lab/root/rel/b.tar" and cfg.data.index == "s3://lab/root/idx.json"
    assert cfg.eval.urls == "s3://lab/root/vatt/data/eval/shard-{000000..000001}.tar"  # nested in a job's own section
    assert cfg.out_dir == "s3://lab/root/vatt/out" and cfg.run.storage_path == "s3://lab/root/vatt/checkpoints"
    assert cfg.model == load_config(VattConfig, REPO / "jobs/vatt/configs/tiny.yaml").model  # no other field touched
    nas = storage.resolve_paths(load_config(NasConfig, REPO / "jobs/nas/configs/nb201_live.yaml"))
    assert nas.evaluator.train.urls.startswith("s3://lab/root/nas/data/") and nas.output == "s3://lab/root/nas"


@pytest.mark.parametrize("job, config, switch", [
    ("shapes", "jobs/shapes/configs/demo.yaml", "synthetic.write=true"),
    ("vatt", "jobs/vatt/configs/tiny.yaml", "synthetic.write=true"),
    ("nas", "jobs/nas/configs/nb201_live.yaml", "evaluator.input.write_synthetic=true"),
])
def test_a_mistyped_data_path_stops_the_job_naming_the_path_and_how_to_write_the_corpus(job, config, switch, tmp_path, monkeypatch, capsys):
    import importlib

    monkeypatch.setenv(storage.STORAGE_ROOT_ENV, str(tmp_path))
    main = importlib.import_module(f"jobs.{job}.__main__").main
    field = "evaluator.train.urls" if job == "nas" else "data.urls"
    assert main(["--config", str(REPO / config), f"{field}=typo/shard-{{000000..000001}}.tar"]) == 2
    err = capsys.readouterr().err
    assert f"{field}: no shards at {tmp_path}/typo/shard-{{000000..000001}}.tar" in err and switch in err
    assert not (tmp_path / "typo").exists(), "nothing was written"
