"""The search on Ray: every evaluation is one Ray task, up to ``trials.max_concurrent`` at once, and the
loop is asynchronous: each finished trial is observed (WeakNAS refits its predictor on everything back so
far) and the free slots are refilled at once, without waiting for the slowest trial.

Nothing is lost: a trial whose worker or node dies is rerun by Ray (``max_retries``) and recorded as
failed after that; a trial that raises is recorded as failed with its error. The state (every trial with
its score, the searcher's RNG and observations) is saved as JSON after every change, so a search stopped
at any point (SIGTERM, ``ray job stop``, a lost driver) continues with the same command: finished trials
are never evaluated again, and trials that were in flight are run again with the same architectures.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass

import numpy as np
import ray

from jobs.nas import report
from jobs.nas.config import NasConfig, TrialsConfig
from jobs.nas.data import require_corpus
from jobs.nas.evaluate import Evaluator, TableEvaluator, TrainEvaluator, run_trial
from jobs.nas.metrics import NasMetrics
from jobs.nas.model import check_space
from jobs.nas.search import Searcher, make_searcher
from jobs.nas.space import Space, build_space
from jobs.nas.table import read_table
from labtrain import storage

log = logging.getLogger("jobs.nas")

trial_task = ray.remote(run_trial)
# A trial on a GPU runs in a fresh worker process: Ray sets max_calls=1 only for a decorator's num_gpus (.options
# cannot), and a reused process would keep the last trial's cached GPU memory and its first device.
gpu_trial_task = ray.remote(max_calls=1)(run_trial)


def trial_function(t: TrialsConfig):
    return gpu_trial_task if t.gpus_per_trial > 0 else trial_task


class StateError(ValueError):
    """A saved search state that does not belong to this config."""


@dataclass
class Prepared:
    """Everything checked before the first trial: the space, the candidates, the evaluator, the state."""

    cfg: NasConfig
    out_dir: str
    space: Space
    candidates_ND: np.ndarray
    archs: list[str]  # candidate strings, as the evaluator knows them
    evaluator: Evaluator
    table_best: float | None
    state: dict


def prepare(cfg: NasConfig) -> Prepared:
    """Resolve paths, check the space (a dry build for live training) or read the table, write a missing
    synthetic corpus, load the saved state: every way the search could be refused, before any trial."""
    cfg = storage.resolve_paths(cfg)
    space = build_space(cfg.space)
    ev = cfg.evaluator
    if ev.kind == "table":
        table = read_table(ev.path, space, arch_column=ev.arch_column, score_column=ev.score_column)
        candidates, archs, evaluator, table_best = table.choices_ND, table.archs, TableEvaluator(table.lookup(), ev.seconds_per_query), table.best_score
    else:
        check_space(space, cfg.space, channels=ev.input.channels, image_size=ev.input.image_size, num_frames=ev.input.num_frames, num_classes=ev.input.num_classes)
        ev = require_corpus(ev, video=cfg.space.kind == "x3d")
        candidates = space.candidates(cfg.space.max_candidates, cfg.search.seed)
        archs = [space.format(tuple(a)) for a in candidates]
        evaluator, table_best = TrainEvaluator(cfg.space, ev, num_threads=max(1, int(cfg.trials.cpus_per_trial))), None
    cfg = cfg.model_copy(update={"evaluator": ev})
    out_dir = f"{cfg.output.rstrip('/')}/{cfg.name}"
    state = load_state(out_dir, fingerprint(cfg, archs))
    return Prepared(cfg, out_dir, space, candidates, archs, evaluator, table_best, state)


def fingerprint(cfg: NasConfig, archs: list[str]) -> dict:
    """What a saved state must match to be continued (the budget and trials settings may change)."""
    digest = hashlib.sha256("\n".join(archs).encode()).hexdigest()
    search = cfg.search.model_dump(exclude={"budget", "methods"})
    evaluator = cfg.evaluator.model_dump(exclude={"seconds_per_query"})  # pacing only: the same scores
    return {"space": cfg.space.model_dump(), "evaluator": evaluator, "search": search, "candidates_sha256": digest}


def load_state(out_dir: str, expected: dict) -> dict:
    saved = report.read_json(f"{out_dir}/state.json")
    if saved is None:
        return {"fingerprint": expected, "methods": {}}
    if saved["fingerprint"] != expected:
        changed = sorted(k for k in expected if saved["fingerprint"].get(k) != expected[k])
        raise StateError(
            f"{out_dir}/state.json holds a search with other {', '.join(changed)} settings; a search continues only with "
            "the same space, evaluator and search settings (budget and trials may change). Use another name= or remove it."
        )
    return saved


def _options(t: TrialsConfig) -> dict:
    options = {"num_cpus": t.cpus_per_trial, "num_gpus": t.gpus_per_trial, "max_retries": t.max_retries, "retry_exceptions": t.retry_exceptions}
    if t.resources_per_trial:
        options["resources"] = dict(t.resources_per_trial)
    if t.spread:
        options["scheduling_strategy"] = "SPREAD"
    return options


def _outcome(ref: ray.ObjectRef, timeout_s: float | None = None) -> tuple[dict | None, str | None]:
    """(result, None) or (None, error message) for a finished trial."""
    try:
        return ray.get(ref, timeout=timeout_s), None
    except ray.exceptions.RayTaskError as error:
        cause = error.cause if error.cause is not None else error
        return None, f"{type(cause).__name__}: {cause}"[:500]
    except ray.exceptions.RayError as error:  # worker or node lost past the retries, out of memory ...
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:500]


class MethodRun:
    """One method's search: its searcher, trial records and the in-flight Ray tasks."""

    def __init__(self, prep: Prepared, method: str, evaluator_ref: ray.ObjectRef, metrics: NasMetrics):
        cfg = prep.cfg
        self.prep, self.method, self.evaluator_ref, self.metrics = prep, method, evaluator_ref, metrics
        self.record = prep.state["methods"].setdefault(method, {"searcher": None, "trials": []})
        seed = int(np.random.default_rng([cfg.search.seed, ("weaknas", "random", "evolution").index(method)]).integers(2**31))
        features = prep.space.encode(prep.candidates_ND)
        self.searcher: Searcher = make_searcher(method, prep.candidates_ND, features, seed, weaknas=cfg.search.weaknas, evolution=cfg.search.evolution)
        if self.record["searcher"] is not None:
            self.searcher.load_state_dict(self.record["searcher"])
        self.in_flight: dict[ray.ObjectRef, dict] = {}
        self.task = trial_function(cfg.trials).options(**_options(cfg.trials))

    def finished(self) -> list[dict]:
        return [t for t in self.record["trials"] if t["status"] != "pending"]

    def best(self) -> float | None:
        scores = [t["score"] for t in self.record["trials"] if t["status"] == "done"]
        return max(scores) if scores else None

    def submit(self, trial: dict) -> None:
        self.in_flight[self.task.remote(self.evaluator_ref, trial["arch"])] = trial

    def save(self) -> None:
        self.record["searcher"] = self.searcher.state_dict()
        report.write_json(f"{self.prep.out_dir}/state.json", self.prep.state)

    def fill(self) -> None:
        """Propose as many new trials as there are free slots left in the concurrency and the budget."""
        budget, t = self.prep.cfg.search.budget, self.prep.cfg.trials
        free = min(t.max_concurrent - len(self.in_flight), budget - len(self.finished()) - len(self.in_flight))
        if free <= 0:
            return
        for p in self.searcher.propose(free):
            trial = {"index": p.index, "arch": self.prep.archs[p.index], "status": "pending", "predicted": p.predicted}
            self.record["trials"].append(trial)
            self.submit(trial)
        self.save()

    def observe(self, ref: ray.ObjectRef, result: dict | None, error: str | None) -> None:
        trial = self.in_flight.pop(ref)
        trial["n"] = len(self.finished()) + 1
        if result is not None:
            trial.update(status="done", **result)
        else:
            trial.update(status="failed", score=None, error=error)
            log.warning("%s trial %s failed: %s", self.method, trial["arch"], error)
        self.searcher.observe(trial["index"], trial["score"])
        self.metrics.finished(self.method, ok=result is not None, seconds=(result or {}).get("seconds"))

    def run(self, stop: threading.Event) -> bool:
        """Search until the budget is used (True) or ``stop`` is set (False)."""
        for trial in self.record["trials"]:
            if trial["status"] == "pending":  # in flight when the search last stopped: run it again
                self.submit(trial)
        self.metrics.start(self.method)
        log.info("%s: %d/%d trials finished, %d to run again", self.method, len(self.finished()), self.prep.cfg.search.budget, len(self.in_flight))
        while not stop.is_set():
            self.fill()
            if not self.in_flight:
                break  # budget used, or no candidate left
            ready, rest = ray.wait(list(self.in_flight), num_returns=1, timeout=0.5)
            if ready and rest:  # everything else that is ready too, so a burst of results refits the predictor once
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            for ref in ready:
                self.observe(ref, *_outcome(ref))
            if ready:
                self.save()
                self.progress(len(ready))
            self.metrics.update(self.method, running=len(self.in_flight), best=self.best(), rank_correlation=self.searcher.rank_correlation())
        if self.in_flight:
            self.cancel()
        return not stop.is_set() or len(self.finished()) >= self.prep.cfg.search.budget

    def progress(self, num_new: int) -> None:
        """A log line at every tenth of the budget and at every new best."""
        finished = self.finished()
        step = max(1, self.prep.cfg.search.budget // 10)
        best = max((t for t in finished if t["status"] == "done"), key=lambda t: t["score"], default=None)
        new_best = best is not None and best["n"] > len(finished) - num_new
        if new_best or len(finished) // step != (len(finished) - num_new) // step:
            failed = sum(t["status"] == "failed" for t in finished)
            log.info(
                "%s: %d/%d trials (%d failed, %d running), best %s %s", self.method, len(finished), self.prep.cfg.search.budget,
                failed, len(self.in_flight), best and best["score"], best and best["arch"],
            )

    def cancel(self) -> None:
        """Stop the trials in flight; keep the results of those that finished anyway, the rest stay pending."""
        for ref in self.in_flight:
            ray.cancel(ref)
        for ref in list(self.in_flight):
            result, _ = _outcome(ref, timeout_s=60)
            if result is not None:
                self.observe(ref, result, None)
        self.in_flight.clear()
        self.metrics.update(self.method, running=0, best=self.best(), rank_correlation=None)
        self.save()


def run_search(prep: Prepared, *, stop: threading.Event | None = None, metrics: NasMetrics | None = None) -> tuple[bool, dict]:
    """Run every configured method to its budget; write the history, best architecture and plot.
    Returns (complete, history); complete is False when ``stop`` ended it early (run again to continue)."""
    stop = stop or threading.Event()
    metrics = metrics or NasMetrics(job=prep.cfg.name)
    if not ray.is_initialized():
        ray.init()
    evaluator_ref = ray.put(prep.evaluator)
    complete = True
    for method in prep.cfg.search.methods:
        if not MethodRun(prep, method, evaluator_ref, metrics).run(stop):
            complete = False
            break
    return complete, report.write_outputs(prep.out_dir, prep.cfg, prep.state, table_best=prep.table_best)

