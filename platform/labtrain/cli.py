"""``labtrain``: the command line of the platform (cluster, shards, metrics, and the lab queue)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.markup import escape

# Into a file or a pipe (logs, CI, a test reading stderr) a message stays one line: rich would fold it at 80 columns.
console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())


def _group_files(src: Path) -> dict[str, dict[str, Path]]:
    """Files named ``<key>.<ext>`` under ``src`` -> {key: {ext: path}} (the key may contain folders)."""
    groups: dict[str, dict[str, Path]] = defaultdict(dict)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        base = rel.rsplit("/", 1)[-1]
        if "." not in base:
            raise SystemExit(f"error: {path} has no extension; files must be named <key>.<ext> (e.g. 000123.jpg, 000123.cls)")
        key, ext = rel[: len(rel) - len(base)] + base.split(".", 1)[0], base.split(".", 1)[1]
        groups[key][ext] = path
    return groups


def _files_as_samples(groups: dict[str, dict[str, Path]]):
    """One sample at a time: the bytes of a sample's files are read only when it is written."""
    for key, files in groups.items():
        yield {"__key__": key, **{ext: path.read_bytes() for ext, path in files.items()}}


def cmd_shards_write(args) -> int:
    from labtrain.data import write_shards

    src = Path(args.src)
    if not src.is_dir():
        raise SystemExit(f"error: {src} is not a directory of <key>.<ext> files")
    groups = _group_files(src)
    pattern = write_shards(_files_as_samples(groups), args.out, total=len(groups), prefix=args.prefix, target_bytes=args.target_bytes, max_samples=args.max_samples)
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

    spec = cluster.ClusterSpec(state_dir=args.state_dir, num_nodes=args.nodes, cpus_per_node=args.cpus_per_node, dashboard_port=args.dashboard_port,
                               gcs_port=args.port, queue_port=None if args.no_queue else args.queue_port)
    try:
        with console.status(f"starting {spec.num_nodes} Ray nodes{'' if args.no_queue else ' and the queue'} ..."):
            state = cluster.up(spec)
    except cluster.ClusterError as error:
        console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
        return 1
    if state.repaired:
        console.print(f"the local cluster at {state.address} was running without its {', '.join(state.repaired)}: restarted it")
    console.print(f"local cluster up: {state.spec.num_nodes} Ray nodes at {state.address}, job API and dashboard at {state.dashboard_url}")
    for node, port in enumerate(state.metrics_ports):
        console.print(f"  node{node} metrics: http://127.0.0.1:{port}/metrics")
    if state.queue_url:
        console.print(f"  lab queue: {state.queue_url} (page and /docs; your token is in {Path(state.spec.state_dir) / cluster.QUEUE_CLIENT_FILE})")
        console.print("submit with: labtrain submit jobs/shapes/configs/demo.yaml --job jobs.shapes --workers 2 --follow synthetic.write=true")
    console.print(f"or directly: RAY_ADDRESS={state.dashboard_url} ray job submit --working-dir . -- python -m jobs.shapes --config jobs/shapes/configs/demo.yaml synthetic.write=true")
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
    alive = [pid for pid in state.pids if cluster._ours(state, pid)]
    queue = f"; queue {state.queue_url}" if state.queue_url else ""
    print(f"{state.address}: {len(alive)}/{len(state.pids)} processes alive; dashboard {state.dashboard_url}; metrics ports {state.metrics_ports}{queue}")
    return 0 if len(alive) == len(state.pids) else 1


# -- the lab queue (labtrain.queue) ----------------------------------------------------------------------
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED", "TIMEOUT")


def _queue_client(args):
    from labtrain.queue.client import QueueClient, resolve

    url, token = resolve(args.url, args.token)
    return QueueClient(url, token)


def _queue_cmd(fn):
    """Run a queue command; a refused request prints its reason and exits with status 2."""

    def run(args) -> int:
        from labtrain.queue.client import QueueError

        try:
            return fn(args)
        except QueueError as error:
            console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)  # the message's own [brackets] stay
            return error.exit_code

    return run


def _check_job(args) -> None:
    """Validate the job here, with the job's own code (``python -m <job> --config ... --check``, the same
    checks it makes at start, short of reading its data), before it waits in the queue."""
    from labtrain.launch import gang_flags
    from labtrain.queue.client import QueueError

    gang = gang_flags(args.workers, args.cpus_per_worker, args.gpus_per_worker, args.memory_gb_per_worker)
    cmd = [sys.executable, "-m", args.job, "--config", args.config, *args.overrides, *gang, "--check"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode == 0:
        return
    err = proc.stderr.strip()
    if proc.returncode == 1 and "No module named" in err:
        raise QueueError(f"--job {args.job}: no such job module here (jobs are python -m modules such as jobs.shapes; run submit from the checkout the jobs run in)")
    lines = err.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("error:")), max(len(lines) - 5, 0))
    text = "\n".join(lines[start:]).removeprefix("error: ")
    raise QueueError(f"{text}\n(checked with `python -m {args.job} ... --check`; nothing was queued)")


