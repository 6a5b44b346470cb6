"""labtrain.sizing: a run's needs of one node, by hand-countable cases, and the --plan command line."""

from __future__ import annotations

import pytest

from labtrain.config import DataConfig, RunConfig
from labtrain.sizing import GiB, NodeShape, node_plan, parse_quantity, rank_bytes
from tests.conftest import REPO

MiB = 2**20


def test_quantities_and_node_shapes_parse_as_kubernetes_writes_them():
    assert parse_quantity("64Gi") == 64 * GiB and parse_quantity("50G") == 50e9 and parse_quantity("1.5e9") == 1.5e9
    node = NodeShape.parse("cpus=32, memory=240Gi, shm=64Gi, gpus=8, object_store=50000000000")
    assert (node.cpus, node.memory, node.shm, node.gpus, node.object_store) == (32, 240 * GiB, 64 * GiB, 8, 50e9)
    with pytest.raises(ValueError, match="has no shm"):
        NodeShape.parse("cpus=32,memory=240Gi")
    with pytest.raises(ValueError, match="'ram=1' is not one of"):
        NodeShape.parse("cpus=32,memory=240Gi,shm=1Gi,ram=1")
    with pytest.raises(ValueError, match="is not a quantity"):
        NodeShape.parse("cpus=32,memory=lots,shm=1Gi")


def test_one_ranks_bytes_count_buffers_and_batches():
    data = DataConfig(urls="x.tar", batch_size=4, num_workers=2, prefetch_batches=3, shuffle_buffer=100, shuffle_buffer_mb=10)
    got = rank_bytes(data, stored_bytes=1 * MiB, batch_bytes_per_sample=2 * MiB, pinned=True)
    assert got["shuffle"] == 2 * (10 * MiB + 1 * MiB)  # bounded by shuffle_buffer_mb, plus the sample that crosses it
    assert got["making"] == 2 * 2 * 8 * MiB  # two batches of 4 x 2 MiB per loader
    assert got["waiting"] == 2 * 3 * 8 * MiB  # num_workers x prefetch_batches batches
    assert got["pinned"] == got["waiting"] + 8 * MiB
    small = rank_bytes(data.model_copy(update={"shuffle_buffer": 3}), stored_bytes=1 * MiB, pinned=False)
    assert small["shuffle"] == 2 * 3 * MiB and small["pinned"] == 0  # the sample count binds first; no pinning on CPU


def test_a_node_plan_refuses_idle_gpus_and_an_overfull_shm_and_names_the_way_out():
    node = NodeShape(cpus=16, memory=200 * GiB, shm=8 * GiB, gpus=8, object_store=4 * GiB)
    data = DataConfig(urls="x.tar", batch_size=64, num_workers=3, prefetch_batches=2)
    fits = node_plan(data, RunConfig(num_workers=16, gpus_per_worker=1, cpus_per_worker=2), node, stored_bytes=1 * MiB)
    assert fits.ranks == 8
    assert fits.problems == [
        "each rank runs 3 dataloader workers beside its training process on run.cpus_per_worker=2 CPUs: use data.num_workers <= 1"
    ]
    assert fits.shm == 4 * GiB + 8 * 3 * 2 * 64 * MiB  # 7 GiB: fits 8
    run = RunConfig(num_workers=16, gpus_per_worker=1, cpus_per_worker=4)
    crowded = node_plan(data.model_copy(update={"num_workers": 8, "prefetch_batches": 3}), run, node, stored_bytes=1 * MiB)
    assert crowded.ranks == 4  # 16 CPUs hold 4 ranks of 4
    assert any("4 GPUs would sit idle. Use run.cpus_per_worker <= 2" in p for p in crowded.problems)
    assert any(p.startswith("each rank runs 8 dataloader workers") for p in crowded.problems)
    assert any(p.startswith("/dev/shm needs 10.0 GiB of 8.0: lower data.prefetch_batches") for p in crowded.problems)
    cpu_only = node_plan(data, run, NodeShape(cpus=16, memory=64 * GiB, shm=8 * GiB), stored_bytes=1 * MiB)
    assert cpu_only.ranks == 0 and "the node has no GPU" in cpu_only.problems[0]


def test_the_vatt_job_plans_a_node_from_the_command_line(capsys):
    from jobs.vatt.__main__ import main

    args = ["--config", str(REPO / "jobs/vatt/configs/base.yaml"), "--plan"]
    assert main([*args, "cpus=32,memory=240Gi,shm=64Gi,gpus=8,object_store=50G"]) == 0
    out = capsys.readouterr().out
    assert "8 ranks on the node" in out and out.rstrip().endswith("fits")
    assert main([*args, "cpus=32,memory=240Gi,shm=16Gi,gpus=8,object_store=50G"]) == 2
    assert "does not fit: /dev/shm needs" in capsys.readouterr().out
    assert main([*args, "cpus=32"]) == 2
    assert "has no memory, shm" in capsys.readouterr().err
