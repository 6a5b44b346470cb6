"""Configs: YAML + overrides -> frozen, validated models; every mistake named, nothing started."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from jobs.shapes.config import ShapesConfig
from labtrain.config import ConfigError, DataConfig, RunConfig, load_config, parse_overrides
from tests.conftest import REPO


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_file_and_overrides_merge_into_nested_fields(tmp_path):
    path = write(tmp_path, "data:\n  urls: a-{0..3}.tar\n  batch_size: 8\nrun:\n  num_workers: 2\n")
    cfg = load_config(ShapesConfig, path, ["data.batch_size=16", "run.strategy=deepspeed", "run.resources_per_worker={node1: 1}"])
    assert cfg.data.batch_size == 16
    assert cfg.data.urls == "a-{0..3}.tar"
    assert cfg.run.strategy == "deepspeed"
    assert cfg.run.resources_per_worker == {"node1": 1}


def test_configs_are_frozen():
    cfg = RunConfig()
    with pytest.raises(ValidationError):
        cfg.num_workers = 3


def test_bad_value_names_field_value_and_what_is_allowed(tmp_path):
    path = write(tmp_path, "data:\n  urls: x.tar\nrun:\n  strategy: horovod\n")
    with pytest.raises(ConfigError) as info:
        load_config(ShapesConfig, path)
    message = str(info.value)
    assert "run.strategy" in message and "'horovod'" in message
    assert "'ddp', 'deepspeed' or 'accelerate'" in message


def test_out_of_range_value(tmp_path):
    with pytest.raises(ConfigError, match=r"run.num_workers: value -2 is not allowed: .*greater than or equal to 0"):
        load_config(ShapesConfig, write(tmp_path, "data: {urls: x.tar}\n"), ["run.num_workers=-2"])


def test_missing_required_field(tmp_path):
    with pytest.raises(ConfigError, match=r"data.urls: required field is missing"):
        load_config(ShapesConfig, write(tmp_path, "data:\n  batch_size: 4\n"))


def test_unknown_key_is_rejected_not_ignored(tmp_path):
    with pytest.raises(ConfigError, match=r"data.batchsize: unknown key \(value 8\)"):
        load_config(ShapesConfig, write(tmp_path, "data:\n  urls: x.tar\n  batchsize: 8\n"))


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["data.batch_size"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DataConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DataConfig, write(tmp_path, "data: [unclosed\n"))


def test_an_override_that_is_not_yaml_is_a_string_and_the_field_decides():
    assert parse_overrides(["urls={000000..000009}.tar"]) == {"urls": "{000000..000009}.tar"}
    assert load_config(DataConfig, None, ["urls={000000..000009}.tar"]).urls == "{000000..000009}.tar"
    with pytest.raises(ConfigError, match=r"batch_size: value '\[1, 2' is not allowed"):
        load_config(DataConfig, None, ["urls=x.tar", "batch_size=[1, 2"])


def test_job_cli_refuses_bad_config_and_starts_nothing(tmp_path):
    """python -m jobs.shapes with a bad override: exit 2, one clear message, no data written, no Ray."""
    env = {"PATH": "/usr/bin:/bin", "LABTRAIN_STORAGE_ROOT": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.shapes", "--config", str(REPO / "jobs/shapes/configs/demo.yaml"), "run.num_workers=-1", "epochs=zero"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert "run.num_workers: value -1 is not allowed" in proc.stderr
    assert "epochs: value 'zero' is not allowed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == [], "a refused config must not write anything"


def test_job_cli_refuses_data_its_workers_could_not_use_before_ray_starts(tmp_path):
    """Shards written, but a batch larger than a worker's share: exit 2 from the driver, no Ray cluster started."""
    from labtrain.data import write_shards
    from tests.data.conftest import make_samples

    pattern = write_shards(make_samples(16), str(tmp_path / "shards"), max_samples=8, progress=False)
    env = {"PATH": "/usr/bin:/bin", "LABTRAIN_STORAGE_ROOT": str(tmp_path), "PYTHONPATH": str(REPO), "RAY_ADDRESS": "127.0.0.1:1"}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.shapes", "--config", str(REPO / "jobs/shapes/configs/demo.yaml"), f"data.urls={pattern}", "data.batch_size=16", "run.num_workers=2"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "each of the 2 ranks gets 8 samples per epoch, fewer than batch_size=16; lower data.batch_size" in proc.stderr
    assert "Traceback" not in proc.stderr
