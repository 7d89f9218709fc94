"""deploy/ validated offline: every YAML parses, Kustomize renders, the KEDA ScaledObject scales the worker
Deployment on the exporter's backlog, probes and grace periods fit the worker, compose services point at
files that exist, and dashboards and alerts use only metric names shared/metrics.py defines."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
import torch  # noqa: E402

from shared import metrics  # noqa: E402
from shared.logs import JSON_ENV, NODE_ENV  # noqa: E402
from shared.settings import Settings  # noqa: E402
from workers.supervisor import PARENT_ENV  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REPO = DEPLOY.parent
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yaml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
# LANDMARKS_* variables read outside shared/settings.py.
EXTRA_ENV = {metrics.PORT_ENV, metrics.ADDR_ENV, JSON_ENV, "LANDMARKS_LIVENESS_MAX_BATCH_S", "LANDMARKS_BACKFILL_QUEUE",
             "LANDMARKS_API_TOKEN_KEY", "LANDMARKS_API_USER_HEADER"}
KNOWN_ENV = {f"LANDMARKS_{name.upper()}" for name in Settings.model_fields} | EXTRA_ENV
# Set by the supervisor for the workers it starts, or read by the bench only: nothing an operator sets.
INTERNAL_ENV = {NODE_ENV, PARENT_ENV, "LANDMARKS_REALDATA"}
README = REPO / "README.md"
RUNBOOK = DEPLOY / "README.md"


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and "demo" not in p.parts)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s_objects() -> list[dict]:
    """The base kustomization's objects: rendered by kubectl when it is installed, else read from the files
    its `resources` list (the rendering test below checks both agree)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objects = [d for res in kustomization["resources"] for d in _docs(K8S / res)]
    for obj in objects:
        obj.setdefault("metadata", {}).setdefault("namespace", kustomization["namespace"])
    return objects


def _one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _worker(objects: list[dict]) -> dict:
    return _one(objects, "Deployment", "landmarks-worker")


def _container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _image_init() -> list[str]:
    """The init process of the image's ENTRYPOINT (`tini --`), which a container's own command must keep."""
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", (DEPLOY / "docker" / "Dockerfile").read_text(),
                                      re.M).group(1))
    return entrypoint[:entrypoint.index("--") + 1]


def _runbook_commands() -> list[str]:
    """The shell lines of deploy/README.md's code blocks, continuation lines joined."""
    blocks = re.findall(r"^ *```sh\n(.*?)^ *```", RUNBOOK.read_text(), re.M | re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip()]


def _selects(selector: str, labels: dict) -> bool:
    """kubectl's equality-based label selector (`a=b,c=d`)."""
    return all(labels.get(k) == v for k, v in (term.split("=", 1) for term in selector.split(",")))


def _metric_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    return set(re.findall(r"\blandmarks_[a-zA-Z0-9_]+", without_strings))


def _selectors(expr: str, metric: str) -> list[list[tuple[str, str, str]]]:
    """The label matchers (name, op, value) of each `metric{...}` selector in a PromQL expression."""
    return [re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', body)
            for body in re.findall(rf"\b{metric}\{{([^}}]*)\}}", expr)]


def _selects_series(matchers: list[tuple[str, str, str]], labels: dict[str, str]) -> bool:
    """PromQL's matching: a missing label is the empty string, regular expressions are anchored."""
    tests = {"=": lambda have, want: have == want, "!=": lambda have, want: have != want,
             "=~": lambda have, want: re.fullmatch(want, have) is not None,
             "!~": lambda have, want: re.fullmatch(want, have) is None}
    return all(tests[op](labels.get(name, ""), value) for name, op, value in matchers)


# --- every file ----------------------------------------------------------------------------------

def test_deploy_has_the_promised_files():
    for rel in ("README.md", "docker/Dockerfile", "docker-compose.yaml", "prometheus/prometheus.yml",
                "prometheus/alerts.yml", "k8s/kustomization.yaml", "k8s/monitoring/kustomization.yaml"):
        assert (DEPLOY / rel).is_file(), rel
    assert DASHBOARDS


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path):
    assert _docs(path), f"{path} is empty"


# --- Kubernetes ----------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) is not installed")
@pytest.mark.parametrize("folder", [K8S, K8S / "monitoring"], ids=["base", "monitoring"])
def test_kustomize_renders(folder):
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert all(d["metadata"].get("namespace") == "landmarks" for d in rendered if d["kind"] != "Namespace")
    if folder == K8S:
        assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == \
            sorted((d["kind"], d["metadata"]["name"]) for d in _k8s_objects())
        images = {c["image"] for d in rendered if d["kind"] in ("Deployment", "Job")
                  for c in d["spec"]["template"]["spec"]["containers"]}
        assert len(images) == 1 and images.pop().endswith(":0.1.0")  # one image, pinned by the kustomization


