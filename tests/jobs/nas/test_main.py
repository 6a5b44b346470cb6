"""``python -m jobs.nas``: bad configs, tables and spaces are refused (status 2) before any trial runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from jobs.nas.__main__ import main
from jobs.nas.config import NasConfig
from jobs.nas.run import StateError, prepare
from labtrain.config import load_config
from tests.conftest import REPO
from tests.jobs.nas.conftest import write_subset

PRESETS = sorted((REPO / "jobs" / "nas" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_are_valid(preset):
    cfg = load_config(NasConfig, preset)
    assert cfg.search.budget >= 1


def refused(capsys, argv: list[str]) -> str:
    connected = ray.is_initialized()  # the session's cluster fixture may have connected this process
    assert main(argv) == 2
    assert ray.is_initialized() == connected, "nothing may start before the input is checked"
    return capsys.readouterr().err


def test_an_unknown_key_or_bad_value_is_refused_with_the_field(capsys, tmp_path):
    preset = str(REPO / "jobs/nas/configs/nb201_table.yaml")
    err = refused(capsys, ["--config", preset, "search.budget=0", f"output={tmp_path}"])
    assert "search.budget" in err and "greater than or equal to 1" in err
    err = refused(capsys, ["--config", preset, "search.methods=[weaknas, bayes]"])
    assert "search.methods.1" in err and "'bayes'" in err
    err = refused(capsys, ["--config", preset, "search.weaknas.predictor.kind=svm"])
    assert "kind must be one of: mlp, gbt, rf" in err
    assert not (tmp_path / "nb201-cifar10").exists()


def test_a_malformed_table_is_refused_with_its_line_number(capsys, tmp_path, nb201_table):
    table = write_subset(nb201_table, tmp_path / "t.csv", 20)
    lines = table.read_text().splitlines()
    lines[5] = lines[5].replace("~1|", "~7|", 1)
    table.write_text("\n".join(lines) + "\n")
    err = refused(capsys, ["--config", str(REPO / "jobs/nas/configs/nb201_table.yaml"), f"evaluator.path={table}", f"output={tmp_path}/out"])
    assert f"{table} line 6: " in err and "is not a NAS-Bench-201 cell" in err
    table.write_text("arch,acc\n" + "\n".join(lines[1:]) + "\n")
    err = refused(capsys, ["--config", str(REPO / "jobs/nas/configs/nb201_table.yaml"), f"evaluator.path={table}", f"output={tmp_path}/out"])
    assert "line 1: the header ['arch', 'acc'] has no 'test_accuracy' column" in err
    assert not (tmp_path / "out").exists()


def test_a_space_that_cannot_build_a_network_is_refused_before_any_trial(capsys, tmp_path):
    base = ["--config", str(REPO / "jobs/nas/configs/nb201_live.yaml"), f"output={tmp_path}/out", f"evaluator.train.urls={tmp_path}/d/train/shard-{{000000..000003}}.tar"]
    err = refused(capsys, [*base, "evaluator.input.image_size=2"])
    assert "the nb201 space cannot build a network for input (3, 2, 2)" in err
    err = refused(capsys, ["--config", str(REPO / "jobs/nas/configs/x3d_live.yaml"), "space.widths=[8, 0]"])
    assert "space.x3d.widths.1" in err
    err = refused(capsys, ["--config", str(REPO / "jobs/nas/configs/x3d_live.yaml"), "space.block_types=[res, res]"])
    assert "lists a choice twice" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "d").exists()  # no trial, no corpus


def test_a_saved_state_of_another_search_is_not_continued(tmp_path, nb201_table):
    table = write_subset(nb201_table, tmp_path / "t.csv", 50)
    overrides = [f"evaluator.path={table}", f"output={tmp_path}/out"]
    cfg = load_config(NasConfig, REPO / "jobs/nas/configs/nb201_table.yaml", overrides)
    prep = prepare(cfg)
    out = Path(prep.out_dir)
    out.mkdir(parents=True)
    (out / "state.json").write_text('{"fingerprint": {"space": {"kind": "x3d"}}, "methods": {}}')
    with pytest.raises(StateError, match="other .*space.* settings"):
        prepare(cfg)


def test_the_queues_gang_becomes_concurrent_trials_with_their_resources():
    from jobs.nas.__main__ import NAS_GANG
    from labtrain.launch import gang_overrides, job_arguments

    args = job_arguments("nas", None).parse_args(["--config", "x.yaml", "name=mine", "--workers", "3", "--cpus-per-worker", "0.5",
                                                  "--gpus-per-worker", "1", "--memory-gb-per-worker", "2", "--name", "lt-1"])
    cfg = load_config(NasConfig, REPO / "jobs/nas/configs/nb201_table.yaml", gang_overrides(args, NAS_GANG))
    trials = cfg.trials
    assert (trials.max_concurrent, trials.cpus_per_trial, trials.gpus_per_trial, trials.resources_per_trial) == (3, 0.5, 1.0, {"memory": 2 * 2**30})
    assert cfg.name == "mine"  # the user's name wins over the queue's default
    args = job_arguments("nas", None).parse_args(["--config", "x.yaml", "--name", "lt-1"])
    assert load_config(NasConfig, REPO / "jobs/nas/configs/nb201_table.yaml", gang_overrides(args, NAS_GANG)).name == "lt-1"
