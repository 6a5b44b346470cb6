"""An evaluator wrapper the cluster tests send to Ray workers (importable there through PYTHONPATH)."""

from __future__ import annotations

import json
import os
import signal
import time


class RecordingEvaluator:
    """Wraps an evaluator: appends a JSON line per start and per finished evaluation to ``log_path``
    (a file every local worker can reach), and SIGKILLs its own worker process on the first start if
    ``kill_marker`` is set and the marker file does not exist yet (it creates it first, so only once)."""

    def __init__(self, inner, log_path: str, kill_marker: str | None = None):
        self.inner = inner
        self.log_path = log_path
        self.kill_marker = kill_marker

    def _log(self, **entry) -> None:
        with open(self.log_path, "a") as stream:
            stream.write(json.dumps({**entry, "pid": os.getpid(), "time": time.time()}) + "\n")

    def evaluate(self, arch: str) -> float:
        self._log(event="start", arch=arch)
        if self.kill_marker and not os.path.exists(self.kill_marker):
            open(self.kill_marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)  # the trial's worker dies mid-trial
        score = self.inner.evaluate(arch)
        self._log(event="done", arch=arch)
        return score


def read_log(path: str) -> list[dict]:
    with open(path) as stream:
        return [json.loads(line) for line in stream if line.strip()]


class SlowAndFailingEvaluator:
    """Wraps an evaluator: architectures whose string hashes to 0 mod ``fail_every`` raise, except the
    ``slow_call``-th evaluation (counted with files in ``count_dir``, across worker processes), which sleeps
    ``slow_s`` and succeeds."""

    def __init__(self, inner, count_dir: str, *, fail_every: int, slow_call: int, slow_s: float):
        self.inner, self.count_dir = inner, count_dir
        self.fail_every, self.slow_call, self.slow_s = fail_every, slow_call, slow_s

    def evaluate(self, arch: str) -> float:
        import hashlib

        call = len(os.listdir(self.count_dir)) + 1
        open(os.path.join(self.count_dir, f"{call}-{os.getpid()}-{time.time_ns()}"), "w").close()
        if call == self.slow_call:  # the slow one never fails: which architecture comes 12th depends on timing
            time.sleep(self.slow_s)
        elif int(hashlib.sha256(arch.encode()).hexdigest(), 16) % self.fail_every == 0:
            raise ValueError(f"cannot evaluate {arch}")
        return self.inner.evaluate(arch)