def test_keda_scales_the_worker_deployment_on_waiting_plus_reserved():
    objects = _k8s_objects()
    scaled = _one(objects, "ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    worker = _one(objects, "Deployment", target["name"])
    assert worker is _worker(objects)
    # KEDA owns .spec.replicas: a value here would reset the fleet at every `kubectl apply -k deploy/k8s`.
    assert "replicas" not in worker["spec"], "the ScaledObject's target must not set replicas"
    assert scaled["metadata"]["namespace"] == worker["metadata"]["namespace"]
    low, high = scaled["spec"].get("minReplicaCount", 0), scaled["spec"]["maxReplicaCount"]
    assert 0 <= low <= high
    assert low <= scaled["spec"]["fallback"]["replicas"] <= high  # what KEDA holds when Redis is unreadable
    triggers = scaled["spec"]["triggers"]
    assert not [t for t in triggers if t["type"] == "redis"], "the redis-list scaler misses reserved events"
    (trigger,) = [t for t in triggers if t["type"] == "metrics-api"]
    meta = trigger["metadata"]
    assert meta["valueLocation"] == "backlog" and float(meta["targetValue"]) > 0
    # The URL names the exporter's Service, its port and the /backlog route of shared/metrics.py.
    match = re.fullmatch(r"http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc(?:\.cluster\.local)?:(\d+)/backlog", meta["url"])
    assert match, meta["url"]
    service = _one(objects, "Service", match.group(1))
    assert match.group(2) == service["metadata"]["namespace"]
    assert int(match.group(3)) in {p["port"] for p in service["spec"]["ports"]}
    exporter = _one(objects, "Deployment", "landmarks-backlog-exporter")
    labels = exporter["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert _container(exporter)["command"] == [*_image_init(), "python", "-m", "shared.metrics"]


def test_a_command_replacing_the_images_entrypoint_keeps_tini_as_pid_1():
    """Python as PID 1 ignores SIGTERM: every rollout or `docker compose stop` would wait out the grace period."""
    init = _image_init()
    assert init == ["tini", "--"]
    for obj in _k8s_objects():
        if obj["kind"] in ("Deployment", "Job"):
            for container in obj["spec"]["template"]["spec"]["containers"]:
                if "command" in container:
                    assert container["command"][:len(init)] == init, (obj["metadata"]["name"], container["command"])
    for name, service in yaml.safe_load(COMPOSE.read_text())["services"].items():
        if service.get("build") and service.get("entrypoint") is not None:
            assert service["entrypoint"][:len(init)] == init, (name, service["entrypoint"])


def test_the_exporters_probes_wait_longer_than_its_check():
    """/readyz pings Redis for up to CHECK_TIMEOUT_S; at Kubernetes' default 1 s timeout a slow broker (or a
    scrape reading the backlog meanwhile) would take the exporter out of its Service, and KEDA to fallback."""
    from shared.health import CHECK_TIMEOUT_S
    container = _container(_one(_k8s_objects(), "Deployment", "landmarks-backlog-exporter"))
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("livenessProbe", "readinessProbe"):
        timeout = container[probe].get("timeoutSeconds", 1)  # Kubernetes' default
        assert timeout > CHECK_TIMEOUT_S, f"{probe}: timeoutSeconds {timeout}"


def _config(objects: list[dict]) -> dict:
    return _one(objects, "ConfigMap", "landmarks-config")["data"]


def test_worker_deployment_has_a_gpu_probes_and_a_grace_longer_than_a_batch():
    from shared.health import CHECK_TIMEOUT_S
    from workers.supervisor_http import ASK_TIMEOUT_S
    from workers.tasks import INFRA_RETRY_S
    objects = _k8s_objects()
    worker = _worker(objects)
    pod = worker["spec"]["template"]["spec"]
    container = _container(worker)
    assert container["args"] == ["worker"]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    config = _config(objects)
    port = int(config[metrics.PORT_ENV])
    assert {"name": "metrics", "containerPort": port} in container["ports"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Not /readyz: a pod started during an outage, or before the first publish, would restart in a loop.
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ("metrics", port)
        # Longer than an answer may take: a worker's checks, or the supervisor asking each of its workers.
        timeout = container[probe].get("timeoutSeconds", 1)  # Kubernetes' default
        assert timeout > max(CHECK_TIMEOUT_S, ASK_TIMEOUT_S), f"{probe}: timeoutSeconds {timeout}"
    # The longest the batches running at a SIGTERM take: each decode process fetches ceil(batch / processes)
    # photos one after another, each up to the fetch timeout; the batches in flight share the processes;
    # then a minute of infrastructure retries.
    defaults = Settings.model_fields
    batch = int(config.get("LANDMARKS_BATCH_SIZE", defaults["batch_size"].default))
    in_flight = int(config.get("LANDMARKS_BATCHES_IN_FLIGHT", defaults["batches_in_flight"].default))
    decoders = int(config["LANDMARKS_DECODE_WORKERS"])
    assert decoders >= 1, "the grace period is sized on the decode processes the ConfigMap sets"
    fetches_in_a_row = math.ceil(batch / decoders)
    longest_batch = INFRA_RETRY_S + in_flight * fetches_in_a_row * float(config["LANDMARKS_FETCH_TIMEOUT_S"])
    grace = pod["terminationGracePeriodSeconds"]
    visibility = int(config["LANDMARKS_VISIBILITY_TIMEOUT_S"])
    liveness_limit = int(config["LANDMARKS_LIVENESS_MAX_BATCH_S"])
    assert longest_batch < grace < visibility
    assert longest_batch < liveness_limit < visibility
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert worker["metadata"]["labels"] and \
        worker["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)


def test_the_release_runbook_runs_the_migration_job_alone_and_waits_for_it():
    """One `apply -k` would roll the Job and the new workers at once, and fail on the immutable pod template of
    the previous Job: the runbook deletes it, applies the Job alone, waits for it, then applies the rest."""
    job = _one(_k8s_objects(), "Job")
    name, labels = job["metadata"]["name"], job["metadata"]["labels"]
    for text in (RUNBOOK.read_text(), (K8S / "base" / "migrate-job.yaml").read_text()):
        lines = [line.strip(" #") for line in text.splitlines()]
        steps = [next((i for i, line in enumerate(lines) if re.search(pattern, line)), None) for pattern in (
            rf"kubectl -n landmarks delete job {name} ",
            r"kubectl kustomize deploy/k8s \| kubectl apply -l \S+ -f -",
            rf"kubectl -n landmarks wait --for=condition=complete job/{name} --timeout=",
            r"^kubectl apply -k deploy/k8s(\s|$)")]
        assert None not in steps and steps == sorted(steps), steps
        selector = re.search(r"kubectl apply -l (\S+) -f -", lines[steps[1]]).group(1)
        selected = [o for o in _k8s_objects() if _selects(selector, o["metadata"].get("labels", {}))]
        assert [(o["kind"], o["metadata"]["name"]) for o in selected] == [("Job", name)], selector
        assert _selects(selector, labels)


def test_the_outage_runbook_says_how_to_pin_the_fleet_and_unpin_it():
    scaled = _one(_k8s_objects(), "ScaledObject")["metadata"]["name"]
    commands = _runbook_commands()
    pause = [c for c in commands if f"annotate scaledobject {scaled} " in c
             and re.search(r"autoscaling\.keda\.sh/paused-replicas=\S", c)]
    resume = [c for c in commands if f"annotate scaledobject {scaled} " in c
              and re.search(r"autoscaling\.keda\.sh/paused-replicas-(\s|$)", c)]
    assert pause and resume
    assert all("-n landmarks" in c for c in pause + resume)
    assert f"get deployment {_worker(_k8s_objects())['metadata']['name']}" in pause[0]  # pinned at its size


def test_the_local_fleet_runbook_sets_the_photo_folder_before_up():
    """A volume's source is read when `up` creates the containers: set only on a later `docker compose run`, the
    photos reach that one container, and every photo it enqueues fails in the workers."""
    compose = yaml.safe_load(COMPOSE.read_text())
    mounted = {name for service in compose["services"].values() for volume in service.get("volumes", [])
               for name in re.findall(r"\$\{(\w+)", volume)}
    assert "LANDMARKS_PHOTOS" in mounted
    block = RUNBOOK.read_text().split("## Local fleet (docker compose)", 1)[1].split("```sh\n", 1)[1].split("```")[0]
    lines = block.splitlines()
    up = next(i for i, line in enumerate(lines) if "docker compose up" in line)
    for variable in mounted:
        assert not [line for line in lines if re.match(rf"\s*{variable}=\S* docker compose", line)], variable
        assert any(re.search(rf"{variable}=.*>> \.env|export {variable}=", line) for line in lines[:up]), variable


def _local_fleet_lines() -> list[str]:
    """The local-fleet runbook's commands up to (not including) `docker compose up`."""
    block = RUNBOOK.read_text().split("## Local fleet (docker compose)", 1)[1].split("```sh\n", 1)[1].split("```")[0]
    lines = block.splitlines()
    return lines[:next(i for i, line in enumerate(lines) if "docker compose up" in line)]


def test_the_local_fleet_runbook_sets_every_required_variable_before_up():
    """A `${VAR:?…}` stops every `docker compose` command until VAR is set: the runbook must set each one."""
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text()))
    assert {"GRAFANA_ADMIN_PASSWORD", "LANDMARKS_EVENT_SIGNING_KEY"} <= required
    before_up = _local_fleet_lines()
    for variable in required:
        assert any(re.search(rf"{variable}=.*>> \.env", line) for line in before_up), variable


def test_compose_keeps_grafana_and_prometheus_on_this_host_with_a_password_of_its_own():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in ("grafana", "prometheus"):
        ports = services[name]["ports"]
        assert ports and all(str(port).startswith("127.0.0.1:") for port in ports), (name, ports)
    # Required, no default: Grafana would otherwise create its admin with a password everyone knows.
    password = services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", password), password


def _k8s_variables(container: dict, objects: list[dict]) -> set[str]:
    """The variables a container is given: its env entries and every key of the objects it takes whole."""
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            names |= set(_one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            names |= set(_one(objects, "Secret", source["secretRef"]["name"])["stringData"])
    return names


def _env_file_keys(path: Path) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {name: value for name, value in pairs}


# Would let whoever takes over the internet-facing API enqueue events (signed ones) for every worker.
KEPT_FROM_THE_API = {"LANDMARKS_BROKER_URL", "LANDMARKS_EVENT_SIGNING_KEY"}
API_NEEDS = {"LANDMARKS_DATABASE_URL", "LANDMARKS_API_TOKEN_KEY"}


def test_the_api_gets_neither_the_broker_url_nor_the_event_signing_key():
    objects = _k8s_objects()
    api = _k8s_variables(_container(_one(objects, "Deployment", "landmarks-api")), objects)
    assert API_NEEDS <= api and not api & KEPT_FROM_THE_API, api & KEPT_FROM_THE_API
    assert KEPT_FROM_THE_API <= _k8s_variables(_container(_worker(objects)), objects)
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    fleet_env = set(_env_file_keys(DEPLOY / "fleet.env.example"))

    def compose_variables(name: str) -> set[str]:
        files = services[name].get("env_file", [])
        return set(services[name].get("environment", {})) | (fleet_env if files else set())

    assert [f["path"] for f in services["api"]["env_file"]] == ["fleet.env"]
    assert API_NEEDS <= compose_variables("api")
    assert not compose_variables("api") & KEPT_FROM_THE_API, compose_variables("api") & KEPT_FROM_THE_API
    assert KEPT_FROM_THE_API <= compose_variables("worker-0")


def test_example_secrets_leave_every_key_empty_and_an_empty_key_stops_its_process(monkeypatch):
    """A placeholder long enough to pass the key checks would run a fleet on a key everyone knows."""
    secret = _one(_k8s_objects(), "Secret")["stringData"]
    fleet_env = _env_file_keys(DEPLOY / "fleet.env.example")
    assert {"LANDMARKS_API_TOKEN_KEY", "LANDMARKS_EVENT_SIGNING_KEY"} <= set(secret)
    assert "LANDMARKS_API_TOKEN_KEY" in fleet_env
    keys = {f"{where}: {name}": value for where, values in (("secret.yaml", secret), ("fleet.env.example", fleet_env))
            for name, value in values.items() if name.endswith("_KEY")}
    assert {k: v for k, v in keys.items() if v != ""} == {}
    # Empty is refused, as the examples' comments say: the workers (signing key) and the API (token key).
    from typer.testing import CliRunner

    from shared.cli import app
    from shared.signing import SigningKeyError, verification_keys
    monkeypatch.setenv("LANDMARKS_EVENT_SIGNING_KEY", secret["LANDMARKS_EVENT_SIGNING_KEY"])
    with pytest.raises(SigningKeyError):
        verification_keys(Settings())
    monkeypatch.setenv("LANDMARKS_API_TOKEN_KEY", secret["LANDMARKS_API_TOKEN_KEY"])
    monkeypatch.delenv("LANDMARKS_API_USER_HEADER", raising=False)
    refused = CliRunner().invoke(app, ["serve", "--port", "1"])
    assert refused.exit_code == 2 and "LANDMARKS_API_TOKEN_KEY" in refused.output, refused.output


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_the_decode_pool_fits_the_workers_cpus():
    """Without a CPU limit the pod may run on every core of its node, and LANDMARKS_DECODE_WORKERS=0 would start
    a decode process per core (192 on a large GPU node): the pool is then sized to the CPU request."""
    objects = _k8s_objects()
    resources = _container(_worker(objects))["resources"]
    config = _config(objects)
    cpus = _cpus(str(resources.get("limits", {}).get("cpu") or resources["requests"]["cpu"]))
    decode = int(config.get("LANDMARKS_DECODE_WORKERS", "0"))
    if "cpu" in resources.get("limits", {}) and decode == 0:
        return  # the worker counts its cgroup's limit
    processes = int(config.get("LANDMARKS_WORKER_PROCESSES", "1"))
    assert 1 <= decode * processes <= max(1, int(cpus)), (decode, processes, cpus)


def test_pdb_covers_the_workers_and_the_migration_job_upgrades_the_schema():
    objects = _k8s_objects()
    pdb = _one(objects, "PodDisruptionBudget")
    labels = _worker(objects)["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]
    job = _one(objects, "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["db", "upgrade"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")


def test_every_reference_between_objects_resolves_and_settings_are_known():
    objects = _k8s_objects()
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    secret = _one(objects, "Secret")
    assert {"LANDMARKS_DATABASE_URL", "LANDMARKS_BROKER_URL", "LANDMARKS_MILVUS_URI"} <= set(secret["stringData"])
    for keys in (_config(objects), secret["stringData"]):
        assert set(keys) <= KNOWN_ENV, set(keys) - KNOWN_ENV
    for obj in objects:
        if obj["kind"] not in ("Deployment", "Job"):
            continue
        spec = obj["spec"]["template"]["spec"]
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in names
                if "secretRef" in source:
                    assert ("Secret", source["secretRef"]["name"]) in names
            assert {e["name"] for e in container.get("env", [])} <= KNOWN_ENV
            for entry in container.get("env", []):
                if ref := entry.get("valueFrom", {}).get("secretKeyRef"):
                    assert ref["key"] in _one(objects, "Secret", ref["name"])["stringData"], ref
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in spec.get("volumes", [])}
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names


def _variables_named_in_the_code() -> set[str]:
    """Every "LANDMARKS_..." string literal of the package: the names os.environ is read (or set) with."""
    sources = [*(REPO / "shared").rglob("*.py"), *(REPO / "workers").rglob("*.py")]
    return {name for path in sources for name in re.findall(r"""["'](LANDMARKS_[A-Z0-9_]+)["']""", path.read_text())}


def _variables_in_the_readme_table() -> set[str]:
    section = README.read_text().split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return set(re.findall(r"LANDMARKS_[A-Z0-9_]+", "\n".join(rows)))


def test_every_variable_the_code_reads_is_a_known_setting():
    """EXTRA_ENV lists what is read outside shared/settings.py: a new os.environ read must join it (and so the
    README's table, below)."""
    unknown = _variables_named_in_the_code() - KNOWN_ENV - INTERNAL_ENV
    assert not unknown, f"add them to EXTRA_ENV (or INTERNAL_ENV): {sorted(unknown)}"


def test_the_readme_documents_every_setting():
    missing = KNOWN_ENV - _variables_in_the_readme_table()
    assert not missing, f"README.md, Settings: no row for {sorted(missing)}"


# --- docker --------------------------------------------------------------------------------------

def test_dockerfile_is_a_non_root_cuda_image_with_a_healthcheck():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\w.\-]+-runtime-", text, re.M)
    assert re.search(r"pip install '\.\[gpu\]'", text), "the image's workers would not have the hardware decoder"
    packages = set(re.search(r"apt-get install([^&]*)", text).group(1).replace("\\", " ").split())
    assert {"gcc", "python3-dev"} <= packages, "torch.compile needs a C compiler and the Python headers"
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0"))
    assert re.search(r'^HEALTHCHECK .*\n?.*CMD \["landmarks", "health"', text, re.M)
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for item in source.split():
            assert (REPO / item).exists(), f"COPY {item}: not in the repository"


def test_the_images_cuda_is_the_major_release_of_torch_and_the_gpu_extra():
    """The image's CUDA, torch's wheel (+cu13x) and nvImageCodec's (-cu13) must need one driver."""
    image = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.", (DEPLOY / "docker" / "Dockerfile").read_text(), re.M)
    extra = re.search(r"nvidia-nvimgcodec-cu(\d+)", (REPO / "pyproject.toml").read_text())
    assert image and extra and image.group(1) == extra.group(1)
    cuda = torch.version.cuda
    if cuda is not None:  # a CPU build of torch says nothing about the wheel the image installs
        assert cuda.split(".")[0] == image.group(1)


def test_compose_services_reference_existing_images_files_and_services():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"postgres", "redis", "etcd", "minio", "milvus", "migrate", "worker-0", "backlog-exporter", "api",
            "prometheus", "grafana"} <= set(services)
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert service.get("image") or service.get("build"), name
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if "$" in source:
                continue
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
            else:
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
        for env_file in service.get("env_file", []):
            path = env_file if isinstance(env_file, str) else env_file["path"]
            required = True if isinstance(env_file, str) else env_file.get("required", True)
            assert not required or (DEPLOY / path).exists(), f"{name}: {path}"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"
    landmarks_env = set(services["worker-0"]["environment"]) | {
        line.split("=", 1)[0] for line in (DEPLOY / "fleet.env.example").read_text().splitlines()
        if line and not line.startswith("#")}
    assert landmarks_env <= KNOWN_ENV, landmarks_env - KNOWN_ENV
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1] == "yes"
    gpus = services["worker-0"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus[0]["driver"] == "nvidia" and "gpu" in gpus[0]["capabilities"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["milvus"]["command"][-1] == "standalone"
    assert services["milvus"]["environment"]["ETCD_ENDPOINTS"].split(":")[0] == "etcd"
    assert services["milvus"]["environment"]["MINIO_ADDRESS"].split(":")[0] == "minio"


def _docker_compose() -> list[str] | None:
    """Compose v2 (`docker compose`, ≥ 2.24 for `env_file.required`); it validates without an engine."""
    if shutil.which("docker") is None:
        return None
    out = subprocess.run(["docker", "compose", "version", "--short"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return None
    version = tuple(int(x) for x in re.findall(r"\d+", out.stdout)[:2])
    return ["docker", "compose"] if version >= (2, 24) else None


def test_docker_compose_config_validates():
    cmd = _docker_compose()
    if cmd is None:
        pytest.skip("no docker compose (v2.24+) client here")
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text()))
    base = [*cmd, "-f", str(COMPOSE), "--env-file", os.devnull, "config", "--quiet"]  # not a local .env
    clean = {k: v for k, v in os.environ.items() if k not in required}
    out = subprocess.run(base, capture_output=True, text=True, timeout=60, cwd=DEPLOY,
                         env={**clean, **{name: "set-by-the-test" for name in required}})
    assert out.returncode == 0, out.stderr
    refused = subprocess.run(base, capture_output=True, text=True, timeout=60, cwd=DEPLOY, env=clean)
    assert refused.returncode != 0 and any(name in refused.stderr for name in required), refused.stderr


# --- Prometheus and Grafana ----------------------------------------------------------------------

def test_dashboards_use_only_metrics_the_workers_define():
    defined = metrics.metric_names()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        assert exprs, path
        used = set().union(*map(_metric_names, exprs))
        assert used, path
        assert used <= defined, f"{path.name}: {sorted(used - defined)}"
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids))
    # The panels cover what the issue asks for.
    used = set().union(*(_metric_names(t["expr"]) for path in DASHBOARDS
                         for p in json.loads(path.read_text())["panels"] for t in p.get("targets", [])))
    for name in ("landmarks_events_total", "landmarks_batch_size_bucket", "landmarks_stage_seconds_bucket",
                 "landmarks_failures_total", "landmarks_queue_backlog", "landmarks_gpu_memory_reserved_bytes",
                 "landmarks_model_info", metrics.PROCESS_UP, metrics.PROCESS_RESTARTS):
        assert name in used, name