def cmd_submit(args) -> int:
    if not args.no_check:
        _check_job(args)
    spec = {
        "job": args.job, "config": args.config, "overrides": args.overrides, "priority": args.priority,
        "resources": {"workers": args.workers, "cpus_per_worker": args.cpus_per_worker, "gpus_per_worker": args.gpus_per_worker},
    }
    if args.memory_gb_per_worker is not None:
        spec["resources"]["memory_gb_per_worker"] = args.memory_gb_per_worker
    if args.time_limit is not None:
        spec["time_limit_s"] = _seconds(args.time_limit)
    client = _queue_client(args)
    job = client.submit(spec)
    print(job["id"], flush=True)
    console.print(f"queued {job['id']}: {job['job']} on {job['workers']} workers ({job['cpus']:g} CPUs, {job['gpus']:g} GPUs), priority {job['priority']}")
    return _follow(client, job["id"]) if args.follow else 0


def _follow(client, job_id: str, *, poll_s: float = 1.0) -> int:
    """Print the job's state changes (stderr) and stream its log (stdout) until it ends; 0 only if it
    succeeded. Each Ray submission of the job (a preempted job runs again as a new one) is streamed once."""
    from labtrain.queue.client import QueueError

    streamed: set[str] = set()
    state, failures = None, 0
    while True:
        job = client.job(job_id)
        if job["state"] != state:
            state = job["state"]
            console.print(f"{job_id}: {state}", highlight=False)
        sid = job["submission_id"]
        if sid and sid not in streamed and state not in ("WAITING", "DISPATCHING"):
            try:
                if state in TERMINAL_STATES:  # it ended before we looked: the whole log at once
                    sys.stdout.write(client.logs(job_id)["logs"])
                else:
                    for text in client.stream_logs(job_id):
                        sys.stdout.write(text)
                        sys.stdout.flush()
                streamed.add(sid)
                failures = 0
                continue
            except QueueError as error:  # 502: Ray does not know yet a submission the dispatcher has just made
                failures += 1
                if error.status not in (502, 409, None) or failures > 30:
                    raise
        if state in TERMINAL_STATES:
            sys.stdout.flush()
            return 0 if state == "SUCCEEDED" else 1
        time.sleep(poll_s)


