"""A tiny checkpointing job for the queue tests: ``python -m tests.queue.sleepjob --config F key=value...``.

It takes ``steps`` steps of ``step_s`` seconds, saves its step to ``<run.storage_path>/<run.name>/progress.json``
after each one and continues from there when run again under the same run.name (as a real job resumes from
its checkpoint). Every start and finish is appended to ``<marker_dir>/<run.name>.log``, so a test can count runs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from pydantic import Field

from labtrain.config import Config, ConfigError, RunConfig, load_config
from labtrain.launch import gang_overrides, job_arguments, mark_done


class SleepConfig(Config):
    run: RunConfig = Field(default_factory=RunConfig)
    steps: int = Field(2, ge=0)
    step_s: float = Field(0.2, ge=0)
    marker_dir: str = Field(description="Where each run appends its start and finish lines.")
    fail: bool = Field(False, description="Exit 1 after the steps.")


def main() -> int:
    args = job_arguments("python -m tests.queue.sleepjob", __doc__).parse_args()
    try:
        cfg = load_config(SleepConfig, args.config, gang_overrides(args))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.check:
        return 0
    ckpt = Path(cfg.run.storage_path) / cfg.run.name / "progress.json"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    step = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    marker = Path(cfg.marker_dir) / f"{cfg.run.name}.log"

    def note(line: str) -> None:
        with open(marker, "a") as f:
            f.write(line + "\n")

    note(f"start step={step} workers={cfg.run.num_workers} cpus={cfg.run.cpus_per_worker:g} gpus={cfg.run.gpus_per_worker:g} pid={os.getpid()}")
    print(f"sleepjob {cfg.run.name} starting at step {step}", flush=True)
    while step < cfg.steps:
        time.sleep(cfg.step_s)
        step += 1
        tmp = ckpt.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step}))
        os.replace(tmp, ckpt)
        note(f"step {step}")
        print(f"sleepjob {cfg.run.name} step {step}", flush=True)
    note("done")
    print(f"sleepjob {cfg.run.name} done", flush=True)
    if cfg.fail:
        print("error: sleepjob failed as asked (fail=true)", file=sys.stderr)
        return 1
    mark_done(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
