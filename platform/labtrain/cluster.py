"""The embedded local cluster: a Ray head and a second Ray node on this machine, one metrics exporter per
node, and the lab queue's service (SQLite) in front of them. ``up`` records what it started in a state file;
``down`` stops exactly those processes.

The queue gets one user, named after the login running ``up`` and an admin, with a fresh token; its address
and token go to ``<state dir>/queue.yaml`` (mode 600), where ``labtrain submit`` and the other queue commands
find them when no flag, environment variable or ``~/.config/labtrain/queue.yaml`` says otherwise.

Each node gets the custom resources ``labtrain_node: 1`` and ``<node name>: 1`` so tests and demos can
force placement across nodes. Ray's token authentication is turned off for this loopback-only cluster
(``RAY_AUTH_MODE=disabled``), so ``ray job submit`` works as written; real clusters keep it on (see the
Helm chart and cluster/README.md).
"""

from __future__ import annotations

import getpass
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from labtrain.metrics import METRICS_DIR_ENV


@dataclass
class ClusterSpec:
    state_dir: str = ".labtrain/cluster"
    gcs_port: int = 6379
    dashboard_port: int = 8265
    metrics_base_port: int = 9400
    num_nodes: int = 2
    cpus_per_node: int = 2
    object_store_bytes: int = 256 * 2**20
    queue_port: int | None = 8000  # None: no queue service


@dataclass
class ClusterState:
    spec: ClusterSpec
    pids: list[int] = field(default_factory=list)
    start_times: dict[str, float] = field(default_factory=dict)  # pid -> its process's start time, so a reused pid is not ours
    metrics_ports: list[int] = field(default_factory=list)
    queue_url: str | None = None
    queue_pid: int | None = None  # the queue service's pid (also in pids): the part `up` can restart alone
    repaired: list[str] = field(default_factory=list)  # what the last `up` restarted in a running cluster

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.spec.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.spec.dashboard_port}"


def _state_file(state_dir: str) -> Path:
    return Path(state_dir) / "cluster.json"


def load_state(state_dir: str) -> ClusterState | None:
    path = _state_file(state_dir)
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    return ClusterState(spec=ClusterSpec(**raw["spec"]), pids=raw["pids"], start_times=raw.get("start_times", {}), metrics_ports=raw["metrics_ports"],
                        queue_url=raw.get("queue_url"), queue_pid=raw.get("queue_pid"))


def _save_state(state: ClusterState) -> None:
    for pid in state.pids:
        if str(pid) not in state.start_times and (started := _start_time(pid)) is not None:
            state.start_times[str(pid)] = started
    _state_file(state.spec.state_dir).write_text(json.dumps(asdict(state), indent=1))


def node_env(spec: ClusterSpec, node: int) -> dict[str, str]:
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "disabled"
    # Jobs' entrypoints say `python`: make it this environment's, where labtrain is installed.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env.setdefault("LABTRAIN_STORAGE_ROOT", os.path.abspath("runs"))
    env[METRICS_DIR_ENV] = os.path.abspath(os.path.join(spec.state_dir, f"metrics-node{node}"))
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.abspath(os.path.join(spec.state_dir, "..", "torch_extensions")))
    return env


