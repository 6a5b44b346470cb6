"""The search on the 2-node local Ray cluster: live trials in parallel on both nodes, a killed trial
worker, a stop and a resume, the three methods through the Ray loop, and `ray job submit` with metrics."""

from __future__ import annotations

import collections
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from jobs.nas.config import NasConfig
from jobs.nas.metrics import NasMetrics
from jobs.nas.run import prepare, run_search
from labtrain.config import build_config
from tests.conftest import ray_job_submit
from tests.jobs.nas.conftest import live_config, write_subset
from tests.jobs.nas.helpers import RecordingEvaluator, read_log
from tests.test_metrics import promtool_check, scrape

pytestmark = pytest.mark.slow


def stop_after(state_path: Path, num_finished: int, stop: threading.Event) -> threading.Thread:
    """Set ``stop`` once the saved state shows ``num_finished`` finished trials (as SIGTERM would)."""

    def watch() -> None:
        while not stop.is_set():
            if state_path.exists():
                state = json.loads(state_path.read_text())
                trials = [t for m in state["methods"].values() for t in m["trials"]]
                if sum(t["status"] != "pending" for t in trials) >= num_finished:
                    stop.set()
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def max_overlap(entries: list[dict]) -> int:
    """Most evaluations running at one time, from the start/done lines of completed evaluations."""
    starts = {}
    events = []
    for e in entries:
        if e["event"] == "start":
            starts[(e["arch"], e["pid"])] = e["time"]
        elif (e["arch"], e["pid"]) in starts:
            events += [(starts[(e["arch"], e["pid"])], 1), (e["time"], -1)]
    running = best = 0
    for _, delta in sorted(events):
        running += delta
        best = max(best, running)
    return best


def sample(registry: CollectorRegistry, name: str, **labels) -> float | None:
    return registry.get_sample_value(name, {"kind": "nas", "method": "weaknas", **labels})


