"""Typed configs: a YAML file plus ``key.sub=value`` overrides -> a validated, frozen model.

Every config model derives from :class:`Config` (frozen, unknown keys rejected). A job declares its own
model and calls :func:`load_config`; any mistake raises :class:`ConfigError`, whose message names the
field, the value given and what is allowed, before anything is started.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "RunConfig",
    "S3Config",
    "StoragePath",
    "StoragePaths",
    "load_config",
    "parse_overrides",
]

C = TypeVar("C", bound="Config")


@dataclass(frozen=True)
class PathField:
    """Marks a config field as a storage path: :func:`labtrain.storage.resolve_paths` puts a relative one
    under the storage root, at any depth of a config. ``separator`` splits a field holding several paths."""

    separator: str | None = None


StoragePath = Annotated[str, PathField()]
StoragePaths = Annotated[str, PathField(separator="::")]  # shard patterns joined by '::'


class ConfigError(ValueError):
    """A config that cannot be used; the message says which field is wrong and what is allowed."""


class Config(BaseModel):
    """Base of every labtrain config: frozen, and unknown keys are an error, not ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class S3Config(Config):
    """Where s3:// URLs point. Unset fields fall back to the standard AWS environment variables."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, Ceph, moto); None means AWS or AWS_ENDPOINT_URL.")
    region: str | None = Field(None, description="Region; None means AWS_DEFAULT_REGION.")
    access_key_id: str | None = Field(None, description="Access key; None means AWS_ACCESS_KEY_ID.")
    secret_access_key: str | None = Field(None, description="Secret key; None means AWS_SECRET_ACCESS_KEY.")
    max_attempts: int = Field(5, ge=1, description="Attempts per open or read before giving up on a transient error.")
    backoff_s: float = Field(0.2, gt=0, description="First retry delay; doubles each attempt.")


class DataConfig(Config):
    """A stream of webdataset shards, split evenly over ranks and dataloader workers."""

    urls: StoragePaths = Field(description="Shard pattern: a local path, brace pattern or s3://bucket/prefix/name-{000000..000099}.tar")
    index: StoragePath | None = Field(None, description="index.json beside the shards; None means <dir of urls>/index.json.")
    batch_size: int = Field(32, ge=1, description="Samples per batch on each rank.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank.")
    shuffle_buffer: int = Field(0, ge=0, description="Samples shuffled in a buffer inside each dataloader worker (0 = shard order only); the buffer holds them as read (encoded), before decoding.")
    shuffle_buffer_mb: float = Field(
        1024, gt=0, description="Upper bound on the shuffle buffer's bytes in each dataloader worker: with large samples (video) it holds fewer than shuffle_buffer.",
    )
    prefetch_batches: int = Field(
        2, ge=1,
        description="Finished batches each dataloader worker keeps waiting in shared memory (DataLoader's prefetch_factor): "
        "num_workers x prefetch_batches batches per rank, in /dev/shm. `python -m jobs.<kind> --plan` sums them per node.",
    )
    seed: int = Field(0, description="Seed of the per-epoch shard order and the shuffle buffer.")
    max_bad_shards: int = Field(0, ge=0, description="Unreadable shards tolerated on one rank over the run before the job fails.")
    s3: S3Config = Field(default_factory=S3Config, description="S3 endpoint and credentials for s3:// URLs.")


class RunConfig(Config):
    """How a training function runs on Ray Train."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$", description="Run name; checkpoints go to <storage_path>/<name>.")
    num_workers: int = Field(2, ge=0, description="Ray Train workers (one process each); 0 runs the function in this process (Ray Train local mode: no Ray cluster, checkpoints not kept).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker; 0 trains on CPU over gloo.")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="Extra Ray resources per worker, e.g. {'node_b': 1}.")
    strategy: Literal["ddp", "deepspeed", "accelerate"] = Field("ddp", description="Distributed strategy.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage (strategy=deepspeed only).")
    storage_path: StoragePath = Field("checkpoints", description="Checkpoint root: s3://bucket/prefix, an absolute path, or a path under the storage root (LABTRAIN_STORAGE_ROOT, default ./runs).")
    max_failures: int = Field(0, ge=-1, description="Restarts from the latest checkpoint after a worker failure (-1 = unlimited).")
    num_to_keep: int | None = Field(2, ge=1, description="Checkpoints kept; None keeps all.")
    start_timeout_s: float | None = Field(
        300, gt=0,
        description="Seconds for the workers to start while no placement group waits for resources; past that the Ray Train "
        "controller is taken as stuck: its stack is logged, it is restarted once, then the run fails. None waits forever.",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="'bf16': models run their forward under bf16 autocast (weights, gradients and optimizer state stay fp32); "
        "refused on a GPU without bf16. The same under every strategy.",
    )
    clip_grad_norm: float | None = Field(None, gt=0, description="Clip each model's gradient norm (over all ranks) to this before its optimizer step; None: no clipping.")
    accumulate_batches: int = Field(
        1, ge=1,
        description="Batches whose gradients are summed per optimizer step. optimizer.step(), zero_grad() and scheduler.step() act on every "
        "accumulate_batches-th batch only, and the batches in between are not all-reduced (DeepSpeed ZeRO-2/3 still reduce-scatter each one).",
    )
    log_every: int = Field(10, ge=1, description="Steps between progress lines (rank 0) and TensorBoard points.")
    kill_worker_at_step: int | None = Field(
        None, ge=1,
        description="Fault drill: the last rank SIGKILLs itself once when it logs this step (once per run name and storage path: a marker file "
        "in the system temp folder, removed when the run finishes), to show that a restart from the latest checkpoint continues the run. None "
        "(the default) in real runs.",
    )
    tensorboard: bool = Field(True, description="Write TensorBoard events (rank 0) to <storage_path>/<name>/tensorboard.")
    s3: S3Config = Field(default_factory=S3Config, description="S3 settings when storage_path is s3://.")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1, 2]"]`` into a nested dict; values are parsed as YAML scalars/lists (see _parse_value)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} was already set to a value, not a section")
            node = child
        node[leaf] = _parse_value(raw)
    return tree


def _parse_value(raw: str) -> Any:
    """A YAML scalar or list; text that is not valid YAML (a brace pattern such as ``{000..009}.tar``)
    is taken as the string it is, and the field's type decides whether that is allowed."""
    if not raw.strip():
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _explain(error: ValidationError, cls: type[Config]) -> str:
    lines = [f"invalid {cls.__name__} config ({error.error_count()} problem{'s' * (error.error_count() > 1)}):"]
    for err in error.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown key (value {err['input']!r}); check the spelling against the config's fields")
        elif err["type"] == "missing":
            lines.append(f"  {field}: required field is missing; set it in the file or with {field}=VALUE")
        else:
            lines.append(f"  {field}: value {err['input']!r} is not allowed: {err['msg']}")
    return "\n".join(lines)


def build_config(cls: type[C], data: dict[str, Any]) -> C:
    """Validate a plain dict into ``cls``, raising ConfigError with a readable message."""
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_explain(error, cls)) from None


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Read ``path`` (YAML), apply ``key.sub=value`` overrides, and validate into ``cls``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of a YAML file")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of fields, not {type(loaded).__name__}")
        data = loaded or {}
    return build_config(cls, _merge(data, parse_overrides(overrides or [])))
