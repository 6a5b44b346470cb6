"""What each documented value and `enabled` branch does to the rendered manifests, and the validation
helper's messages for bad values."""

from __future__ import annotations

import base64
import json
import shlex

import pytest

from tests.deploy.conftest import CHART, REPO, of_kind, one, render, render_error

CI = CHART / "ci"
FULLNAME = "lab-labtrain"


def ray_pods(docs: list[dict]) -> dict[str, dict]:
    """Pod specs of the RayCluster by group ("head" or the worker group name)."""
    spec = one(docs, "RayCluster")["spec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec.get("workerGroupSpecs", [])})
    return pods


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def all_pod_specs(docs: list[dict]) -> dict[str, dict]:
    pods = {f"ray-{k}": v for k, v in ray_pods(docs).items()}
    for d in of_kind(docs, "Deployment"):
        pods[d["metadata"]["name"]] = d["spec"]["template"]["spec"]
    for d in of_kind(docs, "Pod"):
        pods[d["metadata"]["name"]] = d["spec"]
    return pods


# ---- optional parts: off by default, on with their values file ----------------------------------------------


def test_optional_parts_are_off_by_default(helm):
    kinds = {d["kind"] for d in render()}
    assert "PodMonitor" not in kinds
    assert "ServiceMonitor" not in kinds
    assert "ConfigMap" not in kinds
    assert "NetworkPolicy" not in kinds
    assert {"RayCluster", "Deployment", "Service", "PersistentVolumeClaim", "Secret", "Pod"} <= kinds


def test_monitoring_renders_monitors_that_select_the_exporters(helm):
    docs = render(CI / "monitoring-values.yaml")
    pod_monitor = one(docs, "PodMonitor")
    assert pod_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {"ray.io/cluster": FULLNAME}
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["interval"] == "15s"
    assert endpoint["honorLabels"] is True  # the metrics' `job` label (the training run) survives the scrape
    for name, pod in ray_pods(docs).items():
        ports = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
        assert endpoint["port"] in ports, name
    service_monitor = one(docs, "ServiceMonitor")
    queue_service = one(docs, "Service")
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= queue_service["metadata"]["labels"].items()
    assert service_monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in queue_service["spec"]["ports"]}
    assert service_monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_grafana_dashboards_ship_every_dashboard_file_as_a_configmap(helm):
    maps = of_kind(render(CI / "monitoring-values.yaml"), "ConfigMap")
    files = sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
    assert sorted(k for m in maps for k in m["data"]) == files
    for m in maps:
        assert m["metadata"]["labels"]["grafana_dashboard"] == "1"
        for name, text in m["data"].items():
            assert json.loads(text) == json.loads((CHART / "dashboards" / name).read_text())


def test_everything_optional_off(helm):
    docs = render(CI / "monitoring-off-values.yaml")
    assert {d["kind"] for d in docs} == {"RayCluster", "Pod"}
    for name, pod in all_pod_specs(docs).items():
        for c in pod["containers"]:
            assert "RAY_AUTH_MODE" not in env_of(c), (name, c["name"])


# ---- RayCluster ----------------------------------------------------------------------------------------------


def test_every_ray_pod_runs_the_exporter_on_the_shared_metrics_dir(helm):
    for name, pod in ray_pods(render(CI / "gpu-groups-values.yaml")).items():
        ray, exporter = pod["containers"]  # KubeRay takes the first container as Ray's
        assert exporter["command"] == ["labtrain", "metrics", "serve", "--port", "9400", "--dir", "/var/run/labtrain/metrics"], name
        assert env_of(ray)["LABTRAIN_METRICS_DIR"]["value"] == "/var/run/labtrain/metrics"
        mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in (ray, exporter)}
        assert mounts["ray-head" if name == "head" else "ray-worker"]["labtrain-metrics"] == "/var/run/labtrain/metrics"
        assert mounts["metrics-exporter"]["labtrain-metrics"] == "/var/run/labtrain/metrics"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["labtrain-metrics"]["emptyDir"] == {}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        assert mounts["ray-head" if name == "head" else "ray-worker"]["dshm"] == "/dev/shm"