def test_alerts_use_defined_metrics_and_the_prometheus_rule_matches():
    alerts = yaml.safe_load(ALERTS.read_text())
    rules = [r for g in alerts["groups"] for r in g["rules"]]
    assert len(rules) >= 5 and all(r["alert"].startswith("Landmarks") for r in rules)
    for rule in rules:
        used = _metric_names(rule["expr"])
        # Prometheus' own `up` of a scrape job is the one other series an alert may read (a target down).
        assert used or _selectors(rule["expr"], "up"), rule["alert"]
        assert used <= metrics.metric_names(), (rule["alert"], used - metrics.metric_names())
    operator_rule = _docs(K8S / "monitoring" / "prometheusrule.yaml")[0]
    assert operator_rule["kind"] == "PrometheusRule" and operator_rule["spec"] == alerts


def test_absent_in_an_alert_names_a_metric_only_the_exporter_serves():
    """absent(m) fires only when nothing exports m: were m also a worker's metric (as the backlog's once
    was), a dead exporter would go unnoticed while any worker runs. Workers do not serve
    metrics.BACKLOG_METRICS (test_metrics_and_health.py scrapes a worker's /metrics for them)."""
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    absent = {m for r in rules for arg in re.findall(r"\babsent\(([^()]*)\)", r["expr"]) for m in _metric_names(arg)}
    assert absent, "no alert notices a dead exporter"
    assert absent <= set(metrics.BACKLOG_METRICS), absent - set(metrics.BACKLOG_METRICS)
    (unreadable,) = [r for r in rules if "absent(" in r["expr"]]
    assert unreadable["labels"]["severity"] == "critical"


