"""``run(train_fn, job_cfg, run_cfg)``: a training function on Ray Train's TorchTrainer.

The driver side: resources, failure handling and checkpoint storage from :class:`~labtrain.config.RunConfig`.
On each worker the function is called as ``train_fn(session, job_cfg)`` with a
:class:`~labtrain.train.session.Session`.

A start watchdog guards the driver: on a busy 2-core CI machine a Ray Train V2 (2.60) controller was seen to
log "Requesting resources" and then never create its placement group or workers, with the cluster idle and
no resource demand pending; the driver waited forever. When the workers have not started within
``run.start_timeout_s`` and no placement group is waiting for resources, the controller's Python stack is
logged (py-spy), the controller is killed and the run is started once more; a second stall fails the run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Callable, Sequence

import ray
from ray.experimental import internal_kv
from ray.train import CheckpointConfig, FailureConfig, Result, ScalingConfig
from ray.train import RunConfig as RayRunConfig
from ray.train.torch import TorchConfig, TorchTrainer

from labtrain.config import Config, RunConfig
from labtrain.storage import checkpoint_storage
from labtrain.train.session import Session
from labtrain.train.strategies import backend

TrainFn = Callable[[Session, Any], Any]
log = logging.getLogger("labtrain.train")

_KV_NAMESPACE = "labtrain_run_start"

# Passed on to every worker when set here: where DeepSpeed caches its compiled ops.
_PROPAGATED_ENV = ("TORCH_EXTENSIONS_DIR",)


def quiet_ray_train_reports() -> None:
    """Ray Train 2.60 logs every ``ray.train.report`` as a multi-line ``TrainingReport(...)`` dump at INFO, and
    every checkpoint once per rank; the session's progress lines and its one checkpoint line (rank 0) say what
    a person needs. The first logger is named by the file."""
    from ray.train.v2._internal.execution import context, storage, train_fn_utils

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger(train_fn_utils.__name__).setLevel(logging.WARNING)  # local mode's "Reported metrics: ..."
    logging.getLogger(storage.__name__).setLevel(logging.WARNING)  # "Checkpoint successfully created" from every rank


def _worker_main(payload: dict[str, Any]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    quiet_ray_train_reports()
    if payload.get("start_token"):  # tells the driver's start watchdog that the workers are up
        internal_kv._internal_kv_put(payload["start_token"], b"1", namespace=_KV_NAMESPACE)
    session = Session(payload["run"], kind=payload["kind"])
    try:
        payload["fn"](session, payload["job"])
        session.finished()  # not in finally: a rank failing because another was killed must leave the drill's marker
    finally:
        session.close()


def worker_env(cfg: RunConfig) -> dict[str, str]:
    env = {name: os.environ[name] for name in _PROPAGATED_ENV if name in os.environ}
    if cfg.gpus_per_worker == 0:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would look for CUDA otherwise
    return env


def make_trainer(train_fn: TrainFn, job_cfg: Config, run_cfg: RunConfig, *, kind: str, start_token: str | None = None, callbacks: Sequence[Any] = ()) -> TorchTrainer:
    storage_path, storage_filesystem = checkpoint_storage(run_cfg)
    resources = {"CPU": run_cfg.cpus_per_worker, **run_cfg.resources_per_worker}
    if run_cfg.gpus_per_worker:
        resources["GPU"] = run_cfg.gpus_per_worker
    return TorchTrainer(
        _worker_main,
        train_loop_config={"fn": train_fn, "job": job_cfg, "run": run_cfg, "kind": kind, "start_token": start_token},
        torch_config=TorchConfig(backend=backend(run_cfg)),
        scaling_config=ScalingConfig(
            num_workers=run_cfg.num_workers,
            use_gpu=run_cfg.gpus_per_worker > 0,
            resources_per_worker=resources,
        ),
        run_config=RayRunConfig(
            name=run_cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=run_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=run_cfg.num_to_keep),
            worker_runtime_env={"env_vars": worker_env(run_cfg)},
            callbacks=list(callbacks) or None,
        ),
    )


class RunStartError(RuntimeError):
    """The run's workers never started (see the start watchdog in this module's docstring)."""


class GangDoesNotFitError(RunStartError):
    """The run asks for workers that the cluster's nodes could not hold even when idle."""


def _worker_bundle(run_cfg: RunConfig) -> dict[str, float]:
    need = {"CPU": run_cfg.cpus_per_worker, **run_cfg.resources_per_worker}
    if run_cfg.gpus_per_worker:
        need["GPU"] = run_cfg.gpus_per_worker
    return need


def autoscaler_nodes() -> list[dict[str, float]] | None:
    """Under an autoscaler, every node it may start (LABTRAIN_AUTOSCALING: the Helm chart's JSON list of worker
    groups, each ``{"group", "resources", "max"}``), ``max`` times each; None without one. An older chart's
    "1" gives [] (node types unknown: the check is skipped)."""
    value = os.environ.get("LABTRAIN_AUTOSCALING", "")
    if not value:
        return None
    if value == "1":
        return []
    try:
        return [dict(t["resources"]) for t in json.loads(value) for _ in range(int(t["max"]))]
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"LABTRAIN_AUTOSCALING={value!r} is not the chart's list of node types ({error}): "
                         "set it to [{\"group\": ..., \"resources\": {\"CPU\": ...}, \"max\": N}, ...] or unset it") from None


