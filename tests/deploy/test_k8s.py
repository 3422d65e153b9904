"""deploy/k8s and deploy/kserve, checked without a cluster: kustomize renders both overlays,
every object validates against the Kubernetes API schemas (kubernetes-validate, offline) or its
CRD's schema, and what must agree with the app, with compose and with each other does."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_tools import REPO, render, tool

from app.main import create_app
from app.metrics import Metrics
from app.settings import Settings

K8S = REPO / "deploy" / "k8s"
COMPONENTS = K8S / "components"
BENCH_RESULTS = REPO / "bench" / "results" / "latest.json"
PYPROJECT = REPO / "pyproject.toml"
KSERVE = REPO / "deploy" / "kserve"
CRDS = REPO / "tests" / "deploy" / "schemas"
COMPOSE_FILE = REPO / "docker-compose.yml"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
OVERLAYS = ("cpu", "gpu")
NAMESPACE = "vae-serve"
# The oldest Kubernetes these manifests are meant for (autoscaling/v2 and policy/v1 are GA,
# sidecar-free) and the newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "InferenceService", "ServingRuntime"}
GPU = "nvidia.com/gpu"

Object = dict[str, Any]


def kustomize(folder: Path) -> list[Object]:
    """The objects kustomize renders from `folder`."""
    return [doc for doc in yaml.safe_load_all(render(folder)) if doc]


def kustomize_with(tmp_path: Path, base: Path, *components: str) -> list[Object]:
    """What an operator's overlay renders: `base` with the named components of
    deploy/k8s/components added (kustomize wants relative paths)."""
    folder = tmp_path / f"with-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    kustomization = {
        "resources": [os.path.relpath(base, folder)],
        "components": [os.path.relpath(COMPONENTS / name, folder) for name in components],
    }
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize(folder)


def load(path: Path) -> list[Object]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(objects: list[Object], kind: str, name: str | None = None) -> Object:
    (found,) = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    return found


def container(pod_spec: Object, name: str) -> Object:
    (found,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return found


def env(container_spec: Object) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container_spec.get("env", [])}


def all_containers(pod_spec: Object) -> list[Object]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def app_routes(method: str) -> set[str]:
    """The paths the app answers `method` on, from its OpenAPI document (building the app loads
    nothing)."""
    paths = create_app(Settings(checkpoints="unused")).openapi()["paths"]
    return {path for path, operations in paths.items() if method.lower() in operations}


def seconds(duration: str) -> int:
    """A compose duration such as '20m' or '45s'."""
    match = re.fullmatch(r"(\d+)(s|m|h)", duration)
    assert match, duration
    return int(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Object]]:
    return request.param, kustomize(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Object]]:
    return {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def kserve() -> list[Object]:
    return kustomize(KSERVE)


# ---- schemas --------------------------------------------------------------------------------


def test_overlays_render_the_whole_service(overlay: tuple[str, list[Object]]) -> None:
    _, objects = overlay
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "PersistentVolumeClaim",
            "Job",
            "Deployment",
            "Service",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "NetworkPolicy",
            "ServiceMonitor",
        ]
    )
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == NAMESPACE


def core_objects() -> Iterator[tuple[str, Object]]:
    """Every complete core object: the files of base/ and training/ as written, both overlays
    as rendered, and the KServe rendering's."""
    for path in sorted([*(K8S / "base").glob("*.yaml"), *(K8S / "training").glob("*.yaml")]):
        if path.name != "kustomization.yaml":
            for obj in load(path):
                yield str(path.relative_to(REPO)), obj
    for name in OVERLAYS:
        for obj in kustomize(K8S / "overlays" / name):
            yield f"overlays/{name}", obj
    for obj in kustomize(KSERVE):
        yield "deploy/kserve", obj


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_validate_against_the_kubernetes_api_schemas(version: str) -> None:
    checked = 0
    for where, obj in core_objects():
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {obj['kind']}/{obj['metadata']['name']}: {exc.message}")
        checked += 1
    # The ten core objects of each overlay, the ten files', and the five KServe brings along.
    assert checked == 2 * 10 + 10 + 5