def test_the_version_skew_alert_outlasts_an_idle_workers_version():
    """An idle worker keeps its previous version after a promote until its next batch; it stops exporting it
    after metrics.MODEL_INFO_IDLE_S, which must come before the alert's `for:`, or idleness alone fires it."""
    rules = {r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    skew = rules["LandmarksModelVersionSkew"]
    assert _metric_names(skew["expr"]) == {metrics.MODEL_INFO}
    value, unit = re.fullmatch(r"(\d+)([smh])", skew["for"]).groups()
    assert metrics.MODEL_INFO_IDLE_S < int(value) * {"s": 1, "m": 60, "h": 3600}[unit]


def test_prometheus_scrapes_workers_and_the_exporter_and_loads_the_alerts():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    compose = yaml.safe_load(COMPOSE.read_text())
    mounted = {v.split(":")[1] for v in compose["services"]["prometheus"]["volumes"] if v.startswith(".")}
    assert set(config["rule_files"]) <= mounted
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    worker_names = jobs["landmarks-workers"]["dns_sd_configs"][0]["names"]
    assert set(worker_names) <= set(compose["services"])
    assert jobs["landmarks-workers"]["dns_sd_configs"][0]["port"] == metrics.DEFAULT_PORT
    assert jobs["landmarks-backlog"]["static_configs"][0]["targets"] == [f"backlog-exporter:{metrics.DEFAULT_PORT}"]
    grafana = compose["services"]["grafana"]["volumes"]
    assert any(v.startswith("./grafana/dashboards:") for v in grafana)


def _alert_rules() -> dict[str, dict]:
    return {r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}


def _minutes(duration: str) -> float:
    value, unit = re.fullmatch(r"(\d+)([smh])", duration).groups()
    return int(value) * {"s": 1 / 60, "m": 1, "h": 60}[unit]


def test_a_crash_looping_worker_process_alerts():
    """Under LANDMARKS_WORKER_PROCESSES > 1 the supervisor restarts a worker that exits: without these a
    process dying every few minutes only shows as lower throughput."""
    rules = _alert_rules()
    restarting = rules["LandmarksWorkerRestarting"]
    assert re.fullmatch(rf"increase\({metrics.PROCESS_RESTARTS}\[30m\]\) > 3", restarting["expr"].strip())
    down = rules["LandmarksWorkerProcessDown"]
    assert re.fullmatch(rf"{metrics.PROCESS_UP} == 0", down["expr"].strip())
    assert _minutes(down["for"]) == 10
    for rule in (restarting, down):
        assert "{{ $labels.process }}" in rule["annotations"]["summary"], rule["alert"]


def _compose_scrape_targets() -> dict[str, dict[str, str]]:
    """The target labels Prometheus gives a worker and the exporter in the local fleet (prometheus.yml)."""
    jobs = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    (worker,) = [j for j in jobs if any(name.startswith("worker-") for sd in j.get("dns_sd_configs", [])
                                        for name in sd["names"])]
    (exporter,) = [j for j in jobs if any(t.startswith("backlog-exporter:") for sc in j.get("static_configs", [])
                                          for t in sc["targets"])]
    return {"worker": {"job": worker["job_name"]}, "exporter": {"job": exporter["job_name"]}}


def _operator_scrape_targets() -> dict[str, dict[str, str]]:
    """The PodMonitor's target labels: job `<namespace>/<name>` (or its jobLabel's value), container's name."""
    monitoring = K8S / "monitoring"
    namespace = yaml.safe_load((monitoring / "kustomization.yaml").read_text())["namespace"]
    monitor = _one(_docs(monitoring / "podmonitor.yaml"), "PodMonitor")
    targets = {}
    for role, name in (("worker", "landmarks-worker"), ("exporter", "landmarks-backlog-exporter")):
        template = _one(_k8s_objects(), "Deployment", name)["spec"]["template"]
        labels = template["metadata"]["labels"]
        for term in monitor["spec"]["selector"]["matchExpressions"]:
            assert labels.get(term["key"]) in term["values"], (name, term)  # the PodMonitor scrapes it
        job = labels[monitor["spec"]["jobLabel"]] if "jobLabel" in monitor["spec"] else \
            f"{namespace}/{monitor['metadata']['name']}"
        targets[role] = {"job": job, "container": template["spec"]["containers"][0]["name"]}
    return targets


def _annotation_scrape_targets() -> dict[str, dict[str, str]]:
    """The commented pod-annotation job of prometheus.yml (Kubernetes without the operator): job = a pod label."""
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    commented = text[text.index("#  - job_name: landmarks-pods"):]
    (job,) = yaml.safe_load("\n".join(line[1:] for line in commented.splitlines() if line.startswith("#")))
    (source,) = [r["source_labels"][0] for r in job["relabel_configs"] if r.get("target_label") == "job"]
    targets = {}
    for role, name in (("worker", "landmarks-worker"), ("exporter", "landmarks-backlog-exporter")):
        labels = _one(_k8s_objects(), "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        by_meta = {"__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in labels.items()}
        targets[role] = {"job": by_meta[source]}
    return targets


def test_a_worker_whose_metrics_cannot_be_scraped_alerts_in_every_setup():
    """`up` of the workers' scrape job, whichever Prometheus scrapes them: the local fleet's, the operator's
    PodMonitor or the annotation job (both name it by the pod's component label, in any namespace).
    The exporter has its own alert (absent(landmarks_queue_backlog_up)): this one must not double it."""
    rules = [r for r in _alert_rules().values() if _selectors(r["expr"], "up")]
    assert len(rules) == 1, [r["alert"] for r in rules]
    (rule,) = rules
    assert re.search(r"\bup\{[^}]*\}\s*==\s*0", rule["expr"]) and _minutes(rule["for"]) >= 5
    (matchers,) = _selectors(rule["expr"], "up")
    for setup in (_compose_scrape_targets(), _operator_scrape_targets(), _annotation_scrape_targets()):
        assert _selects_series(matchers, {**setup["worker"], "instance": "10.0.0.7:9808"}), setup
        assert not _selects_series(matchers, {**setup["exporter"], "instance": "10.0.0.8:9808"}), setup
    assert "{{ $labels.instance }}" in rule["annotations"]["summary"]


def test_every_alert_has_a_summary_and_a_row_in_the_runbook():
    table = RUNBOOK.read_text().split("## Alerts worth having", 1)[1].split("\n## ", 1)[0]
    for name, rule in _alert_rules().items():
        assert rule["annotations"].get("summary"), name
        assert re.search(rf"^\| `{name}`", table, re.M), f"deploy/README.md: no row for {name}"


def _expressions() -> list[tuple[str, str]]:
    exprs = [(f"alert {name}", rule["expr"]) for name, rule in _alert_rules().items()]
    for path in DASHBOARDS:
        exprs += [(f"{path.name}: {p['title']}", t["expr"]) for p in json.loads(path.read_text())["panels"]
                  for t in p.get("targets", [])]
    return exprs


def test_time_since_a_timestamp_leaves_out_one_never_set():
    """landmarks_last_batch_timestamp_seconds is 0 until a worker's first batch: `time() - it` would plot 57
    years for an idle worker, so each `time() - TIMESTAMP` keeps only the series above 0."""
    found = 0
    for where, expr in _expressions():
        for operand in re.findall(r"time\(\)\s*-\s*(\([^()]*\)|landmarks_\w+)", expr):
            found += 1
            name = operand.strip("()").split()[0]
            filtered = re.fullmatch(rf"\(\s*{name}\s*>\s*0\s*\)", operand)  # time() - (T > 0)
            required = re.search(rf"\b{name}\s*>\s*0\s+and\b", expr)  # T > 0 and time() - T ...
            assert filtered or required, f"{where}: {expr}"
    assert found >= 2  # the dashboard's seconds since the last batch, the stuck-batch alert


def test_the_failure_rate_alert_needs_more_than_a_trickle_of_uploads():
    """Two corrupt photos among a handful at one upload a minute are not > 5 % of a fleet's traffic: the
    ratio counts only once the same outcomes pass a minimum rate."""
    expr = " ".join(_alert_rules()["LandmarksFailureRateHigh"]["expr"].split())
    ratio = re.search(r'/ sum\(rate\(landmarks_events_total\{outcome=~"([^"]+)"\}\[(\w+)\]\)\) > [\d.]+', expr)
    volume = re.search(r'\band sum\(rate\(landmarks_events_total\{outcome=~"([^"]+)"\}\[(\w+)\]\)\) > ([\d.]+)$',
                       expr)
    assert ratio and volume, expr
    assert set(volume.group(1).split("|")) == set(ratio.group(1).split("|")) and volume.group(2) == ratio.group(2)
    assert float(volume.group(3)) > 1 / 60  # one upload a minute cannot fire it


def test_the_exporter_is_given_the_broker_url_wherever_it_runs():
    """Without it `python -m shared.metrics` refuses to start (no private Redis, whose empty queues would
    scale the fleet down): compose and Kubernetes must give it the fleet's."""
    objects = _k8s_objects()
    exporter = _container(_one(objects, "Deployment", "landmarks-backlog-exporter"))
    assert "LANDMARKS_BROKER_URL" in _k8s_variables(exporter, objects)
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert services["backlog-exporter"]["entrypoint"][-2:] == ["-m", "shared.metrics"]
    assert "LANDMARKS_BROKER_URL" in services["backlog-exporter"]["environment"]


def test_the_runbook_says_the_local_prometheus_only_shows_alerts_and_how_to_send_them():
    """prometheus.yml evaluates alerts.yml but names no Alertmanager: the runbook says so, and its `alerting:`
    block is one Prometheus takes as is."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    section = RUNBOOK.read_text().split("## Alerts worth having", 1)[1].split("\n## ", 1)[0]
    blocks = [yaml.safe_load(b) for b in re.findall(r"^```yaml\n(.*?)^```", section, re.M | re.S)]
    (alerting,) = [b["alerting"] for b in blocks if isinstance(b, dict) and "alerting" in b]
    (manager,) = alerting["alertmanagers"]
    assert all(re.fullmatch(r"[\w.-]+:\d+", t) for c in manager["static_configs"] for t in c["targets"])
    if "alerting" not in config:
        assert "http://localhost:9090/alerts" in section and "prometheus/prometheus.yml" in section
