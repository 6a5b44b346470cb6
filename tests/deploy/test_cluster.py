"""cluster/: the `ray up` config (Ray's own validation), the Prometheus config (promtool), and the Grafana
dashboards (one copy, in the chart; their PromQL checked by promtool and their metric names found in the code)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import CHART, REPO

CLUSTER = REPO / "cluster"
DASHBOARDS = CHART / "dashboards"


def promtool(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is missing: `make tools` installs Debian's prometheus package")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)


def test_prometheus_config_is_valid():
    result = promtool("check", "config", str(CLUSTER / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rejects_a_broken_config(tmp_path):
    bad = yaml.safe_load((CLUSTER / "prometheus" / "prometheus.yml").read_text())
    bad["scrape_configs"][0]["scrape_interval"] = "often"
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(bad))
    assert promtool("check", "config", str(path)).returncode != 0


def test_prometheus_scrapes_exporters_and_queue():
    jobs = {j["job_name"]: j for j in yaml.safe_load((CLUSTER / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]}
    nodes = [t for sc in jobs["labtrain-nodes"]["static_configs"] for t in sc["targets"]]
    assert "127.0.0.1:9400" in nodes and "127.0.0.1:9401" in nodes  # labtrain cluster up
    lab = yaml.safe_load((CLUSTER / "ray-up" / "lab.yaml").read_text())["provider"]
    assert {f"{ip}:9400" for ip in [lab["head_ip"], *lab["worker_ips"]]} <= set(nodes)
    assert f"{lab['head_ip']}:8000" in jobs["labtrain-queue"]["static_configs"][0]["targets"]


def _ray_up_config() -> dict:
    return yaml.safe_load((CLUSTER / "ray-up" / "lab.yaml").read_text())


def test_ray_up_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _ray_up_config()
    assert config["provider"]["type"] == "local"
    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["available_node_types"]["local.cluster.node"]["max_workers"] == len(config["provider"]["worker_ips"])
    bad = copy.deepcopy(config)
    bad["docker"]["gpus"] = "all"
    with pytest.raises(jsonschema.ValidationError, match="gpus"):
        validate_config(prepare_config(bad))


def test_ray_up_nodes_get_gpus_token_auth_exporter_and_queue():
    config = _ray_up_config()
    options = " ".join(config["docker"]["run_options"])
    assert "--gpus all" in options and "--shm-size=" in options and "RAY_AUTH_MODE=token" in options
    assert "~/.ray/auth_token" in config["file_mounts"]
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        text = "\n".join(commands)
        assert 'labtrain metrics serve --port 9400 --dir "$LABTRAIN_METRICS_DIR"' in text
    head = "\n".join(config["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" in head
    assert "python -m labtrain.queue serve --host 0.0.0.0 --port 8000" in head and "LABTRAIN_QUEUE_ADMIN_TOKEN=" in head
    assert "labtrain_node" in "\n".join(config["worker_start_ray_commands"])


def test_example_users_file_loads():
    from labtrain.queue.spec import load_users_file

    users = load_users_file(CLUSTER / "users.example.yaml")
    assert [u.name for u in users.users] == ["alice", "bob", "carol"]


def test_dashboards_have_one_copy_in_the_chart():
    link = CLUSTER / "grafana" / "dashboards"
    assert link.is_symlink() and link.resolve() == DASHBOARDS.resolve()
    assert sorted(p.name for p in DASHBOARDS.glob("*.json")) == ["queue.json", "training.json"]
    copies = [p for p in CLUSTER.rglob("*.json") if not p.resolve().is_relative_to(DASHBOARDS.resolve())]
    assert not copies, copies
    provider = yaml.safe_load((CLUSTER / "grafana" / "provisioning" / "dashboards" / "labtrain.yaml").read_text())
    assert provider["providers"][0]["options"]["path"].endswith("/dashboards")


def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_dashboard_queries_are_valid_promql(tmp_path):
    rules = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for i, expr in enumerate(_exprs(json.loads(path.read_text()))):
            rules.append({"record": f"labtrain:{path.stem}:{i}", "expr": expr.replace("$job", ".*")})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(rules) >= 15


def _declared_metrics() -> set[str]:
    """labtrain_* metric names declared in the code (counters get _total on export)."""
    sources = [REPO / "platform" / "labtrain" / "metrics.py", *REPO.glob("platform/labtrain/queue/*.py"), *REPO.glob("jobs/*/*.py")]
    names = set()
    for path in sources:
        text = path.read_text()
        names |= set(re.findall(r'"(labtrain_[a-z_]+)"', text))
    # A job's own signals: session.log(step, name=...) in jobs/<kind>/train.py, directly or through a `signals`
    # dict, become the gauge labtrain_<kind>_<name> (labtrain.train.logger).
    for train in REPO.glob("jobs/*/train.py"):
        kind, logged = train.parent.name, set()
        for line in train.read_text().splitlines():
            if "signals" in line or "session.log(" in line:
                logged |= set(re.findall(r'"([a-z_]+)": ', line)) | set(re.findall(r"\b([a-z_]+)=", line))
        names |= {f"labtrain_{kind}_{n}" for n in logged - {"loss"}}
    # VATT's gauges come from its objective's StepStats.signals(): ask it, with every optional field measured.
    import torch

    from jobs.vatt.losses import StepStats

    full = StepStats(torch.tensor(1.0), torch.tensor(1.0), cos=torch.zeros(2), losses=torch.zeros(2), w_va=torch.ones(2), w_vt=torch.ones(2))
    names |= {f"labtrain_vatt_{n}" for n in full.signals()}
    return names


@pytest.mark.parametrize("dashboard, expected", [
    ("training.json", {"labtrain_train_samples", "labtrain_train_step_seconds", "labtrain_train_data_wait_seconds", "labtrain_train_loss", "labtrain_vatt_conflict_rate"}),
    ("queue.json", {"labtrain_queue_waiting_jobs", "labtrain_queue_wait_seconds", "labtrain_queue_fair_share_usage", "labtrain_queue_admitted_gpus", "labtrain_queue_admitted_cpus", "labtrain_queue_preemptions", "labtrain_queue_dispatch_errors"}),
])
def test_dashboards_use_the_real_metric_names(dashboard, expected):
    used = set()
    for expr in _exprs(json.loads((DASHBOARDS / dashboard).read_text())):
        used |= {re.sub(r"_(total|bucket|count|sum)$", "", m) for m in re.findall(r"labtrain_[a-z_]+", expr)}
    assert expected <= used
    unknown = used - _declared_metrics()
    assert not unknown, f"{dashboard} uses metrics no code declares: {unknown}"