def _seconds(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h``, ``1d`` or ``HH:MM:SS`` -> seconds."""
    from labtrain.queue.client import QueueError

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if ":" in text:
            total = 0.0
            for part in text.split(":"):
                total = total * 60 + float(part)
            return total
        if text[-1:] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise QueueError(f"--time-limit {text!r}: use seconds, 30m, 2h, 1d or HH:MM:SS") from None


def _age(seconds: float) -> str:
    seconds = max(seconds, 0)
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.0f}m" if seconds < 5400 else f"{seconds / 3600:.1f}h"


def _table_console() -> Console:
    """A terminal's width, or wide enough never to cut a job id when piped."""
    return Console() if sys.stdout.isatty() else Console(width=240)


def cmd_queue(args) -> int:
    from rich.table import Table

    jobs = _queue_client(args).jobs(all=args.all, state=None if args.all_states else "WAITING,DISPATCHING,RUNNING,PREEMPTING,CANCELLING")
    now = time.time()
    table = Table(box=None, header_style="bold")
    for col in ("JOBID", "USER", "JOB", "PRI", "STATE", "WORKERS", "CPUS", "GPUS", "TIME", "LIMIT", "REASON"):
        table.add_column(col)
    for j in sorted(jobs, key=lambda j: (j["state"] == "WAITING", j["submitted_at"])):
        since = j["started_at"] if j["started_at"] else j["queued_at"]
        table.add_row(j["id"], j["user"], j["job"], j["priority"], j["state"], str(j["workers"]), f"{j['cpus']:g}", f"{j['gpus']:g}",
                      _age((j["ended_at"] or now) - since), _age(j["time_limit_s"]), escape(j["message"][:80]))
    _table_console().print(table)
    return 0


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _since(text: str) -> float:
    """``2d``, ``12h``, ``90m`` (that long ago) or a date ``2026-11-30`` / ``2026-11-30T08:00`` -> Unix time."""
    import datetime

    from labtrain.queue.client import QueueError

    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        pass
    try:
        return time.time() - _seconds(text)
    except QueueError:
        raise QueueError(f"--since {text!r}: use a duration ago (2d, 12h, 90m) or a date (2026-11-30, 2026-11-30T08:00)") from None


def cmd_show(args) -> int:
    import json

    from rich.table import Table

    job = _queue_client(args).job(args.id)
    if args.json:
        print(json.dumps(job, indent=1))
        return 0
    gang = f"{job['workers']} x ({job['cpus_per_worker']:g} CPU, {job['gpus_per_worker']:g} GPU" + (
        f", {job['memory_gb_per_worker']:g} GB)" if job.get("memory_gb_per_worker") else ")")
    lines = [
        ("job", f"{job['id']}  {job['job']}  of {job['user']}"), ("state", job["state"] + (f": {job['message']}" if job["message"] else "")),
        ("config", " ".join([job["config"], *job["overrides"]])), ("gang", f"{gang}, priority {job['priority']}, limit {_age(job['time_limit_s'])}"),
        ("attempts", f"{job['attempt']} ({job['num_preemptions']} preemptions)"),
        ("submitted", _when(job["submitted_at"])), ("started", _when(job["started_at"])), ("ended", _when(job["ended_at"])),
    ]
    out = _table_console()
    for key, value in lines:
        out.print(f"{key:<10} {value}", markup=False, highlight=False)
    table = Table(box=None, header_style="bold", title="history", title_justify="left")
    for col in ("TIME", "STATE", "ATTEMPT", "WHY"):
        table.add_column(col)
    for e in job.get("events", []):
        table.add_row(_when(e["at"]), e["state"], str(e["attempt"]), escape(e["message"]))
    out.print(table)
    return 0


def cmd_history(args) -> int:
    """Finished jobs, like sacct."""
    from rich.table import Table

    jobs = _queue_client(args).history(user=args.user, state=args.state, since=_since(args.since) if args.since else None, limit=args.limit)
    table = Table(box=None, header_style="bold")
    for col in ("JOBID", "USER", "JOB", "STATE", "SUBMITTED", "ENDED", "WAITED", "RAN", "ATTEMPTS", "REASON"):
        table.add_column(col)
    for j in jobs:
        ran = _age(j["ended_at"] - j["started_at"]) if j["started_at"] else "-"
        waited = _age((j["started_at"] or j["ended_at"]) - j["queued_at"])
        attempts = f"{j['attempt']}" + (f" ({j['num_preemptions']} preempted)" if j["num_preemptions"] else "")
        table.add_row(j["id"], j["user"], j["job"], j["state"], _when(j["submitted_at"]), _when(j["ended_at"]), waited, ran, attempts, escape(j["message"][:80]))
    _table_console().print(table)
    if len(jobs) == args.limit:
        console.print(f"the {args.limit} latest shown; --limit for more", style="dim")
    return 0


def cmd_logs(args) -> int:
    client = _queue_client(args)
    if args.follow:
        return _follow(client, args.id)
    sys.stdout.write(client.logs(args.id)["logs"])
    return 0


def cmd_cancel(args) -> int:
    job = _queue_client(args).cancel(args.id)
    console.print(f"{job['id']}: {job['state']}")
    return 0


def cmd_users_list(args) -> int:
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("USER", "GROUP", "SHARE", "ADMIN", "USAGE", "CPUS", "GPUS", "JOBS"):
        table.add_column(col)
    for u in _queue_client(args).request("GET", "/api/v1/users"):
        q = u["quotas"]
        table.add_row(u["name"], u["group"], f"{u['share']:g}", "yes" if u["admin"] else "", f"{u['usage']:.0f}", *("-" if q[k] is None else f"{q[k]:g}" for k in ("cpus", "gpus", "jobs")))
    _table_console().print(table)
    return 0


def _limit(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error
    return parse


def _quota(args) -> dict:
    """The quotas named on the command line only (a set-quota changes just those)."""
    return {k: getattr(args, k) for k in ("cpus", "gpus", "jobs") if hasattr(args, k)}


def cmd_users_add(args) -> int:
    entry = {"name": args.name, "group": args.group, "share": args.share, "admin": args.admin, "quotas": _quota(args)}
    answer = _queue_client(args).request("POST", "/api/v1/users", json=entry)
    console.print(f"user {answer['name']} added; their token (shown once):")
    print(answer["token"])
    return 0


def cmd_users_set_quota(args) -> int:
    body = {"quotas": _quota(args), "share": args.share}
    path = f"/api/v1/groups/{args.name}/quota" if args.group_quota else f"/api/v1/users/{args.name}/quota"
    answer = _queue_client(args).request("PUT", path, json=body)
    quotas = {k: answer[k] for k in ("cpus", "gpus", "jobs")}
    console.print(f"{'group' if args.group_quota else 'user'} {args.name}: quota {quotas}", highlight=False)
    return 0


def add_queue_parsers(sub) -> None:
    """``labtrain submit | queue | history | show | logs | cancel | users``: the lab queue's commands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help="queue service, e.g. http://queue:8000 (else LABTRAIN_QUEUE_URL, ~/.config/labtrain/queue.yaml)")
    common.add_argument("--token", default=None, help="your token (else LABTRAIN_TOKEN, ~/.config/labtrain/queue.yaml)")

    s = sub.add_parser("submit", parents=[common], help="queue a job")
    s.add_argument("config", help="the job's config file, as a path relative to the checkout the job runs in")
    s.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    s.add_argument("--job", default="jobs.shapes", help="job module (default jobs.shapes)")
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--cpus-per-worker", type=float, default=1.0)
    s.add_argument("--gpus-per-worker", type=float, default=0.0)
    s.add_argument("--memory-gb-per-worker", type=float, default=None)
    s.add_argument("--priority", default="normal", help="low, normal or high")
    s.add_argument("--time-limit", default=None, help="e.g. 3600, 90m, 12h, 1d, 01:30:00")
    s.add_argument("-f", "--follow", action="store_true", help="then print its log until it ends; exit 0 only if it succeeded")
    s.add_argument("--no-check", action="store_true", help="queue without running the job's own config check here first")
    s.set_defaults(fn=_queue_cmd(cmd_submit))

    q = sub.add_parser("queue", parents=[common], help="the queue, like squeue")
    q.add_argument("--all", action="store_true", help="every user's jobs (admins)")
    q.add_argument("--all-states", action="store_true", help="finished jobs too")
    q.set_defaults(fn=_queue_cmd(cmd_queue))
    h = sub.add_parser("history", parents=[common], help="finished jobs, like sacct")
    h.add_argument("--user", default=None, help="this user's jobs (admins: anyone's; default: yours, or everyone's for an admin)")
    h.add_argument("--state", default=None, help="comma-separated: SUCCEEDED, FAILED, CANCELLED, TIMEOUT, PREEMPTED (finished after a preemption)")
    h.add_argument("--since", default=None, help="ended since: 2d, 12h, 90m ago, or a date 2026-11-30[T08:00]")
    h.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    h.set_defaults(fn=_queue_cmd(cmd_history))
    for name, fn, help_text in (("show", cmd_show, "one job and its state history"), ("cancel", cmd_cancel, "cancel a job (stops it on Ray)"), ("logs", cmd_logs, "a job's Ray logs")):
        c = sub.add_parser(name, parents=[common], help=help_text)
        c.add_argument("id")
        if name == "logs":
            c.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends; exit 0 only if it succeeded")
        if name == "show":
            c.add_argument("--json", action="store_true", help="the job and its history as JSON")
        c.set_defaults(fn=_queue_cmd(fn))

    users = sub.add_parser("users", help="users and quotas (admins)").add_subparsers(dest="action", required=True)
    ul = users.add_parser("list", parents=[common])
    ul.set_defaults(fn=_queue_cmd(cmd_users_list))
    for name, fn in (("add", cmd_users_add), ("set-quota", cmd_users_set_quota)):
        u = users.add_parser(name, parents=[common])
        u.add_argument("name")
        # Not given: left as it is (set-quota) or no limit (add); 'none' removes a limit.
        u.add_argument("--cpus", type=_limit(float), default=argparse.SUPPRESS, help="CPU quota, or none")
        u.add_argument("--gpus", type=_limit(float), default=argparse.SUPPRESS, help="GPU quota, or none")
        u.add_argument("--jobs", type=_limit(int), default=argparse.SUPPRESS, help="concurrent jobs quota, or none")
        if name == "add":
            u.add_argument("--group", default="default")
            u.add_argument("--share", type=float, default=1.0)
            u.add_argument("--admin", action="store_true")
        else:
            u.add_argument("--share", type=float, default=None)
            u.add_argument("--group-quota", action="store_true", help="NAME is a group: set the group's quota")
        u.set_defaults(fn=_queue_cmd(fn))


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
            c.add_argument("--queue-port", type=int, default=8000, help="the lab queue's port (default 8000)")
            c.add_argument("--no-queue", action="store_true", help="start Ray only, no queue service")
        c.set_defaults(fn=fn)
    add_queue_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `labtrain submit CONFIG --workers 2 a.b=1`: overrides may come after options (argparse leaves those over).
    if extra and getattr(args, "command", None) == "submit" and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