def _ray_cmd(spec: ClusterSpec, node: int) -> list[str]:
    ray = str(Path(sys.executable).with_name("ray"))
    resources = json.dumps({"labtrain_node": 1, f"node{node}": 1})
    # Every node's agents get their own free ports: with Ray's fixed defaults the second node on this
    # machine (or a node of another local cluster) fails to bind 52365 and its agent runs without HTTP.
    agent_ports = [f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")]
    common = ["--block", *agent_ports, f"--num-cpus={spec.cpus_per_node}", "--num-gpus=0", f"--resources={resources}", f"--object-store-memory={spec.object_store_bytes}", "--disable-usage-stats"]
    if node == 0:
        return [ray, "start", "--head", f"--port={spec.gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={spec.dashboard_port}", "--node-ip-address=127.0.0.1", *common]
    # A temp dir of its own: two nodes sharing /tmp/ray's session logs would each forward every worker's
    # output to the driver, and every line would be printed twice.
    return [ray, "start", f"--address=127.0.0.1:{spec.gcs_port}", "--node-ip-address=127.0.0.1", f"--temp-dir={node_temp_dir(spec, node)}", *common]


def node_temp_dir(spec: ClusterSpec, node: int) -> str:
    """Ray's temp dir for a non-head node; short, because Ray puts unix sockets under it."""
    return f"/tmp/ray-lt{spec.gcs_port}-n{node}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_nodes(spec: ClusterSpec, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{spec.dashboard_port}/nodes?view=summary"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                nodes = json.loads(response.read())["data"]["summary"]
            alive = [n for n in nodes if n.get("raylet", {}).get("state") == "ALIVE"]
            if len(alive) >= count:
                return
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(1)
    raise TimeoutError(f"{count} Ray nodes did not come up within {timeout_s:.0f}s; see the logs in {spec.state_dir}")


def _wait_for_job_agents(spec: ClusterSpec, count: int, timeout_s: float) -> None:
    """Wait until ``count`` nodes' dashboard agents have registered: ``ray job submit`` is refused with "No
    available agent to submit job" until the head's has, which on a busy machine can take a minute."""
    from ray._private.ray_constants import KV_NAMESPACE_DASHBOARD
    from ray._raylet import GcsClient
    from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX

    client = GcsClient(address=f"127.0.0.1:{spec.gcs_port}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if len(client.internal_kv_keys(DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX.encode(), namespace=KV_NAMESPACE_DASHBOARD, timeout=5)) >= count:
                return
        except Exception:  # noqa: BLE001 - the GCS may still be starting
            pass
        time.sleep(1)
    raise TimeoutError(f"the Ray dashboard agents of {count} nodes did not register within {timeout_s:.0f}s; see the logs in {spec.state_dir}")


class ClusterError(RuntimeError):
    """What ``up`` cannot do, in words: the CLI prints it as one ``error:`` line."""


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _check_ports(ports: dict[str, int | None]) -> None:
    taken = [f"{port} ({name})" for name, port in ports.items() if port is not None and _port_taken(port)]
    if taken:
        raise ClusterError(f"{'ports' if len(taken) > 1 else 'port'} {', '.join(taken)} already taken on 127.0.0.1 (another cluster or queue? `ss -ltnp` shows whose); "
                           "stop it, or choose other ports (labtrain cluster up --help)")


def up(spec: ClusterSpec | None = None, *, timeout_s: float = 120) -> ClusterState:
    """Start the nodes, exporters and the queue. On a state dir whose cluster is running, restart what is
    missing if that is only the queue service (recorded like the rest, so ``down`` stops it); a cluster with
    a Ray node or exporter gone is refused (``down`` then ``up``)."""
    spec = spec or ClusterSpec()
    existing = load_state(spec.state_dir)
    if existing is not None and any(_ours(existing, pid) for pid in existing.pids):
        return _repair(existing, timeout_s)
    _check_ports({"Ray GCS": spec.gcs_port, "Ray dashboard": spec.dashboard_port, "queue": spec.queue_port,
                  **{f"node{n} metrics": spec.metrics_base_port + n for n in range(spec.num_nodes)}})
    os.makedirs(spec.state_dir, exist_ok=True)
    state = ClusterState(spec=spec)
    try:
        for node in range(spec.num_nodes):
            env = node_env(spec, node)
            shutil.rmtree(env[METRICS_DIR_ENV], ignore_errors=True)
            os.makedirs(env[METRICS_DIR_ENV])
            log = open(os.path.join(spec.state_dir, f"node{node}.log"), "wb")
            ray = subprocess.Popen(_ray_cmd(spec, node), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            state.pids.append(ray.pid)
            _save_state(state)
            _wait_for_nodes(spec, node + 1, timeout_s)
            _wait_for_job_agents(spec, node + 1, timeout_s)
            port = spec.metrics_base_port + node
            exporter = subprocess.Popen(
                [sys.executable, "-m", "labtrain.cli", "metrics", "serve", "--port", str(port), "--dir", env[METRICS_DIR_ENV]],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            state.pids.append(exporter.pid)
            state.metrics_ports.append(port)
            _save_state(state)
        if spec.queue_port is not None:
            _start_queue(spec, state, timeout_s)
    except BaseException:
        down(spec.state_dir)
        raise
    return state


def _repair(state: ClusterState, timeout_s: float) -> ClusterState:
    """Restart the queue service of a running cluster whose queue died; nothing else can be repaired."""
    dead = [pid for pid in state.pids if not _ours(state, pid)]
    queue_dead = state.queue_pid in dead or (state.spec.queue_port is not None and state.queue_pid is None and state.queue_url is None)
    others = [pid for pid in dead if pid != state.queue_pid]
    if others:
        raise ClusterError(f"the local cluster in {state.spec.state_dir} is partly down (processes {others} of {state.pids} are gone); "
                           "run `labtrain cluster down`, then `labtrain cluster up`")
    if not queue_dead:
        raise ClusterError(f"a local cluster from {state.spec.state_dir} is already running at {state.address}; `labtrain cluster down` stops it")
    state.pids = [pid for pid in state.pids if pid != state.queue_pid]
    state.start_times.pop(str(state.queue_pid), None)
    state.queue_pid = state.queue_url = None
    _save_state(state)
    _check_ports({"queue": state.spec.queue_port})
    _start_queue(state.spec, state, timeout_s)
    state.repaired = ["queue"]
    return state


QUEUE_CLIENT_FILE = "queue.yaml"


def _local_user() -> str:
    """The login as a queue user name (lowercase letters, digits, ``_.-``), ``lab`` if nothing is left."""
    try:
        name = re.sub(r"[^a-z0-9_.-]", "_", getpass.getuser().lower())
    except (KeyError, OSError):
        name = ""
    return name if re.fullmatch(r"[a-z_][a-z0-9_.-]{0,63}", name) else "lab"


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _start_queue(spec: ClusterSpec, state: ClusterState, timeout_s: float) -> None:
    """The queue service beside Ray: SQLite in the state dir, jobs dispatched to this cluster's job API and
    run from the directory ``up`` was called in (the checkout)."""
    root = Path(spec.state_dir).resolve()
    token = secrets.token_urlsafe(24)
    user = _local_user()
    _write_private(root / "queue-users.yaml", json.dumps({"users": [{"name": user, "group": "local", "admin": True, "token": token}]}))
    url = f"http://127.0.0.1:{spec.queue_port}"
    command = [sys.executable, "-m", "labtrain.queue", "serve", "--host", "127.0.0.1", "--port", str(spec.queue_port),
               "--db", str(root / "queue.db"), "--ray-address", state.dashboard_url, "--users-file", str(root / "queue-users.yaml"),
               "--job-cwd", os.getcwd(), "--log-level", "warning"]
    log = open(root / "queue.log", "ab")
    service = subprocess.Popen(command, env=node_env(spec, 0), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    state.pids.append(service.pid)
    state.queue_pid = service.pid
    _save_state(state)
    deadline = time.monotonic() + timeout_s
    while True:
        if service.poll() is not None:  # it died (a port taken after the check, a bad database): not another's answer
            raise ClusterError(f"the queue service exited with status {service.returncode}; see {root / 'queue.log'}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise ClusterError(f"the queue service did not start on {url} within {timeout_s:.0f} s; see {root / 'queue.log'}") from None
            time.sleep(0.3)
    _write_private(root / QUEUE_CLIENT_FILE, json.dumps({"url": url, "token": token, "user": user}) + "\n")
    state.queue_url = url
    _save_state(state)


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # dead, not yet reaped by the process that started it
            return None
        return proc.create_time()
    except psutil.Error:
        return None


def _ours(state: ClusterState, pid: int) -> bool:
    """A process group ``up`` started that is still there. Its leader must be the very process ``up``
    started (after a reboot the pid may belong to another program); a leader that is gone leaves a group
    whose id no new process can take while a member lives."""
    started = _start_time(pid)
    if started is None:
        return _group_alive(pid) and _group_has_live_member(pid)
    recorded = state.start_times.get(str(pid))
    return recorded is None or abs(recorded - started) < 1e-3


def _descendants(pids: list[int]) -> list:
    """Every process below ``pids``, found before anything is stopped: Ray starts a job's driver in a session
    of its own, so stopping Ray's process groups leaves it running (reparented to init, spinning on a GCS
    that is gone)."""
    import psutil

    found = []
    for pid in pids:
        try:
            found += psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            pass
    return found


def _stop_processes(processes: list, timeout_s: float) -> None:
    import psutil

    for proc in processes:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


def down(state_dir: str = ClusterSpec.state_dir, *, timeout_s: float = 5) -> list[int]:
    """Stop the process groups ``up`` started (worker nodes first) and every process below them (job drivers
    included); returns the pids of the groups stopped."""
    state = load_state(state_dir)
    if state is None:
        return []
    ours = [pid for pid in state.pids if _ours(state, pid)]
    below = _descendants(ours)
    stopped = []
    for pid in reversed(state.pids):
        if not _ours(state, pid):
            continue
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10)):
            if not _group_alive(pid):
                break
            os.killpg(pid, sig)
            deadline = time.monotonic() + wait_s
            while _group_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
        stopped.append(pid)
    _stop_processes([p for p in below if p.is_running()], timeout_s)
    _state_file(state_dir).unlink()
    Path(state_dir, QUEUE_CLIENT_FILE).unlink(missing_ok=True)
    _forget_current_cluster(state.spec.gcs_port)
    return stopped


def _forget_current_cluster(gcs_port: int) -> None:
    """Ray remembers the last head it started in /tmp/ray/ray_current_cluster, and a later plain
    ``ray.init()`` tries to join it; after a kill that file would point at nothing."""
    marker = Path("/tmp/ray/ray_current_cluster")
    try:
        if marker.read_text().strip().endswith(f":{gcs_port}"):
            marker.unlink()
    except OSError:
        pass


def _group_has_live_member(pgid: int) -> bool:
    """A member of process group ``pgid`` that is not a zombie (a killed leader lingers as one until reaped)."""
    import psutil

    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                return True
        except (psutil.Error, ProcessLookupError):
            continue
    return False


def _group_alive(pgid: int) -> bool:
    try:
        os.waitpid(pgid, os.WNOHANG)  # reap it if this process started it, or it lingers as a zombie
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