def check_gang_fits(run_cfg: RunConfig) -> None:
    """Refuse, before anything starts, a run whose placement group would wait forever: a worker larger than
    every node, or more workers than the whole cluster holds when idle (Ray would only say "pending").
    Under an autoscaler the nodes are the ones it may start, each group at its maxReplicas."""
    scalable = autoscaler_nodes()
    if scalable is not None and not scalable:
        return
    nodes = scalable if scalable is not None else [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    where = "node the autoscaler can start" if scalable is not None else "node of the cluster"
    need = _worker_bundle(run_cfg)
    per_node = [min(int(res.get(k, 0) // v) for k, v in need.items() if v > 0) for res in nodes]
    shown = ", ".join(f"{k}={v:g}" for k, v in need.items())
    if not any(per_node):
        shapes = [", ".join(f"{k}={res.get(k, 0):g}" for k in need) for res in nodes]
        sizes = "; ".join(dict.fromkeys(shapes) if scalable is not None else shapes) or "no live node"  # a group's type once
        raise GangDoesNotFitError(
            f"run {run_cfg.name}: one worker needs {shown}, more than any {where} has ({sizes}). Lower run.cpus_per_worker, "
            "run.gpus_per_worker or run.resources_per_worker, or add a node that large"
        )
    if sum(per_node) < run_cfg.num_workers:
        which = f"{len(nodes)} nodes the autoscaler can start (every group at its maxReplicas)" if scalable is not None else f"cluster's {len(nodes)} nodes"
        raise GangDoesNotFitError(
            f"run {run_cfg.name}: {run_cfg.num_workers} workers of {shown} do not fit: the {which} hold at most "
            f"{sum(per_node)} such workers even when idle. Use run.num_workers <= {sum(per_node)}, smaller workers, or more nodes"
        )


def run(train_fn: TrainFn, job_cfg: Config, run_cfg: RunConfig, *, kind: str, callbacks: Sequence[Any] = ()) -> Result:
    """Run ``train_fn(session, job_cfg)`` on ``run_cfg.num_workers`` Ray Train workers until it returns.

    A run with the same ``name`` and ``storage_path`` as an earlier one continues from its latest
    checkpoint; a worker failure restarts all workers from it, up to ``max_failures`` times.
    ``callbacks`` are passed to Ray Train's RunConfig.
    """
    if run_cfg.num_workers == 0 or run_cfg.start_timeout_s is None:
        return make_trainer(train_fn, job_cfg, run_cfg, kind=kind, callbacks=callbacks).fit()
    if not ray.is_initialized():
        ray.init()
    check_gang_fits(run_cfg)
    for attempt in (1, 2):
        token = f"{run_cfg.name}-{uuid.uuid4().hex}"
        trainer = make_trainer(train_fn, job_cfg, run_cfg, kind=kind, start_token=token, callbacks=callbacks)
        try:
            return _fit_watched(trainer, token, run_cfg.start_timeout_s)
        except _Stalled as stall:
            log.error("run %s: attempt %d of 2: %s", run_cfg.name, attempt, stall)
    raise RunStartError(
        f"run {run_cfg.name}: the Ray Train workers did not start in two attempts of {run_cfg.start_timeout_s:g} s, with no "
        "placement group waiting for resources (the controllers' stacks are in the log above). Check `ray status`; "
        "raise run.start_timeout_s if the cluster is just slow to start workers."
    )


class _Stalled(Exception):
    pass


def _fit_watched(trainer: TorchTrainer, token: str, timeout_s: float) -> Result:
    """``trainer.fit()`` in a thread while this one watches for the workers' start signal."""
    job_id = ray.get_runtime_context().get_job_id()
    before = {a.actor_id for a in _controllers(job_id)}
    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = error

    thread = threading.Thread(target=fit, name="labtrain-fit", daemon=True)
    thread.start()
    deadline, started = time.monotonic() + timeout_s, False
    try:
        while thread.is_alive():
            thread.join(1.0)
            if started or not thread.is_alive():
                continue
            started = internal_kv._internal_kv_exists(token, namespace=_KV_NAMESPACE)
            if started or time.monotonic() < deadline:
                continue
            if _placement_groups_pending():  # waiting for resources (or an autoscaler): not a stall
                deadline = time.monotonic() + timeout_s
                continue
            stuck = [a for a in _controllers(job_id) if a.actor_id not in before]
            for actor in stuck:
                log.error("Ray Train controller %s (pid %s) has not started workers in %g s; its stack:\n%s", actor.actor_id, actor.pid, timeout_s, _stack(actor.pid))
                _kill(actor.pid)
            thread.join(60)
            raise _Stalled(f"no worker started in {timeout_s:g} s and no placement group was pending; killed controller(s) {[a.pid for a in stuck]}")
    finally:
        internal_kv._internal_kv_del(token, namespace=_KV_NAMESPACE)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _controllers(job_id: str) -> list[Any]:
    from ray.util.state import list_actors

    try:
        # Not only ALIVE ones: a controller stuck in its constructor (where after_controller_start runs) is
        # still PENDING_CREATION.
        actors = list_actors(filters=[("class_name", "=", "TrainController"), ("job_id", "=", job_id)], raise_on_missing_output=False)
        return [a for a in actors if a.state != "DEAD"]
    except Exception as error:  # noqa: BLE001 - the state API is best effort here
        log.warning("could not list the Ray Train controllers: %s", error)
        return []


def _placement_groups_pending() -> bool:
    return any(pg.get("state") in ("PENDING", "RESCHEDULING") for pg in ray.util.placement_group_table().values())


def _stack(pid: int | None) -> str:
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if pid is None or not os.path.exists(py_spy):
        return "(py-spy not available)"
    try:
        proc = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
        return proc.stdout or proc.stderr
    except (OSError, subprocess.SubprocessError) as error:
        return f"(py-spy failed: {error})"


def _kill(pid: int | None) -> None:
    """The controller runs on the driver's node, so on this machine."""
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