def test_gpu_groups(helm):
    docs = render(CI / "gpu-groups-values.yaml")
    groups = {g["groupName"]: g for g in one(docs, "RayCluster")["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"a100", "rtx"}  # cpu is disabled
    a100 = groups["a100"]
    assert (a100["replicas"], a100["minReplicas"], a100["maxReplicas"]) == (2, 1, 4)
    resources = a100["rayStartParams"]["resources"]
    # KubeRay writes `--resources=<value>` into a bash command line; Ray then parses the word as JSON.
    (word,) = [w for w in shlex.split(f"ray start --resources={resources} --block") if w.startswith("--resources=")]
    assert json.loads(word.removeprefix("--resources=")) == {"labtrain_node": 1, "a100": 8}
    # The autoscaler reads the same string: one pair of quotes dropped, backslashes removed.
    assert json.loads(resources[1:-1].replace("\\", "")) == {"labtrain_node": 1, "a100": 8}
    assert a100["rayStartParams"]["object-store-memory"] == "50000000000"
    pod = a100["template"]["spec"]
    ray = pod["containers"][0]
    assert ray["image"] == "ghcr.io/example-lab/labtrain:0.1.0-cu128"
    assert ray["resources"]["limits"] == {"cpu": "32", "memory": "240Gi", "nvidia.com/gpu": 8}
    assert ray["resources"]["requests"] == ray["resources"]["limits"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]["sizeLimit"] == "64Gi"
    rtx = groups["rtx"]["template"]["spec"]["containers"][0]
    assert rtx["image"] == "ghcr.io/example-lab/labtrain:0.1.0"  # falls back to `image`
    assert rtx["resources"]["limits"]["nvidia.com/gpu"] == 2
    cpu_default = {g["groupName"]: g for g in one(render(), "RayCluster")["spec"]["workerGroupSpecs"]}["cpu"]
    assert "nvidia.com/gpu" not in cpu_default["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_gpu_groups_give_nccl_its_network_and_rdma_when_asked(helm):
    """GPU workers get NCCL's environment; without an RDMA path NCCL is told to use TCP (NCCL_IB_DISABLE=1); with
    one, each GPU container asks for the device plugin's resource, may lock memory (IPC_LOCK), names its HCA, and
    the pod joins the Multus network. CPU workers get none of it."""
    plain = ray_pods(render(CI / "gpu-groups-values.yaml"))
    a100 = plain["a100"]["containers"][0]
    env = {k: e["value"] for k, e in env_of(a100).items() if k.startswith("NCCL_")}
    assert env == {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_DEBUG": "WARN", "NCCL_IB_DISABLE": "1"}
    assert "add" not in a100["securityContext"]["capabilities"]
    rdma_docs = render(CI / "rdma-values.yaml")
    pods = ray_pods(rdma_docs)
    gpu, cpu = pods["gpu"]["containers"][0], pods["cpu"]["containers"][0]
    env = {k: e["value"] for k, e in env_of(gpu).items() if k.startswith("NCCL_")}
    assert env == {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_DEBUG": "INFO", "NCCL_IB_HCA": "mlx5"}
    for kind in ("requests", "limits"):
        assert gpu["resources"][kind] == {"cpu": "32", "memory": "240Gi", "nvidia.com/gpu": 8, "rdma/rdma_shared_device_a": 1}
    assert gpu["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert gpu["securityContext"]["allowPrivilegeEscalation"] is False
    groups = {g["groupName"]: g for g in one(rdma_docs, "RayCluster")["spec"]["workerGroupSpecs"]}
    assert groups["gpu"]["template"]["metadata"]["annotations"] == {"k8s.v1.cni.cncf.io/networks": "ib-net"}
    assert "annotations" not in groups["cpu"]["template"]["metadata"]
    assert not [k for k in env_of(cpu) if k.startswith("NCCL_")] and "rdma/rdma_shared_device_a" not in cpu["resources"]["limits"]
    assert cpu["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_vatt_base_fits_a_node_of_the_example_a100_group(helm):
    """base.yaml's needs of one node (labtrain.sizing: CPUs, memory, /dev/shm beside Ray's object store), computed
    from its settings, against the a100 pod the chart renders; and the settings it had before do not fit."""
    from jobs.vatt.config import VattConfig
    from labtrain.config import load_config
    from labtrain.sizing import NodeShape, node_plan, parse_quantity

    a100 = {g["groupName"]: g for g in one(render(CI / "gpu-groups-values.yaml"), "RayCluster")["spec"]["workerGroupSpecs"]}["a100"]
    pod = a100["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    node = NodeShape(cpus=float(limits["cpu"]), memory=parse_quantity(limits["memory"]), gpus=limits["nvidia.com/gpu"],
                     shm=parse_quantity({v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]["sizeLimit"]),
                     object_store=parse_quantity(a100["rayStartParams"]["object-store-memory"]))
    cfg = load_config(VattConfig, REPO / "jobs/vatt/configs/base.yaml")
    stored, collated = cfg.sample_bytes()
    plan = node_plan(cfg.data, cfg.run, node, stored_bytes=stored, batch_bytes_per_sample=collated)
    assert plan.problems == [] and plan.ranks == 8, plan.lines(node)
    assert plan.shm < node.shm and plan.memory < node.memory
    before = load_config(VattConfig, REPO / "jobs/vatt/configs/base.yaml", ["run.cpus_per_worker=8", "data.num_workers=8", "data.prefetch_batches=2"])
    old = node_plan(before.data, before.run, node, stored_bytes=stored, batch_bytes_per_sample=collated)
    assert [p.split(" ", 3)[:3] for p in old.problems] == [["8", "ranks", "(one"], ["each", "rank", "runs"], ["/dev/shm", "needs", "67.3"]]


def test_set_reaches_one_worker_group(helm):
    groups = one(render(sets=("workerGroups.cpu.replicas=3", "workerGroups.cpu.maxReplicas=5")), "RayCluster")["spec"]["workerGroupSpecs"]
    assert [(g["groupName"], g["replicas"], g["maxReplicas"], g["minReplicas"]) for g in groups] == [("cpu", 3, 5, 0)]


def test_autoscaling(helm):
    assert one(render(), "RayCluster")["spec"]["enableInTreeAutoscaling"] is False
    assert "autoscalerOptions" not in one(render(), "RayCluster")["spec"]
    spec = one(render(CI / "autoscaling-values.yaml"), "RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    options = spec["autoscalerOptions"]
    assert (options["upscalingMode"], options["idleTimeoutSeconds"]) == ("Conservative", 120)
    assert env_of(options)["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == f"{FULLNAME}-ray-auth"
    assert options["securityContext"]["allowPrivilegeEscalation"] is False
    queue_env = env_of(one(render(CI / "autoscaling-values.yaml"), "Deployment")["spec"]["template"]["spec"]["containers"][0])
    assert json.loads(queue_env["LABTRAIN_QUEUE_CAPACITY"]["value"]) == {"CPU": 64, "GPU": 0}  # admits before Ray scales up
    assert "LABTRAIN_QUEUE_CAPACITY" not in env_of(one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0])
    # Ray Train runs refuse a gang that no node can hold, except where the autoscaler can add one.
    head = lambda values: env_of(one(values, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0])  # noqa: E731
    # The node types the autoscaler may start, which the check reads instead of the live nodes.
    types = lambda values: json.loads(head(values)["LABTRAIN_AUTOSCALING"]["value"])  # noqa: E731
    assert types(render(CI / "autoscaling-values.yaml")) == [{"group": "cpu", "max": 8, "resources": {"CPU": 8, "labtrain_node": 1}}]
    assert types(render(CI / "autoscaling-values.yaml", CI / "gpu-groups-values.yaml")) == [
        {"group": "a100", "max": 4, "resources": {"CPU": 32, "GPU": 8, "labtrain_node": 1, "a100": 8}},
        {"group": "rtx", "max": 2, "resources": {"CPU": 16, "GPU": 2, "labtrain_node": 1}},
    ]
    assert "LABTRAIN_AUTOSCALING" not in head(render())


def test_head_exposes_the_job_api(helm):
    spec = one(render(sets=("ray.head.serviceType=LoadBalancer",)), "RayCluster")["spec"]["headGroupSpec"]
    assert spec["serviceType"] == "LoadBalancer"
    assert spec["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert {"name": "dashboard", "containerPort": 8265, "protocol": "TCP"} in spec["template"]["spec"]["containers"][0]["ports"]
    assert one(render(), "RayCluster")["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"


# ---- Ray token auth --------------------------------------------------------------------------------------------


def test_ray_token_reaches_every_job_api_client(helm):
    docs = render()
    secret = [s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == f"{FULLNAME}-ray-auth"][0]
    assert len(base64.b64decode(secret["data"]["token"])) == 40
    pods = all_pod_specs(docs)
    assert set(pods) == {"ray-head", "ray-cpu", f"{FULLNAME}-queue", f"{FULLNAME}-test"}
    for name, pod in pods.items():
        env = env_of(pod["containers"][0])
        assert env["RAY_AUTH_MODE"]["value"] == "token", name
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-ray-auth", "key": "token"}, name


def test_ray_token_from_an_existing_secret_or_value(helm):
    docs = render(sets=("rayAuth.existingSecret=lab-ray-token", "rayAuth.secretKey=tok"))
    assert f"{FULLNAME}-ray-auth" not in {s["metadata"]["name"] for s in of_kind(docs, "Secret")}
    env = env_of(ray_pods(docs)["head"]["containers"][0])
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "lab-ray-token", "key": "tok"}
    docs = render(sets=("rayAuth.token=0123456789abcdef0123",))
    secret = [s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == f"{FULLNAME}-ray-auth"][0]
    assert base64.b64decode(secret["data"]["token"]) == b"0123456789abcdef0123"


# ---- the queue -----------------------------------------------------------------------------------------------


def test_queue_deployment_points_at_the_job_api(helm):
    docs = render(CI / "gpu-groups-values.yaml")
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (queue,) = pod["containers"]
    assert queue["command"] == ["python", "-m", "labtrain.queue", "serve", "--host", "0.0.0.0", "--port", "8000"]
    env = env_of(queue)
    assert env["LABTRAIN_QUEUE_RAY_ADDRESS"]["value"] == f"http://{FULLNAME}-head-svc.lab.svc:8265"
    assert env["LABTRAIN_QUEUE_DB"]["value"] == "/var/lib/labtrain-queue/queue.db"
    assert env["LABTRAIN_QUEUE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-queue", "key": "admin-token"}
    assert env["LABTRAIN_QUEUE_USERS_FILE"]["value"] == "/etc/labtrain-queue/users.yaml"
    for probe in ("livenessProbe", "readinessProbe"):
        assert queue[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in queue["ports"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    assert one(docs, "PersistentVolumeClaim")["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert deployment["spec"]["replicas"] == 1
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_queue_completion_records_live_where_the_jobs_drivers_write_them(helm):
    """Exactly once across a cluster restart needs the run's record where both the Ray head (the driver
    writes it) and the queue's pod (it reads it) reach: the S3 storage root, or the shared claim mounted in
    both; with neither, records are off rather than written to one pod's own disk."""
    def queue_pod(docs):
        return one(docs, "Deployment")["spec"]["template"]["spec"]

    pod = queue_pod(render(CI / "network-policy-values.yaml"))  # S3 on MinIO (and a claim)
    env = env_of(pod["containers"][0])
    assert env["LABTRAIN_QUEUE_DONE_DIR"]["value"] == "s3://lab-runs/labtrain/queue/done"
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage.svc:9000"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "lab-s3", "key": "AWS_SECRET_ACCESS_KEY"}

    docs = render(sets=("storage.existingClaim=lab-nfs",))
    pod = queue_pod(docs)
    (queue,) = pod["containers"]
    assert env_of(queue)["LABTRAIN_QUEUE_DONE_DIR"]["value"] == "/mnt/labtrain/queue/done"
    assert {"name": "storage", "mountPath": "/mnt/labtrain"} in queue["volumeMounts"]
    assert {v["name"]: v for v in pod["volumes"]}["storage"]["persistentVolumeClaim"]["claimName"] == "lab-nfs"
    assert env_of(ray_pods(docs)["head"]["containers"][0])["LABTRAIN_STORAGE_ROOT"]["value"] == "/mnt/labtrain"

    for sets in ((), ("storage.root=/data/runs",)):  # no storage the queue's pod shares
        env = env_of(queue_pod(render(sets=sets))["containers"][0])
        assert env["LABTRAIN_QUEUE_DONE_DIR"]["value"] == "off" and "AWS_ENDPOINT_URL" not in env, sets


def test_queue_users_file_is_what_the_queue_loads(helm, tmp_path):
    from labtrain.queue.spec import load_users_file

    docs = render(CI / "gpu-groups-values.yaml")
    users_secret = [s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == f"{FULLNAME}-queue-users"][0]
    path = tmp_path / "users.yaml"
    path.write_text(users_secret["stringData"]["users.yaml"])
    users = load_users_file(path)
    assert [(u.name, u.group, u.share) for u in users.users] == [("alice", "vision", 2.0), ("bob", "vision", 1.0), ("carol", "audio", 1.0)]
    assert (users.users[0].quotas.gpus, users.users[0].quotas.cpus, users.users[0].quotas.jobs) == (16, 128, 4)
    assert users.users[2].admin is True
    assert [(g.name, g.quotas.gpus) for g in users.groups] == [("vision", 16)]
    mount = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"][0]
    assert mount["secret"]["secretName"] == users_secret["metadata"]["name"]


def test_queue_users_from_an_existing_secret(helm):
    docs = render(sets=("queue.usersSecret=lab-users",))
    assert f"{FULLNAME}-queue-users" not in {s["metadata"]["name"] for s in of_kind(docs, "Secret")}
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["users"]["secret"]["secretName"] == "lab-users"


def test_queue_on_postgresql(helm):
    docs = render(CI / "postgresql-values.yaml")
    assert not of_kind(docs, "PersistentVolumeClaim")
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
    assert env["LABTRAIN_QUEUE_DB"]["valueFrom"]["secretKeyRef"] == {"name": "labtrain-queue-db", "key": "url"}
    assert "data" not in {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}


def test_queue_disabled(helm):
    docs = render(sets=("queue.enabled=false",))
    assert not of_kind(docs, "Deployment") and not of_kind(docs, "Service") and not of_kind(docs, "PersistentVolumeClaim")
    assert {s["metadata"]["name"] for s in of_kind(docs, "Secret")} == {f"{FULLNAME}-ray-auth"}


# ---- S3 and storage ------------------------------------------------------------------------------------------


def test_s3_settings_reach_every_ray_pod(helm):
    docs = render(CI / "network-policy-values.yaml")
    for name, pod in ray_pods(docs).items():
        env = env_of(pod["containers"][0])
        assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage.svc:9000", name
        assert env["AWS_DEFAULT_REGION"]["value"] == "us-east-1"
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "lab-s3", "key": "AWS_ACCESS_KEY_ID"}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "lab-s3", "key": "AWS_SECRET_ACCESS_KEY"}
        assert "LABTRAIN_S3_CONFIG" not in env  # read by no code: S3 settings are the AWS variables and each config's s3 section
        assert env["LABTRAIN_STORAGE_ROOT"]["value"] == "s3://lab-runs/labtrain"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["storage"]["persistentVolumeClaim"]["claimName"] == "lab-datasets"
        assert {"name": "storage", "mountPath": "/mnt/labtrain"} in pod["containers"][0]["volumeMounts"]


def test_no_s3_settings_by_default_and_explicit_storage_root(helm):
    env = env_of(ray_pods(render())["head"]["containers"][0])
    assert not {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "LABTRAIN_S3_CONFIG", "LABTRAIN_STORAGE_ROOT"} & set(env)
    env = env_of(ray_pods(render(sets=("storage.root=/mnt/labtrain/runs",)))["cpu"]["containers"][0])
    assert env["LABTRAIN_STORAGE_ROOT"]["value"] == "/mnt/labtrain/runs"
    env = env_of(ray_pods(render(sets=("storage.existingClaim=lab-nfs",)))["cpu"]["containers"][0])
    assert env["LABTRAIN_STORAGE_ROOT"]["value"] == "/mnt/labtrain"  # a shared claim is where checkpoints go


# ---- security --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, CI / "gpu-groups-values.yaml", CI / "autoscaling-values.yaml"], ids=["default", "gpu", "autoscaling"])
def test_pods_run_as_non_root_without_privilege_escalation(helm, values):
    for name, pod in all_pod_specs(render(*([values] if values else []))).items():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        # Only the head of an autoscaling cluster needs its token: the autoscaler runs there.
        assert pod["automountServiceAccountToken"] is (name == "ray-head" and values == CI / "autoscaling-values.yaml"), name
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            expected_read_only = not c["name"].startswith("ray-")  # Ray writes under $HOME; see ray.readOnlyRootFilesystem
            assert c["securityContext"]["readOnlyRootFilesystem"] is expected_read_only, (name, c["name"])


def test_network_policy_lets_only_the_queue_and_clients_reach_the_job_api(helm):
    docs = render(CI / "network-policy-values.yaml")
    policies = {p["metadata"]["name"]: p for p in of_kind(docs, "NetworkPolicy")}
    head = policies[f"{FULLNAME}-head"]
    assert head["spec"]["podSelector"]["matchLabels"] == {"ray.io/cluster": FULLNAME, "ray.io/node-type": "head"}
    job_api_rules = [r for r in head["spec"]["ingress"] if any(p["port"] == 8265 for p in r.get("ports", []))]
    (rule,) = job_api_rules
    queue_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    test_labels = one(docs, "Pod")["metadata"]["labels"]
    selectors = [peer["podSelector"]["matchLabels"] for peer in rule["from"] if "podSelector" in peer]
    assert any(s.items() <= queue_labels.items() for s in selectors)
    assert any(s.items() <= test_labels.items() for s in selectors)
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "notebooks"}}} in rule["from"]
    # Every other rule either names ports other than 8265 or admits only the cluster's own pods.
    for other in head["spec"]["ingress"]:
        if other is not rule and "ports" not in other:
            assert other["from"] == [{"podSelector": {"matchLabels": {"ray.io/cluster": FULLNAME}}}]
    assert f"{FULLNAME}-workers" in policies and f"{FULLNAME}-queue" in policies


def test_helm_test_pod_checks_queue_and_job_api(helm):
    pod = one(render(), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (check,) = pod["spec"]["containers"]
    env = env_of(check)
    assert env["QUEUE_URL"]["value"] == f"http://{FULLNAME}-queue.lab.svc:8000"
    assert env["JOB_API_URL"]["value"] == f"http://{FULLNAME}-head-svc.lab.svc:8265"
    script = check["command"][-1]
    assert '"/healthz"' in script and '"/api/jobs/"' in script
    compile(script, "helm-test", "exec")
    assert '"/healthz"' not in one(render(sets=("queue.enabled=false",)), "Pod")["spec"]["containers"][0]["command"][-1]


# ---- the validation helper ---------------------------------------------------------------------------------------

BAD_VALUES = [
    (("image.repository=",), "labtrain: workerGroups.cpu has no image: set workerGroups.cpu.image or image.repository"),
    (("image.repository=", "workerGroups.cpu.image=x:1"), "labtrain: image.repository is empty"),
    (("workerGroups.cpu.replicas=-1",), "labtrain: workerGroups.cpu.replicas must be a whole number >= 0, got -1"),
    (("workerGroups.cpu.maxReplicas=2.5",), "labtrain: workerGroups.cpu.maxReplicas must be a whole number >= 0, got 2.5"),
    (("workerGroups.cpu.gpu=-2",), "labtrain: workerGroups.cpu.gpu must be a whole number >= 0, got -2"),
    (("workerGroups.cpu.minReplicas=3",), "labtrain: workerGroups.cpu needs minReplicas <= replicas <= maxReplicas, got 3 <= 1 <= 4"),
    (("workerGroups.cpu.replicas=9",), "labtrain: workerGroups.cpu needs minReplicas <= replicas <= maxReplicas, got 0 <= 9 <= 4"),
    (("workerGroups.cpu.memory=",), "labtrain: workerGroups.cpu.memory is not set"),
    (("workerGroups.cpu.cpu=500m",), 'labtrain: workerGroups.cpu.cpu must be a whole number of CPUs like "8"'),
    (("workerGroups.gpu.gpu=8",), "labtrain: workerGroups.gpu.replicas is not set"),
    (("workerGroups.GPU_big.replicas=1",), 'labtrain: worker group name "GPU_big" must be a DNS label'),
    (("ray.version=latest",), 'labtrain: ray.version must be a Ray release like 2.60.0, got "latest"'),
    (("ray.autoscaling.upscalingMode=Fast",), "labtrain: ray.autoscaling.upscalingMode must be Conservative, Default or Aggressive"),
    (("queue.database.type=mysql",), 'labtrain: queue.database.type must be sqlite or postgresql, got "mysql"'),
    (("queue.database.type=postgresql",), "labtrain: queue.database.postgresql.existingSecret is empty"),
    (("queue.replicas=2",), "labtrain: queue.replicas is 2 but the queue's dispatcher must be the only one"),
    (("ray.autoscaling.enabled=true",), "labtrain: ray.autoscaling.enabled needs queue.capacity"),
    (("queue.adminToken.value=short",), "labtrain: queue.adminToken.value must be at least 16 characters"),
    (("queue.users[0].group=vision",), "labtrain: queue.users[0] needs a name"),
    (("queue.users[0].name=Alice Smith",), "labtrain: queue.users[0] needs a name"),
    (("queue.users[0].name=alice", "queue.users[0].share=0"), "labtrain: queue.users[0] (alice): share must be > 0, got 0"),
    (("queue.users[0].name=alice", "queue.users[0].quotas.gpus=-1"), "labtrain: queue.users[0] (alice): quotas.gpus must be >= 0, got -1"),
    (("queue.users[0].name=alice", "queue.users[0].quotas.tpus=1"), 'labtrain: queue.users[0] (alice): unknown quota "tpus"'),
]


@pytest.mark.parametrize("sets, message", BAD_VALUES, ids=[m.split(": ", 1)[1][:40] for _, m in BAD_VALUES])
def test_bad_values_fail_with_the_helpers_message(helm, sets, message):
    assert message in render_error(sets=sets)


def test_bad_values_in_a_values_file(helm, tmp_path):
    from tests.deploy.conftest import write_values

    path = write_values(tmp_path, {"workerGroups": {"gpu": {"replicas": -1, "minReplicas": 0, "maxReplicas": 2, "gpu": 1, "cpu": "4", "memory": "8Gi", "shmSize": "1Gi"}}})
    assert "labtrain: workerGroups.gpu.replicas must be a whole number >= 0, got -1" in render_error(path)
    path = write_values(tmp_path, {"workerGroups": {"gpu": {"replicas": "two", "minReplicas": 0, "maxReplicas": 2, "gpu": 1, "cpu": "4", "memory": "8Gi", "shmSize": "1Gi"}}})
    assert "labtrain: workerGroups.gpu.replicas must be a whole number >= 0, got two (string)" in render_error(path)


def test_disabled_group_is_not_validated(helm):
    docs = render(sets=("workerGroups.cpu.enabled=false", "workerGroups.cpu.replicas=-1"))
    assert "workerGroupSpecs" not in one(docs, "RayCluster")["spec"] or not one(docs, "RayCluster")["spec"]["workerGroupSpecs"]


def test_every_value_is_documented():
    """KubeRay's convention: every value has a `# --` comment above it, or sits in a map documented as a whole."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- "):
            continue
        indent = len(line) - len(stripped)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1
        documented = j >= 0 and lines[j].strip().startswith("# --") or any(d for _, d in stack)
        is_section = stripped.endswith(":")
        if not documented and not is_section:
            undocumented.append(f"line {i + 1}: {stripped}")
        stack.append((indent, documented))
    assert not undocumented, undocumented
