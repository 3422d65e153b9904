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
KSERVE = REPO / "deploy" / "kserve"
CRDS = REPO / "tests" / "deploy" / "schemas"
COMPOSE_FILE = REPO / "docker-compose.yml"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
OVERLAYS = ("cpu", "gpu")
NAMESPACE = "vae-serve"
# The oldest Kubernetes these manifests are meant for (autoscaling/v2 and policy/v1 are GA,
# sidecar-free) and the newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
CRD_KINDS = {"ServiceMonitor", "InferenceService", "ServingRuntime"}
GPU = "nvidia.com/gpu"

Object = dict[str, Any]


def kustomize(folder: Path) -> list[Object]:
    """The objects kustomize renders from `folder`."""
    return [doc for doc in yaml.safe_load_all(render(folder)) if doc]


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
                if "emptyDir" not in volume and not (kind == "Job" and spec["name"] == "train"):
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
    assert wait["command"][:2] == ["python", "-c"]
    script = wait["command"][2]
    environment = {**os.environ, **env(wait)}
    found = subprocess.run(
        [sys.executable, "-c", script],
        env={**environment, "VAE_CHECKPOINTS": str(trained_checkpoint)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert found.returncode == 0, found.stderr
    assert "found" in found.stdout
    missing = subprocess.run(
        [sys.executable, "-c", script],
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


def test_the_hpa_scales_the_api_on_cpu_and_requests_in_flight(
    overlay: tuple[str, list[Object]],
) -> None:
    _, objects = overlay
    hpa = find(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "vae-api")
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    in_flight = metrics["Pods"]["pods"]["metric"]["name"]
    exported = {family.name for family in Metrics().registry.collect()}
    assert in_flight in exported
    adapter = yaml.safe_load((K8S / "prometheus-adapter.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == in_flight
    assert rule["seriesQuery"].startswith(in_flight + "{")
    assert hpa["spec"]["minReplicas"] >= 2


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
