"""What a run needs of each node, computed from its settings: CPUs, host memory and /dev/shm.

A training rank is one process with its dataloader workers. The bytes come from the data settings and the
size of one sample:

- each dataloader worker's shuffle buffer holds samples as read, up to ``data.shuffle_buffer`` of them and at
  most ``data.shuffle_buffer_mb`` (plus the sample that crosses the bound);
- each worker assembles one batch at a time (the samples and their collated copy: two batches);
- finished batches wait in shared memory: ``data.prefetch_batches`` per worker;
- on a GPU each of those is copied into page-locked host memory before its non-blocking copy to the device
  (counted again: an upper bound, since a pinned batch frees its shared one);
- Ray's object store lives in /dev/shm, and a memory-backed /dev/shm (a Kubernetes emptyDir) counts against
  the pod's memory limit.

Processes themselves (torch, CUDA context, NCCL buffers) and Ray's daemons are estimates, shown as such:
``process_gib`` per rank, ``loader_process_gib`` per dataloader worker, ``ray_daemons_gib`` per node.

``python -m jobs.<kind> --config FILE --plan cpus=32,memory=240Gi,shm=64Gi,gpus=8,object_store=50G`` prints
the plan for one node of that shape and exits 2 when the run does not fit it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from labtrain.config import DataConfig, RunConfig

GiB = 2**30
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def parse_quantity(text: str) -> float:
    """A Kubernetes-style quantity: ``240Gi``, ``50G``, ``50000000000``, ``1.5e9``."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMGT]i?)?\s*", str(text))
    if not match:
        raise ValueError(f"{text!r} is not a quantity: write bytes as 64Gi, 50G or 50000000000")
    return float(match.group(1)) * _UNITS[match.group(2) or ""]


@dataclass(frozen=True)
class NodeShape:
    """One node (a worker pod): what Ray and the pod give a run."""

    cpus: float
    memory: float  # bytes: the pod's memory limit
    shm: float  # bytes: /dev/shm
    gpus: float = 0
    object_store: float = 0  # bytes of Ray's object store (in /dev/shm)

    @classmethod
    def parse(cls, text: str) -> "NodeShape":
        """``cpus=32,memory=240Gi,shm=64Gi,gpus=8,object_store=50G`` (cpus, memory and shm are required)."""
        fields: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in ("cpus", "memory", "shm", "gpus", "object_store"):
                raise ValueError(f"node shape {text!r}: {part!r} is not one of cpus=, memory=, shm=, gpus=, object_store=")
            fields[key] = float(value) if key in ("cpus", "gpus") else parse_quantity(value)
        missing = [k for k in ("cpus", "memory", "shm") if k not in fields]
        if missing:
            raise ValueError(f"node shape {text!r} has no {', '.join(missing)}: write e.g. cpus=32,memory=240Gi,shm=64Gi,gpus=8")
        return cls(**fields)