def test_the_kubernetes_schemas_refuse_a_misspelt_field() -> None:
    deployment = copy.deepcopy(find(load(K8S / "base" / "deployment.yaml"), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def crd_schema(file: str, version: str) -> Object:
    """A CRD's openAPIV3Schema, strict as `kubectl apply --validate=strict`: a field the schema
    does not declare is an error (the API server would drop it silently otherwise)."""
    (crd,) = load(CRDS / file)
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema: Object = copy.deepcopy(served["schema"]["openAPIV3Schema"])

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    # metadata is the API server's, declared as a bare object in every CRD
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def validate_crd(obj: Object, file: str) -> None:
    version = obj["apiVersion"].rsplit("/", 1)[-1]
    jsonschema.validate(obj, crd_schema(file, version), cls=jsonschema.Draft7Validator)


SERVICEMONITOR_CRD = "monitoring.coreos.com_servicemonitors.yaml"
INFERENCESERVICE_CRD = "serving.kserve.io_inferenceservices.yaml"


def test_the_servicemonitor_validates_against_its_crd(overlay: tuple[str, list[Object]]) -> None:
    _, objects = overlay
    validate_crd(find(objects, "ServiceMonitor"), SERVICEMONITOR_CRD)


def test_the_inferenceservice_validates_against_kserves_crd(kserve: list[Object]) -> None:
    validate_crd(find(kserve, "InferenceService"), INFERENCESERVICE_CRD)


def test_the_validators_refuse_unknown_and_mistyped_fields(kserve: list[Object]) -> None:
    service = find(kserve, "InferenceService")
    misspelt = copy.deepcopy(service)
    misspelt["spec"]["predictor"]["model"]["protocolVersoin"] = "v2"
    with pytest.raises(jsonschema.ValidationError, match="protocolVersoin"):
        validate_crd(misspelt, INFERENCESERVICE_CRD)
    mistyped = copy.deepcopy(service)
    mistyped["spec"]["predictor"]["minReplicas"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="'two'"):
        validate_crd(mistyped, INFERENCESERVICE_CRD)


def test_kserves_model_classes_refuse_unknown_and_missing_fields(kserve: list[Object]) -> None:
    runtime = copy.deepcopy(find(kserve, "ServingRuntime"))
    runtime["spec"]["protocolVersion"] = ["v2"]  # it is protocolVersions
    misspelt = kserve_classes("V1alpha1ServingRuntime", runtime)
    assert misspelt.returncode == 1
    assert "V1alpha1ServingRuntimeSpec has no field 'protocolVersion'" in misspelt.stderr
    del runtime["spec"]["protocolVersion"], runtime["spec"]["containers"]
    missing = kserve_classes("V1alpha1ServingRuntime", runtime)
    assert missing.returncode == 1
    assert "`containers`, must not be `None`" in missing.stderr


def test_the_servingruntimes_containers_validate_against_kserves_crd(kserve: list[Object]) -> None:
    runtime = find(kserve, "ServingRuntime")
    # Its container is a Kubernetes container: the one the InferenceService CRD declares.
    container_schema = crd_schema(INFERENCESERVICE_CRD, "v1beta1")["properties"]["spec"][
        "properties"
    ]["predictor"]["properties"]["containers"]["items"]
    for spec in runtime["spec"]["containers"]:
        jsonschema.validate(spec, container_schema, cls=jsonschema.Draft7Validator)


def kserve_classes(class_name: str, *objects: Object) -> subprocess.CompletedProcess[str]:
    """tests/deploy/kserve_classes.py: the objects built into kserve's model classes."""
    return subprocess.run(
        [tool("python"), str(Path(__file__).with_name("kserve_classes.py")), class_name],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("kind", "class_name"),
    [("InferenceService", "V1beta1InferenceService"), ("ServingRuntime", "V1alpha1ServingRuntime")],
)
def test_kserve_objects_build_into_kserves_model_classes(
    kserve: list[Object], kind: str, class_name: str
) -> None:
    """Every field is one kserve's classes declare: built and written back, nothing is lost
    (the classes may fill in defaults of their own, such as a container's empty name)."""
    obj = find(kserve, kind)
    result = kserve_classes(class_name, obj)
    assert result.returncode == 0, result.stderr
    (built,) = json.loads(result.stdout)
    assert holds(built, obj)


def holds(built: Any, original: Any) -> bool:
    """Whether `built` has every field of `original`, with the same value."""
    if isinstance(original, dict):
        return isinstance(built, dict) and all(
            key in built and holds(built[key], value) for key, value in original.items()
        )
    if isinstance(original, list):
        return (
            isinstance(built, list)
            and len(built) == len(original)
            and all(holds(b, o) for b, o in zip(built, original, strict=True))
        )
    return bool(built == original)


# ---- the api Deployment ---------------------------------------------------------------------


def api_pod(objects: list[Object]) -> Object:
    pod: Object = find(objects, "Deployment", "vae-api")["spec"]["template"]["spec"]
    return pod


def test_every_container_runs_locked_down(overlay: tuple[str, list[Object]]) -> None:
    _, objects = overlay
    for kind in ("Deployment", "Job"):
        pod = find(objects, kind)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] >= 10000
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for spec in all_containers(pod):
            context = spec["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert {"requests", "limits"} <= set(spec["resources"]), spec["name"]
            # The only writable places: emptyDirs, and the training Job's checkpoint volume.
            volumes = {v["name"]: v for v in pod["volumes"]}
            for mount in spec.get("volumeMounts", []):
                volume = volumes[mount["name"]]
                writes_checkpoints = kind == "Job" and spec["name"] in ("train", "check-writable")
                if "emptyDir" not in volume and not writes_checkpoints:
                    assert mount.get("readOnly") is True, (kind, spec["name"], mount)


def test_probes_ask_the_apps_own_routes_on_its_port(overlay: tuple[str, list[Object]]) -> None:
    _, objects = overlay
    api = container(api_pod(objects), "api")
    ports = {port["name"]: port["containerPort"] for port in api["ports"]}
    assert ports == {"http": int(env(api)["VAE_PORT"])}
    routes = app_routes("GET")
    assert api["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert api[probe]["httpGet"]["path"] in routes
        assert api[probe]["httpGet"]["port"] in ports


def test_the_startup_probe_waits_as_long_as_compose_for_a_first_start() -> None:
    api = container(api_pod(load(K8S / "base" / "deployment.yaml")), "api")
    probe = api["startupProbe"]
    window = probe["periodSeconds"] * probe["failureThreshold"]
    compose = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["api"]
    assert window >= seconds(compose["healthcheck"]["start_period"])


def test_stopping_covers_the_drain(overlay: tuple[str, list[Object]]) -> None:
    _, objects = overlay
    pod = api_pod(objects)
    api = container(pod, "api")
    command = api["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    settings = Settings(**settings_from_env(api))
    drain = int(command[1]) + settings.shutdown_drain_s
    assert pod["terminationGracePeriodSeconds"] >= drain + 2
    assert pod["shareProcessNamespace"] is True  # Python is not PID 1: SIGTERM is not ignored


def settings_from_env(spec: Object, cpu_limit: str | None = None) -> dict[str, Any]:
    """The container's VAE_* variables as Settings keyword arguments; resourceFieldRef values
    resolved from the container's limits as the kubelet would (rounded up)."""
    values: dict[str, Any] = {}
    for name, value in env(spec).items():
        if not name.startswith("VAE_"):
            continue
        if isinstance(value, dict):
            field = value["resourceFieldRef"]
            assert field["resource"] == "limits.cpu" and field["divisor"] == "1"
            value = str(-(-parse_cpu(spec["resources"]["limits"]["cpu"]) // 1000))
        values[name.removeprefix("VAE_").lower()] = value
    return values


def parse_cpu(quantity: str) -> int:
    """A CPU quantity in millicores."""
    return int(quantity[:-1]) if quantity.endswith("m") else int(float(quantity) * 1000)


def test_every_setting_given_is_one_the_app_takes(overlay: tuple[str, list[Object]]) -> None:
    _, objects = overlay
    api = container(api_pod(objects), "api")
    values = settings_from_env(api)
    assert set(values) <= set(Settings.model_fields), set(values) - set(Settings.model_fields)
    settings = Settings(**values)  # validates each value as the app would at startup
    assert settings.host == "0.0.0.0"
    assert settings.workers == 1
    assert settings.torch_threads == -(-parse_cpu(api["resources"]["limits"]["cpu"]) // 1000)


def test_the_device_matches_the_overlay(rendered: dict[str, list[Object]]) -> None:
    for name, objects in rendered.items():
        api = container(api_pod(objects), "api")
        train_pod = find(objects, "Job")["spec"]["template"]["spec"]
        train = container(train_pod, "train")
        devices = {
            "api": Settings(**settings_from_env(api)).device,
            "train": train["args"][train["args"].index("--device") + 1],
        }
        pods = {"api": (api, api_pod(objects)), "train": (train, train_pod)}
        for role, (spec, pod) in pods.items():
            gpus = {key: spec["resources"][key].get(GPU) for key in ("requests", "limits")}
            tolerates = any(t["key"] == GPU for t in pod.get("tolerations", []))
            if name == "gpu":
                # One GPU, and the device that uses it (cuda = cuda:0: the pod's only GPU).
                assert gpus == {"requests": "1", "limits": "1"}, role
                assert devices[role] in ("cuda", "cuda:0"), role
                assert tolerates, role
            else:
                assert gpus == {"requests": None, "limits": None}, role
                assert devices[role] == "cpu", role
                assert not tolerates, role


def test_the_first_start_waits_for_the_trained_checkpoint(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    """The init container's own script, run here: it passes once the checkpoint is there, and
    gives up with a message that says what to do when it never comes."""
    (wait,) = api_pod(load(K8S / "base" / "deployment.yaml"))["initContainers"]
    assert wait["command"] == ["python", "-m", "app.wait_for_checkpoint"]
    environment = {**os.environ, **env(wait)}
    found = subprocess.run(
        [sys.executable, *wait["command"][1:]],
        env={**environment, "VAE_CHECKPOINTS": str(trained_checkpoint)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert found.returncode == 0, found.stderr
    assert "found" in found.stdout
    missing = subprocess.run(
        [sys.executable, *wait["command"][1:]],
        env={
            **environment,
            "VAE_CHECKPOINTS": str(tmp_path / "default"),
            "WAIT_FOR_CHECKPOINT_S": "0",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode != 0
    assert "run the training Job" in missing.stderr


def test_the_job_trains_what_the_api_serves(overlay: tuple[str, list[Object]]) -> None:
    _, objects = overlay
    pvc = find(objects, "PersistentVolumeClaim")["metadata"]["name"]
    pod = api_pod(objects)
    api = container(pod, "api")
    train_pod = find(objects, "Job")["spec"]["template"]["spec"]
    train = container(train_pod, "train")

    def mounted_claim(pod_spec: Object, spec: Object, path: str) -> tuple[str, bool]:
        volumes = {v["name"]: v for v in pod_spec["volumes"]}
        for mount in spec["volumeMounts"]:
            if path.startswith(mount["mountPath"] + "/"):
                claim = volumes[mount["name"]]["persistentVolumeClaim"]
                return claim["claimName"], bool(mount.get("readOnly"))
        raise AssertionError(f"nothing is mounted above {path}")

    served = env(api)["VAE_CHECKPOINTS"]
    out = train["command"][train["command"].index("--out") + 1]
    assert out == served
    assert mounted_claim(pod, api, served) == (pvc, True)
    assert mounted_claim(train_pod, train, out) == (pvc, False)
    assert env(pod["initContainers"][0])["VAE_CHECKPOINTS"] == served
    assert train_pod["restartPolicy"] == "Never"


# ---- Service, monitoring, scaling -----------------------------------------------------------


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_the_service_and_servicemonitor_reach_the_api(overlay: tuple[str, list[Object]]) -> None:
    _, objects = overlay
    deployment = find(objects, "Deployment", "vae-api")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = find(objects, "Service")
    assert labels_match(service["spec"]["selector"], pod_labels)
    port_names = {p["name"] for p in container(api_pod(objects), "api")["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    monitor = find(objects, "ServiceMonitor")
    assert labels_match(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] in app_routes("GET")
    # Prometheus names the job after the Service: the alerts and recording rules select it.
    assert f'job="{service["metadata"]["name"]}"' in RULES.read_text()


def test_the_hpa_scales_the_api_on_cpu_alone_by_default(
    overlay: tuple[str, list[Object]],
) -> None:
    """Every cluster serves CPU metrics; a custom metric without the Prometheus Adapter would
    hold back every scale-down."""
    _, objects = overlay
    hpa = find(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "vae-api")
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2
    # The HPA owns the replica count: a `replicas` field would reset it on every apply.
    assert "replicas" not in find(objects, "Deployment")["spec"]


def test_the_in_flight_component_adds_a_metric_the_app_exports_and_the_adapter_serves(
    tmp_path: Path,
) -> None:
    objects = kustomize_with(tmp_path, K8S / "overlays" / "cpu", "in-flight-autoscaling")
    hpa = find(objects, "HorizontalPodAutoscaler")
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    in_flight = metrics["Pods"]["pods"]["metric"]["name"]
    exported = {family.name for family in Metrics().registry.collect()}
    assert in_flight in exported
    adapter = yaml.safe_load((K8S / "prometheus-adapter.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == in_flight
    assert rule["seriesQuery"].startswith(in_flight + "{")
    # Reachable: by Little's law a pod under the benchmark's heaviest /sample load held
    # throughput x latency requests in flight; the target must be below that, or the metric
    # never asks for a pod before the CPU does.
    target = float(metrics["Pods"]["pods"]["target"]["averageValue"])
    cases = json.loads(BENCH_RESULTS.read_text())["serving"]["cases"]
    heaviest = max(
        (c for c in cases.values() if c.get("endpoint", "").startswith("POST /sample")),
        key=lambda c: c["concurrency"],
    )
    held = heaviest["req_s"] * heaviest["mean_ms"] / 1000
    assert 1 < target < held, (target, held)


def test_the_adapter_query_is_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("`promtool` is not on PATH (Debian/Ubuntu: apt-get install prometheus)")
    (rule,) = yaml.safe_load((K8S / "prometheus-adapter.yaml").read_text())["rules"]["custom"]
    # The adapter's template, filled in as it fills it for one pod of the HPA's target.
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", "vae_requests_in_flight")
        .replace("<<.LabelMatchers>>", 'namespace="vae-serve",pod=~"vae-api-.*"')
        .replace("<<.GroupBy>>", "pod")
    )
    rules = tmp_path / "adapter.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": [
        {"record": "pod:vae_requests_in_flight:avg1m", "expr": query}
    ]}]}))  # fmt: skip
    result = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_disruptions_leave_an_api_pod_serving(overlay: tuple[str, list[Object]]) -> None:
    _, objects = overlay
    pdb = find(objects, "PodDisruptionBudget")
    pod_labels = find(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert (
        pdb["spec"]["maxUnavailable"]
        < find(objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"]
    )
    strategy = find(objects, "Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0  # a rollout adds a ready pod before it removes one


def test_network_policies_admit_only_the_http_port(overlay: tuple[str, list[Object]]) -> None:
    _, objects = overlay
    policies = {p["metadata"]["name"]: p for p in objects if p["kind"] == "NetworkPolicy"}
    api = policies["vae-api"]["spec"]
    assert api["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]
    assert "ingress" not in policies["vae-train"]["spec"]  # no traffic in at all


# ---- KServe ---------------------------------------------------------------------------------


def test_kserve_serves_the_v2_protocol_from_the_runtime(
    kserve: list[Object], overlay: tuple[str, list[Object]]
) -> None:
    _, objects = overlay
    service = find(kserve, "InferenceService")
    runtime = find(kserve, "ServingRuntime")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    model = service["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2"
    assert "v2" in runtime["spec"]["protocolVersions"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert {"requests", "limits"} <= set(model["resources"])
    # The checkpoint volume that the training Job fills, which KServe mounts at /mnt/models.
    pvc = find(kserve, "PersistentVolumeClaim")["metadata"]["name"]
    assert model["storageUri"] == f"pvc://{pvc}"
    (server,) = runtime["spec"]["containers"]
    train = container(find(kserve, "Job")["spec"]["template"]["spec"], "train")
    out = train["command"][train["command"].index("--out") + 1]
    assert env(server)["VAE_CHECKPOINTS"] == "/mnt/models/" + out.removeprefix("/checkpoints/")
    assert find(kserve, "PersistentVolumeClaim") == find(objects, "PersistentVolumeClaim")
    for obj in kserve:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACE


def test_kserve_probes_and_port_are_the_apps(kserve: list[Object]) -> None:
    (server,) = find(kserve, "ServingRuntime")["spec"]["containers"]
    settings = Settings(**settings_from_env(server))
    # torch's threads from the pod's CPU limit, as the Deployment's.
    assert settings.torch_threads == -(-parse_cpu(server["resources"]["limits"]["cpu"]) // 1000)
    assert settings.host == "0.0.0.0"
    assert [p["containerPort"] for p in server["ports"]] == [settings.port]
    routes = app_routes("GET")
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["path"] in routes
        assert server[probe]["httpGet"]["port"] == settings.port
    context = server["securityContext"]
    assert context["runAsNonRoot"] is True and context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}


def test_the_kserve_runtime_waits_for_the_checkpoint_then_serves(kserve: list[Object]) -> None:
    """The Job and the InferenceService are applied together: the runtime waits for the
    checkpoint (as the Deployment's init container does) instead of crash-looping, and its
    startup probe outlasts that wait."""
    (server,) = find(kserve, "ServingRuntime")["spec"]["containers"]
    command = server["command"]
    assert command[:3] == ["python", "-m", "app.wait_for_checkpoint"]
    assert command[command.index("--then") + 1 :] == ["python", "-m", "app"]
    wait_s = float(env(server)["WAIT_FOR_CHECKPOINT_S"])
    probe = server["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] > wait_s


def test_wait_for_checkpoint_then_execs_the_server_command(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    environment = {**os.environ, "VAE_CHECKPOINTS": str(trained_checkpoint)}
    then = [sys.executable, "-c", "print('serving')"]
    ran = subprocess.run(
        [sys.executable, "-m", "app.wait_for_checkpoint", "--then", *then],
        env=environment, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines()[-2:] == [
        f"found {trained_checkpoint / 'config.json'}",
        "serving",
    ]
    missing = subprocess.run(
        [sys.executable, "-m", "app.wait_for_checkpoint", "--timeout-s", "0", "--then", *then],
        env={**environment, "VAE_CHECKPOINTS": str(tmp_path / "none")},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 1 and "serving" not in missing.stdout
    assert "run the training Job" in missing.stderr


def test_the_image_is_the_projects_pinned_tag_pulled_if_not_present(
    rendered: dict[str, list[Object]], kserve: list[Object]
) -> None:
    """`vae-serve:<version>` (loadable with `kind load` / `minikube image load`, or renamed with
    kustomize `images:`), never re-pulled when the node has it."""
    version = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    renderings = {**rendered, "kserve": kserve}
    for where, objects in renderings.items():
        specs = []
        for obj in objects:
            if obj["kind"] in ("Deployment", "Job"):
                specs += all_containers(obj["spec"]["template"]["spec"])
            elif obj["kind"] == "ServingRuntime":
                specs += obj["spec"]["containers"]
        assert specs, where
        for spec in specs:
            assert spec["image"] == f"vae-serve:{version}", (where, spec["name"])
            assert spec["imagePullPolicy"] == "IfNotPresent", (where, spec["name"])
    for folder in (K8S / "base", KSERVE):
        (image,) = yaml.safe_load((folder / "kustomization.yaml").read_text())["images"]
        assert image == {"name": "vae-serve", "newTag": version}


def claim_users(objects: list[Object]) -> list[tuple[str, Object]]:
    """(kind, pod spec) of every pod template that mounts the checkpoint claim."""
    pods = []
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job"):
            template = obj["spec"]["template"]
            pods.append(
                (obj["kind"], {**template["spec"], "labels": template["metadata"]["labels"]})
            )
        elif obj["kind"] == "InferenceService":
            predictor = obj["spec"]["predictor"]
            pods.append((obj["kind"], predictor))  # its storageUri mounts the claim
    return pods


def test_the_default_layout_works_on_a_readwriteonce_default_storage_class(
    rendered: dict[str, list[Object]], kserve: list[Object]
) -> None:
    """No storage class offers ReadWriteMany by default: the claim asks for ReadWriteOnce from
    the default class, and every pod that mounts it is held to the node it is attached to."""
    for where, objects in {**rendered, "kserve": kserve}.items():
        claim = find(objects, "PersistentVolumeClaim")
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"], where
        assert "storageClassName" not in claim["spec"], where
        users = claim_users(objects)
        assert len(users) == 2, where  # the Job, and the Deployment or InferenceService
        for kind, pod in users:
            label = pod["labels"]
            (term,) = pod["affinity"]["podAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]
            assert term["topologyKey"] == "kubernetes.io/hostname", (where, kind)
            # It selects its own kind of pod, so the first one scheduled may go anywhere.
            assert labels_match(term["labelSelector"]["matchLabels"], label), (where, kind)


def test_the_shared_storage_component_spreads_the_api_over_nodes(
    tmp_path: Path,
) -> None:
    for base, pod_kind in ((K8S / "overlays" / "gpu", "Deployment"), (KSERVE, "InferenceService")):
        objects = kustomize_with(tmp_path, base, "shared-storage")
        assert find(objects, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
        for kind, pod in claim_users(objects):
            assert "affinity" not in pod, kind
            if kind != pod_kind:
                continue
            by_key = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
            hosts = by_key["kubernetes.io/hostname"]
            assert (hosts["maxSkew"], hosts["whenUnsatisfiable"]) == (1, "DoNotSchedule")
            assert "topology.kubernetes.io/zone" in by_key
            selected = hosts["labelSelector"]["matchLabels"]
            if kind == "Deployment":
                assert labels_match(
                    selected, find(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
                )
            else:
                assert selected == {
                    KSERVE_ISVC_LABEL: find(objects, "InferenceService")["metadata"]["name"]
                }
        if pod_kind == "Deployment":
            # and the result is still valid Kubernetes
            kubernetes_validate.validate(
                find(objects, "Deployment"), KUBERNETES_VERSIONS[-1], strict=True
            )


# The label KServe puts on an InferenceService's pods: the PodMonitor and spread select by it.
KSERVE_ISVC_LABEL = "serving.kserve.io/inferenceservice"


def test_the_job_says_at_once_when_the_volume_is_not_writable() -> None:
    """Many RWX drivers (NFS) ignore fsGroup: on a root-owned export uid 10001 cannot write.
    The Job's init container, run here as uid 10001, passes on a volume it can write and fails
    with what to do on one it cannot."""
    job = find(load(K8S / "training" / "train-job.yaml"), "Job")["spec"]["template"]["spec"]
    (check,) = job["initContainers"]
    assert check["command"][:2] == ["python", "-c"]
    assert {m["mountPath"] for m in check["volumeMounts"]} == {"/checkpoints"}
    setpriv = shutil.which("setpriv")
    as_uid = (
        [setpriv, "--reuid", "10001", "--regid", "10001", "--clear-groups"]
        if os.getuid() == 0 and setpriv
        else []
    )
    # Outside pytest's own temporary folders, which other users cannot enter.
    with tempfile.TemporaryDirectory() as scratch:
        Path(scratch).chmod(0o755)
        writable, root_owned = Path(scratch, "writable"), Path(scratch, "root-owned")
        writable.mkdir()
        root_owned.mkdir(mode=0o755)
        if as_uid:
            os.chown(writable, 10001, 10001)
        else:
            root_owned.chmod(0o555)  # not root: a folder this user cannot write stands in
        results = {}
        for folder in (writable, root_owned):
            script = check["command"][2].replace('"/checkpoints"', repr(str(folder)))
            results[folder] = subprocess.run(
                [*as_uid, sys.executable, "-c", script], capture_output=True, text=True, timeout=60
            )
    assert results[writable].returncode == 0, results[writable].stderr
    refused = results[root_owned]
    assert refused.returncode != 0
    assert "not writable by uid" in refused.stderr and "fsGroup" in refused.stderr


def test_the_job_uses_as_many_threads_as_its_cpu_limit(overlay: tuple[str, list[Object]]) -> None:
    _, objects = overlay
    train = container(find(objects, "Job")["spec"]["template"]["spec"], "train")
    field = env(train)["OMP_NUM_THREADS"]["resourceFieldRef"]
    assert field == {"containerName": "train", "resource": "limits.cpu", "divisor": "1"}


def test_the_podmonitor_scrapes_the_predictors_as_the_rules_job(kserve: list[Object]) -> None:
    """The Prometheus Operator ignores scrape annotations: a PodMonitor selects the predictor
    pods and names their job as the alert rules and dashboards select it."""
    monitor = find(kserve, "PodMonitor")
    validate_crd(monitor, "monitoring.coreos.com_podmonitors.yaml")
    service = find(kserve, "InferenceService")
    assert monitor["spec"]["selector"]["matchLabels"] == {
        KSERVE_ISVC_LABEL: service["metadata"]["name"]
    }
    (server,) = find(kserve, "ServingRuntime")["spec"]["containers"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p.get("name") for p in server["ports"]}
    assert endpoint["path"] in app_routes("GET")
    (relabel,) = endpoint["relabelings"]
    assert (relabel["targetLabel"], relabel["action"]) == ("job", "replace")
    assert f'job="{relabel["replacement"]}"' in RULES.read_text()
