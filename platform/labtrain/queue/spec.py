"""What the queue accepts: a job spec (validated on submit), users and quotas, and the service settings."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator

from labtrain.config import Config, ConfigError, build_config

# Priority classes, highest first; the number is what the scheduler sorts by.
PRIORITIES: dict[str, int] = {"low": 0, "normal": 1, "high": 2}
DEFAULT_JOB_PATTERN = r"^jobs\.[a-z_][a-z0-9_]*$"


class Quota(Config):
    """Limits on what one user or group holds at once; None means no limit."""

    # Bounded so every value fits the store's columns (SQLite and PostgreSQL integers are 64-bit).
    gpus: float | None = Field(None, ge=0, le=1e9, description="GPUs held by running jobs at once.")
    cpus: float | None = Field(None, ge=0, le=1e9, description="CPUs held by running jobs at once.")
    jobs: int | None = Field(None, ge=0, le=1_000_000, description="Jobs running at once.")


class Resources(Config):
    """The gang a job needs: every worker at once, or nothing."""

    workers: int = Field(1, ge=1, le=4096, description="Ray Train workers (run.num_workers).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per worker (run.cpus_per_worker).")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker (run.gpus_per_worker).")
    memory_gb_per_worker: float | None = Field(None, gt=0, description="Memory reserved per worker, GiB (Ray's memory resource); None reserves none.")

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker


class JobSpec(Config):
    """One submission: ``python -m <job> --config <config> <overrides...>`` with an admitted gang."""

    job: str = Field(description="Job module, e.g. jobs.shapes.")
    config: str = Field(min_length=1, description="Config file, a path as the job sees it (relative to the job's working directory).")
    overrides: list[str] = Field(default_factory=list, description="key.sub=value overrides passed after the config.")
    resources: Resources = Field(default_factory=Resources, description="Workers, CPUs and GPUs per worker, memory.")
    priority: str = Field("normal", description=f"Priority class, one of {list(PRIORITIES)}.")
    time_limit_s: float | None = Field(None, gt=0, description="Wall-clock limit; the job is stopped past it. None takes the service default.")
    request_id: str | None = Field(None, max_length=64, description="Client-chosen key: submitting the same key twice returns the first job (safe retries).")

    @field_validator("priority")
    @classmethod
    def _known_priority(cls, value: str) -> str:
        if value not in PRIORITIES:
            raise ValueError(f"unknown priority class {value!r}; use one of {list(PRIORITIES)}")
        return value

    @field_validator("overrides")
    @classmethod
    def _key_value(cls, items: list[str]) -> list[str]:
        for item in items:
            key, sep, _ = item.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
                raise ValueError(f"override {item!r} is not of the form key.sub=value")
            if key in ("run.num_workers", "run.cpus_per_worker", "run.gpus_per_worker"):
                raise ValueError(f"override {item!r}: the queue sets {key} from resources; ask for it there")
        return items


class UserEntry(Config):
    """One user of the users file (LABTRAIN_QUEUE_USERS_FILE)."""

    name: str = Field(pattern=r"^[a-z_][a-z0-9_.-]{0,63}$", description="Login name.")
    group: str = Field("default", pattern=r"^[a-z_][a-z0-9_.-]{0,63}$", description="Group (lab team) for group quotas.")
    share: float = Field(1.0, gt=0, le=1e6, description="Fair-share weight.")
    quotas: Quota = Field(default_factory=Quota, description="Per-user limits.")
    token: str | None = Field(None, min_length=16, description="Bearer token; stored hashed. None: keep the stored one.")
    admin: bool = Field(False, description="Sees and changes every job, manages users.")


class GroupEntry(Config):
    name: str = Field(pattern=r"^[a-z_][a-z0-9_.-]{0,63}$", description="Group name.")
    quotas: Quota = Field(default_factory=Quota, description="Limits on the whole group.")


class UsersFile(Config):
    users: list[UserEntry] = Field(default_factory=list, description="Users.")
    groups: list[GroupEntry] = Field(default_factory=list, description="Group quotas.")


def load_users_file(path: str | Path) -> UsersFile:
    """A YAML list of users, or a mapping with ``users:`` and ``groups:``."""
    try:
        data: Any = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"users file {str(path)!r} cannot be read: {error}") from None
    if isinstance(data, list):
        data = {"users": data}
    return build_config(UsersFile, data or {})


class Settings(Config):
    """The service's settings; each has an env variable and a ``serve`` flag."""

    db: str = Field("labtrain-queue.db", description="SQLite path or postgresql:// URL (LABTRAIN_QUEUE_DB).")
    ray_address: str | None = Field(None, description="Ray dashboard/job API, http://host:8265 (LABTRAIN_QUEUE_RAY_ADDRESS); None runs no dispatcher.")
    admin_token: str | None = Field(None, min_length=16, description="Token of the built-in admin (LABTRAIN_QUEUE_ADMIN_TOKEN).")
    users_file: str | None = Field(None, description="YAML users file loaded at start (LABTRAIN_QUEUE_USERS_FILE).")
    half_life_s: float = Field(7 * 86400, gt=0, description="Half-life of past usage in the fair-share factor.")
    gpu_weight: float = Field(8.0, ge=0, description="A GPU-second counts as this many CPU-seconds of usage.")
    default_time_limit_s: float = Field(7 * 86400, gt=0, description="Time limit of jobs submitted without one.")
    cycle_s: float = Field(0.5, gt=0, description="Seconds between scheduling cycles.")
    job_pattern: str = Field(DEFAULT_JOB_PATTERN, description="Job modules that may be submitted (regex).")
    job_cwd: str | None = Field(None, description="Directory the job entrypoints run in (the checkout on the cluster); None: Ray's default.")
    capacity: dict[str, float] | None = Field(None, description="Fixed capacity {CPU, GPU, memory}; None reads it from the Ray cluster.")
    preemption: bool = Field(True, description="Let waiting higher-priority jobs stop lower-priority running ones.")
    done_dir: str | None = Field(
        None,
        description="Where a job's run records that it completed (--done-file): a directory or s3://bucket/prefix that both this service and "
        "the jobs' drivers reach (s3 through the AWS environment). A job that Ray no longer knows (a cluster restart) and that left its record "
        "is not run again. None: <directory of the SQLite db>/done, or no records for PostgreSQL; off: no records (LABTRAIN_QUEUE_DONE_DIR).",
    )

    def resolved_done_dir(self) -> str | None:
        if self.done_dir == "off":
            return None
        if self.done_dir:
            return self.done_dir.rstrip("/") if "://" in self.done_dir else os.path.abspath(self.done_dir)
        return None if "://" in self.db else os.path.join(os.path.dirname(os.path.abspath(self.db)), "done")