@dataclass
class NodePlan:
    ranks: int
    rows: list[tuple[str, float]] = field(default_factory=list)  # (what, bytes) of host memory, shm included
    shm_rows: list[tuple[str, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def memory(self) -> float:
        return sum(b for _, b in self.rows)

    @property
    def shm(self) -> float:
        return sum(b for _, b in self.shm_rows)

    def lines(self, node: NodeShape) -> list[str]:
        out = [f"{self.ranks} ranks on the node"]
        out += [f"  {what:<58} {b / GiB:8.1f} GiB" for what, b in self.rows]
        out.append(f"  {'memory (the pod limit counts a memory-backed /dev/shm)':<58} {self.memory / GiB:8.1f} of {node.memory / GiB:.1f} GiB")
        out.append(f"  {'/dev/shm: the object store and the waiting batches':<58} {self.shm / GiB:8.1f} of {node.shm / GiB:.1f} GiB")
        out += [f"does not fit: {p}" for p in self.problems] or ["fits"]
        return out


def rank_bytes(data: DataConfig, *, stored_bytes: float, batch_bytes_per_sample: float | None = None, pinned: bool) -> dict[str, float]:
    """One rank's bytes by kind: its loader workers' shuffle buffers and batches in the making, the batches
    waiting in shared memory, and their pinned copies."""
    per_sample = batch_bytes_per_sample or stored_bytes
    batch = data.batch_size * per_sample
    loaders = max(data.num_workers, 1)  # 0 workers: the rank's own process reads
    if data.shuffle_buffer > 1:
        buffer = min(data.shuffle_buffer * stored_bytes, data.shuffle_buffer_mb * 2**20 + stored_bytes)
    else:
        buffer = 0.0
    waiting = data.num_workers * data.prefetch_batches * batch
    return {
        "shuffle": loaders * buffer,
        "making": loaders * 2 * batch,
        "waiting": waiting,
        "pinned": waiting + batch if pinned else 0.0,
    }


def node_plan(
    data: DataConfig,
    run: RunConfig,
    node: NodeShape,
    *,
    stored_bytes: float,
    batch_bytes_per_sample: float | None = None,
    process_gib: float = 6.0,
    loader_process_gib: float = 0.5,
    ray_daemons_gib: float = 2.0,
) -> NodePlan:
    """The run's ranks on one node of ``node``'s shape (as many as its GPUs take, or its CPUs for a CPU run),
    and whether their CPUs, memory and shared memory fit it."""
    problems = []
    by_cpu = math.floor(node.cpus / run.cpus_per_worker + 1e-9)
    if run.gpus_per_worker:
        if not node.gpus:
            problems.append(f"the run asks for run.gpus_per_worker={run.gpus_per_worker:g} and the node has no GPU")
            return NodePlan(0, problems=problems)
        by_gpu = math.floor(node.gpus / run.gpus_per_worker + 1e-9)
        ranks = min(by_gpu, by_cpu)
        if by_cpu < by_gpu:
            problems.append(
                f"{by_gpu} ranks (one per run.gpus_per_worker={run.gpus_per_worker:g} of {node.gpus:g} GPUs) need "
                f"{by_gpu * run.cpus_per_worker:g} CPUs at run.cpus_per_worker={run.cpus_per_worker:g}; the node has {node.cpus:g}, so "
                f"{(by_gpu - by_cpu) * run.gpus_per_worker:g} GPUs would sit idle. Use run.cpus_per_worker <= {node.cpus / by_gpu:g}"
            )
    else:
        ranks = by_cpu
    ranks = max(min(ranks, run.num_workers), 0)
    if ranks == 0:
        problems.append(f"not one worker of {run.cpus_per_worker:g} CPUs fits a node of {node.cpus:g}")
        return NodePlan(0, problems=problems)
    if data.num_workers + 1 > run.cpus_per_worker:
        problems.append(
            f"each rank runs {data.num_workers} dataloader workers beside its training process on run.cpus_per_worker="
            f"{run.cpus_per_worker:g} CPUs: use data.num_workers <= {max(int(run.cpus_per_worker) - 1, 0)}"
        )
    rank = rank_bytes(data, stored_bytes=stored_bytes, batch_bytes_per_sample=batch_bytes_per_sample, pinned=run.gpus_per_worker > 0)
    loaders = data.num_workers
    rows = [
        (f"training processes ({process_gib:g} GiB each, estimated)", ranks * process_gib * GiB),
        (f"dataloader worker processes ({loader_process_gib:g} GiB each, estimated)", ranks * loaders * loader_process_gib * GiB),
        (f"shuffle buffers ({max(loaders, 1)} per rank)", ranks * rank["shuffle"]),
        ("batches being assembled (2 per loader)", ranks * rank["making"]),
        ("pinned batches (upper bound)", ranks * rank["pinned"]),
        (f"Ray's daemons ({ray_daemons_gib:g} GiB, estimated)", ray_daemons_gib * GiB),
    ]
    shm_rows = [
        ("Ray's object store", node.object_store),
        (f"batches waiting in shared memory ({data.prefetch_batches} per loader)", ranks * rank["waiting"]),
    ]
    plan = NodePlan(ranks, rows + [("/dev/shm in use (object store, waiting batches)", sum(b for _, b in shm_rows))], shm_rows, problems)
    if plan.shm > node.shm:
        problems.append(
            f"/dev/shm needs {plan.shm / GiB:.1f} GiB of {node.shm / GiB:.1f}: lower data.prefetch_batches or data.num_workers "
            "(each waiting batch is one batch_size of samples), shrink Ray's object store, or raise the node's shmSize"
        )
    if plan.memory > node.memory:
        problems.append(
            f"memory needs {plan.memory / GiB:.1f} GiB of {node.memory / GiB:.1f}: lower data.shuffle_buffer_mb, data.num_workers "
            "or data.prefetch_batches, or use nodes with more memory"
        )
    return plan
