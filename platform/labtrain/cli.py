"""``labtrain``: the command line of the platform (cluster, shards, metrics)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)


def _files_as_samples(src: Path):
    """Files named ``<key>.<ext>`` under ``src`` -> webdataset samples (the key may contain folders)."""
    groups: dict[str, dict] = defaultdict(dict)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        base = rel.rsplit("/", 1)[-1]
        if "." not in base:
            raise SystemExit(f"error: {path} has no extension; files must be named <key>.<ext> (e.g. 000123.jpg, 000123.cls)")
        key, ext = rel[: len(rel) - len(base)] + base.split(".", 1)[0], base.split(".", 1)[1]
        groups[key][ext] = path.read_bytes()
    for key, files in groups.items():
        yield {"__key__": key, **files}


def cmd_shards_write(args) -> int:
    from labtrain.data import write_shards

    src = Path(args.src)
    if not src.is_dir():
        raise SystemExit(f"error: {src} is not a directory of <key>.<ext> files")
    samples = list(_files_as_samples(src))
    pattern = write_shards(samples, args.out, total=len(samples), prefix=args.prefix, target_bytes=args.target_bytes, max_samples=args.max_samples)
    print(pattern)
    return 0


def cmd_shards_index(args) -> int:
    from labtrain.data import build_index

    entries = build_index(args.urls, args.index)
    total = sum(e["num_samples"] for e in entries.values())
    print(f"indexed {len(entries)} shards, {total} samples")
    return 0


def cmd_metrics_serve(args) -> int:
    from labtrain.metrics import serve

    serve(args.port, args.dir, addr=args.addr)
    console.print(f"serving metrics of {args.dir} on http://{args.addr}:{args.port}/metrics")
    while True:
        time.sleep(3600)


def cmd_cluster_up(args) -> int:
    from labtrain import cluster

    spec = cluster.ClusterSpec(state_dir=args.state_dir, num_nodes=args.nodes, cpus_per_node=args.cpus_per_node, dashboard_port=args.dashboard_port, gcs_port=args.port)
    with console.status(f"starting {spec.num_nodes} Ray nodes ..."):
        state = cluster.up(spec)
    console.print(f"local cluster up: {spec.num_nodes} Ray nodes at {state.address}, job API and dashboard at {state.dashboard_url}")
    for node, port in enumerate(state.metrics_ports):
        console.print(f"  node{node} metrics: http://127.0.0.1:{port}/metrics")
    console.print(f"submit with: RAY_ADDRESS={state.dashboard_url} ray job submit --working-dir . -- python -m jobs.shapes --config jobs/shapes/configs/demo.yaml")
    return 0


def cmd_cluster_down(args) -> int:
    from labtrain import cluster

    stopped = cluster.down(args.state_dir)
    console.print(f"stopped {len(stopped)} processes" if stopped else "no local cluster was running")
    return 0


def cmd_cluster_status(args) -> int:
    from labtrain import cluster

    state = cluster.load_state(args.state_dir)
    if state is None:
        print("no local cluster")
        return 1
    alive = [pid for pid in state.pids if cluster._alive(pid)]
    print(f"{state.address}: {len(alive)}/{len(state.pids)} processes alive; dashboard {state.dashboard_url}; metrics ports {state.metrics_ports}")
    return 0 if len(alive) == len(state.pids) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labtrain", description="labtrain: the lab's training platform on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    shards = sub.add_parser("shards", help="write or index webdataset shards").add_subparsers(dest="action", required=True)
    w = shards.add_parser("write", help="pack a folder of <key>.<ext> files into shards plus index.json")
    w.add_argument("src", help="folder of <key>.<ext> files")
    w.add_argument("out", help="output folder or s3://bucket/prefix")
    w.add_argument("--prefix", default="shard")
    w.add_argument("--target-bytes", type=int, default=64 * 2**20, help="roll over to a new shard at this size")
    w.add_argument("--max-samples", type=int, default=None, help="and at most this many samples per shard")
    w.set_defaults(fn=cmd_shards_write)
    i = shards.add_parser("index", help="build index.json for shards written elsewhere (reads each once)")
    i.add_argument("urls", help="brace pattern, e.g. s3://bucket/data/train-{000000..000099}.tar")
    i.add_argument("--index", default=None, help="where to write index.json (default: beside the shards)")
    i.set_defaults(fn=cmd_shards_index)

    metrics = sub.add_parser("metrics", help="the per-node metrics exporter").add_subparsers(dest="action", required=True)
    m = metrics.add_parser("serve", help="serve every process's metrics from a node's metrics directory")
    m.add_argument("--port", type=int, default=9400)
    m.add_argument("--addr", default="0.0.0.0")
    m.add_argument("--dir", default=os.environ.get("LABTRAIN_METRICS_DIR"), required=os.environ.get("LABTRAIN_METRICS_DIR") is None)
    m.set_defaults(fn=cmd_metrics_serve)

    cl = sub.add_parser("cluster", help="the embedded local cluster").add_subparsers(dest="action", required=True)
    for name, fn in (("up", cmd_cluster_up), ("down", cmd_cluster_down), ("status", cmd_cluster_status)):
        c = cl.add_parser(name)
        c.add_argument("--state-dir", default=".labtrain/cluster")
        if name == "up":
            c.add_argument("--nodes", type=int, default=2)
            c.add_argument("--cpus-per-node", type=int, default=2)
            c.add_argument("--port", type=int, default=6379)
            c.add_argument("--dashboard-port", type=int, default=8265)
        c.set_defaults(fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