def test_live_search_spreads_over_both_nodes_survives_a_killed_worker_and_resumes_after_a_stop(ray_cluster, tmp_path):
    cfg = live_config(tmp_path, space={"kind": "nb201", "channels": 4, "cells_per_stage": 1}, name="live", budget=12,
                      weaknas={"num_initial": 4, "num_per_iteration": 4})
    log, marker = str(tmp_path / "evaluations.jsonl"), str(tmp_path / "killed")

    prep = prepare(cfg)
    prep.evaluator = RecordingEvaluator(prep.evaluator, log, kill_marker=marker)
    stop = threading.Event()
    stop_after(Path(prep.out_dir) / "state.json", 5, stop)
    complete, history = run_search(prep, stop=stop, metrics=NasMetrics(job="live", registry=CollectorRegistry()))
    assert not complete
    first = history["methods"]["weaknas"]
    assert 5 <= first["num_done"] < 12 and first["num_failed"] == 0

    prep = prepare(cfg)  # the same command again: continues from state.json
    assert [t["status"] for t in prep.state["methods"]["weaknas"]["trials"]].count("done") == first["num_done"]
    prep.evaluator = RecordingEvaluator(prep.evaluator, log, kill_marker=marker)
    metrics = NasMetrics(job="live", registry=CollectorRegistry())
    complete, history = run_search(prep, metrics=metrics)
    assert complete
    result = history["methods"]["weaknas"]
    assert (result["num_done"], result["num_failed"], result["num_pending"]) == (12, 0, 0)

    entries = read_log(log)
    done = [e["arch"] for e in entries if e["event"] == "done"]
    assert len(done) == len(set(done)) == 12, "an architecture was evaluated twice"
    assert set(done) == {t["arch"] for t in result["trials"]}
    killed = entries[0]["arch"]  # the first trial to start killed its own worker; Ray ran it again
    assert os.path.exists(marker) and collections.Counter(e["arch"] for e in entries if e["event"] == "start")[killed] >= 2
    assert killed in done
    assert len({t["node"] for t in result["trials"]}) == 2, "trials ran on both nodes"
    assert max_overlap(entries) >= 2, "trials ran in parallel"
    assert all(0 <= t["score"] <= 1 for t in result["trials"])
    assert [t["n"] for t in result["trials"]] == list(range(1, 13))

    assert sample(metrics.registry, "labtrain_nas_trials_total", job="live", status="done") == 12 - first["num_done"]
    assert sample(metrics.registry, "labtrain_nas_trials_total", job="live", status="failed") == 0
    assert sample(metrics.registry, "labtrain_nas_best_score", job="live") == result["best"]["score"]
    assert sample(metrics.registry, "labtrain_nas_trials_running", job="live") == 0
    out = Path(prep.out_dir)
    assert json.loads((out / "best.json").read_text())["best"]["arch"] == result["best"]["arch"]
    assert (out / "best_so_far.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_three_methods_search_a_table_through_ray_tasks(ray_cluster, tmp_path, nb201_table):
    table = write_subset(nb201_table, tmp_path / "t.csv", 400, step=39)
    scores = dict(line.rsplit(",", 1) for line in table.read_text().splitlines()[1:])
    cfg = build_config(NasConfig, {
        "name": "table", "output": str(tmp_path / "out"),
        "evaluator": {"kind": "table", "path": str(table)},
        "search": {"methods": ["weaknas", "random", "evolution"], "budget": 40, "weaknas": {"predictor": {"hidden_sizes": [100, 100]}}},
        "trials": {"max_concurrent": 10, "cpus_per_trial": 0.25},
    })
    metrics = NasMetrics(job="table", registry=CollectorRegistry())
    complete, history = run_search(prepare(cfg), metrics=metrics)
    assert complete
    for method, result in history["methods"].items():
        archs = [t["arch"] for t in result["trials"]]
        assert len(archs) == len(set(archs)) == 40
        assert all(t["score"] == float(scores[t["arch"]]) for t in result["trials"])
        assert result["best"]["score"] == max(float(scores[a]) for a in archs)
        assert metrics.registry.get_sample_value("labtrain_nas_trials_total", {"job": "table", "kind": "nas", "method": method, "status": "done"}) == 40
    weak = history["methods"]["weaknas"]["trials"]
    assert sum(t["predicted"] is not None for t in weak) == 30  # all but the 10 initial random ones


def test_ray_job_submit_runs_a_video_search_and_the_node_exporter_serves_its_metrics(ray_cluster):
    overrides = [
        "name=x3d-submit", "search.budget=4", "space.num_stages=2", "space.widths=[4, 8]", "space.expansions=[1, 2]",
        "evaluator.input.image_size=8", "evaluator.input.num_frames=3", "evaluator.input.num_train_samples=64",
        "evaluator.input.num_val_samples=32", "evaluator.input.samples_per_shard=32", "evaluator.epochs=1",
        "evaluator.train.urls=nas-submit/train/shard-{000000..000001}.tar", "evaluator.train.batch_size=16",
        "evaluator.val.urls=nas-submit/val/shard-{000000..000000}.tar", "evaluator.val.batch_size=16", "trials.max_concurrent=2",
        "evaluator.input.write_synthetic=true",
    ]
    proc = ray_job_submit(ray_cluster, ["python", "-m", "jobs.nas", "--config", "jobs/nas/configs/x3d_live.yaml", *overrides])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "weaknas: 4 done, 0 failed" in out
    storage = Path(os.environ["LABTRAIN_STORAGE_ROOT"])
    history = json.loads((storage / "nas/x3d-submit/history.json").read_text())
    assert history["space"] == "x3d" and history["methods"]["weaknas"]["num_done"] == 4
    assert (storage / "nas-submit/train/index.json").exists()

    text = scrape(ray_cluster.metrics_ports[0])  # the driver ran on the head node
    done = re.search(r'^labtrain_nas_trials_total\{[^}]*job="x3d-submit"[^}]*status="done"[^}]*\} (\S+)$', text, re.M)
    assert done and float(done.group(1)) == 4
    assert re.search(r'^labtrain_nas_best_score\{[^}]*job="x3d-submit"', text, re.M)
    promtool_check(text)


def test_failed_trials_are_recorded_and_a_slow_trial_does_not_hold_the_search(ray_cluster, tmp_path, nb201_table):
    """Trials that raise are recorded as failed (never proposed again) and the budget is still spent; one
    trial after the initial set takes 20 s, and WeakNAS refits and runs the rest meanwhile."""
    from jobs.nas.run import Prepared
    from tests.jobs.nas.helpers import SlowAndFailingEvaluator

    table = write_subset(nb201_table, tmp_path / "t.csv", 400, step=39)
    cfg = build_config(NasConfig, {
        "name": "flaky", "output": str(tmp_path / "out"),
        "evaluator": {"kind": "table", "path": str(table)},
        "search": {"methods": ["weaknas"], "budget": 30, "weaknas": {"predictor": {"hidden_sizes": [64, 64]}}},
        "trials": {"max_concurrent": 3, "cpus_per_trial": 0.25},
    })
    prep = prepare(cfg)
    (tmp_path / "calls").mkdir()
    flaky = SlowAndFailingEvaluator(prep.evaluator, str(tmp_path / "calls"), fail_every=6, slow_call=12, slow_s=20)
    prep = Prepared(**{**prep.__dict__, "evaluator": flaky})
    metrics = NasMetrics(job="flaky", registry=CollectorRegistry())
    complete, history = run_search(prep, metrics=metrics)
    assert complete
    trials = history["methods"]["weaknas"]["trials"]
    assert len(trials) == 30 and len({t["arch"] for t in trials}) == 30
    failed = [t for t in trials if t["status"] == "failed"]
    assert failed and all("ValueError: cannot evaluate" in t["error"] for t in failed)
    assert sample(metrics.registry, "labtrain_nas_trials_total", job="flaky", status="failed") == len(failed)
    slowest = max(trials, key=lambda t: t["seconds"] if t["status"] == "done" else 0)
    assert slowest["seconds"] >= 20
    assert slowest["n"] >= 25, "the search waited for the slow trial"  # it finished among the last, not in order
    assert -1 <= sample(metrics.registry, "labtrain_nas_predictor_rank_correlation", job="flaky") <= 1  # set: WeakNAS reported one


def test_a_trial_on_a_gpu_gets_a_fresh_worker_process():
    """Ray sets max_calls=1 only for a decorator's num_gpus, not for .options(num_gpus=...): GPU trials take the
    function declared with it, so no trial inherits the last one's CUDA memory; CPU trials keep reusing workers.
    (That the process is fresh on a GPU is Ray's behaviour for max_calls=1; no GPU here to show it.)"""
    from jobs.nas.config import TrialsConfig
    from jobs.nas.run import trial_function

    assert trial_function(TrialsConfig(gpus_per_trial=0.25))._default_options.get("max_calls") == 1
    assert trial_function(TrialsConfig(gpus_per_trial=1))._default_options.get("max_calls") == 1
    assert trial_function(TrialsConfig(gpus_per_trial=0)) is not trial_function(TrialsConfig(gpus_per_trial=1))
    assert trial_function(TrialsConfig(gpus_per_trial=0))._default_options.get("max_calls") is None
