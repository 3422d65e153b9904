"""docker-compose.yml: valid against the Compose spec, and wired as deploy/README.md says."""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

from app.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
# The Compose Specification's JSON schema, vendored with its source (tests/deploy/schemas/).
COMPOSE_SCHEMA = REPO / "tests" / "deploy" / "schemas" / "compose-spec.json"

# `${NAME}`, `${NAME:-default}` or `${NAME-default}`: Compose's interpolation syntax.
INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?-)(?P<default>[^}]*))?\}")
# Settings the api container is not given, and why; every other field of `Settings` must be.
NOT_PASSED = {
    # A compose default cannot say "unset" (an empty value fails validation); unset keeps
    # torch's own thread count.
    "torch_threads",
    # Fault injection for tests; never in production.
    "enable_test_hooks",
    # The benchmark's constant-response floor endpoint; only the benchmark turns it on.
    "enable_bench_routes",
    # API keys are secrets, given by an override or env_file (an empty value is no key), a keys
    # file is mounted by whoever uses one, and the burst's default (one second's worth of the
    # rate) cannot be written as a value.
    "api_keys",
    "api_keys_file",
    "rate_limit_burst",
    "grpc_port",  # off unless set (None): an override file sets it and publishes the port
}
VAE_SETTINGS = tuple(
    f"VAE_{name.upper()}" for name in Settings.model_fields if name not in NOT_PASSED
)


def with_defaults(value: str, variables: dict[str, str] | None = None) -> str:
    """`value` as Compose resolves it when no variable (or only `variables`) is set in the
    environment."""

    def default(match: re.Match[str]) -> str:
        if variables and match["name"] in variables:
            return variables[match["name"]]
        assert match["op"], f"{match[0]} has no default: write ${{{match['name']}:-<default>}}"
        return match["default"]

    return INTERPOLATION.sub(default, value)


def mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """The service's volumes in long syntax (type, source, target), short syntax converted."""
    result = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            result.append(entry)
            continue
        source, target = entry.split(":")[:2]
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        result.append({"type": kind, "source": source, "target": target})
    return result


def environment(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment as a mapping, with defaults substituted."""
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: with_defaults(str(value)) for key, value in env.items()}


def command(service: dict[str, Any], variables: dict[str, str] | None = None) -> list[str]:
    """The service's command as an argv list, with defaults (or `variables`) substituted."""
    argv = service["command"]
    assert isinstance(argv, list), "write command in exec form (a list), so no shell is involved"
    return [with_defaults(str(arg), variables) for arg in argv]


def is_under(path: str, folder: str) -> bool:
    return PurePosixPath(folder) in (PurePosixPath(path), *PurePosixPath(path).parents)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def test_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    # The spec says draft-07, spelled "https://json-schema.org/draft-07/schema", which
    # jsonschema's registry (keyed "http://...#") does not recognise; name the draft directly.
    assert "draft-07" in schema["$schema"], schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_has_no_obsolete_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose


def test_expected_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"api", "trainer", "prometheus", "grafana"}


@pytest.mark.parametrize("name", ["api", "trainer"])
def test_reserves_an_nvidia_gpu(services: dict[str, dict[str, Any]], name: str) -> None:
    devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        device.get("driver") == "nvidia"
        and "gpu" in device.get("capabilities", [])
        and (device.get("count") == "all" or int(device.get("count", 0)) >= 1)
        for device in devices
    ), devices


def test_api_and_trainer_share_one_image(services: dict[str, dict[str, Any]]) -> None:
    api, trainer = services["api"], services["trainer"]
    assert api["build"] == trainer["build"]
    assert api["build"]["context"] == "."
    assert (REPO / api["build"].get("dockerfile", "Dockerfile")).is_file()
    assert api["image"] == trainer["image"]


def test_trainer_runs_only_under_the_train_profile(services: dict[str, dict[str, Any]]) -> None:
    assert services["trainer"]["profiles"] == ["train"]
    assert all("profiles" not in services[name] for name in ("api", "prometheus", "grafana"))
    assert command(services["trainer"])[:3] == ["python", "-m", "training"]


def test_api_trains_the_default_model_when_the_volume_is_empty(
    services: dict[str, dict[str, Any]],
) -> None:
    assert command(services["api"]) == ["python", "-m", "app", "--train-if-missing"]


def test_api_gets_every_setting_with_a_default(services: dict[str, dict[str, Any]]) -> None:
    env = environment(services["api"])  # asserts every interpolation has a default
    assert set(VAE_SETTINGS) <= set(env), set(VAE_SETTINGS) - set(env)
    # Settings ignores unknown VAE_* variables, so a misspelt one would silently do nothing.
    unknown = {key for key in env if key.startswith("VAE_")} - set(VAE_SETTINGS)
    assert not unknown, f"{unknown}: not settings of the app (app/settings.py)"
    # Prometheus scrapes api:8000 and the healthcheck asks port 8000: neither may move. The app
    # binds 127.0.0.1 by default, which nothing outside the container could reach.
    assert env["VAE_HOST"] == "0.0.0.0"
    assert env["VAE_PORT"] == "8000"
    # One process on the GPU, batching every request for it (VAE_WORKERS=auto on CPU).
    assert env["VAE_WORKERS"] == "1"
    assert all(value for value in env.values()), env


def test_api_defaults_are_valid_settings_equal_to_the_services_own(
    services: dict[str, dict[str, Any]],
) -> None:
    env = environment(services["api"])
    values = {key.removeprefix("VAE_").lower(): value for key, value in env.items()}
    parsed = Settings.model_validate(values)  # the app's own validation: fails on a bad default
    # Host, checkpoints and workers differ from the app's on purpose: the container listens on
    # all interfaces, keeps checkpoints in the volume, and runs one process for its GPU.
    for field in set(values) - {"host", "checkpoints", "workers"}:
        default = Settings.model_fields[field].default
        assert getattr(parsed, field) == default, f"VAE_{field.upper()}: compose and app disagree"


def test_api_publishes_port_8000(services: dict[str, dict[str, Any]]) -> None:
    ports = [with_defaults(str(port)) for port in services["api"]["ports"]]
    assert "8000:8000" in ports


def test_checkpoint_volume_is_where_the_settings_point(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    targets = {
        name: {m["target"] for m in mounts(services[name]) if m["source"] == "checkpoints"}
        for name in ("api", "trainer")
    }
    assert targets["api"] == targets["trainer"] == {"/checkpoints"}, targets
    assert "checkpoints" in compose["volumes"]

    served = environment(services["api"])["VAE_CHECKPOINTS"].split(",")
    assert all(is_under(folder, "/checkpoints") for folder in served), served
    trainer_argv = command(services["trainer"])
    written = trainer_argv[trainer_argv.index("--out") + 1]
    # By default the trainer refreshes exactly what the api serves.
    assert written in served, (written, served)


def test_named_volumes_are_declared_and_bind_mounts_exist(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services.items():
        for mount in mounts(service):
            if mount["type"] == "volume":
                used.add(mount["source"])
            elif mount["type"] == "bind":
                assert (REPO / mount["source"]).exists(), f"{name}: {mount['source']} is missing"
    assert used == declared, f"used {used}, declared {declared}"
    assert {"prometheus-data", "grafana-data"} <= declared


def test_prometheus_gets_its_config_and_rules(services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    by_target = {m["target"]: m for m in mounts(prometheus)}
    assert by_target["/etc/prometheus/prometheus.yml"]["source"] == (
        "./deploy/prometheus/prometheus.yml"
    )
    # prometheus.yml names rules.yml relative to itself, so it must sit beside it.
    assert by_target["/etc/prometheus/rules.yml"]["source"] == "./deploy/prometheus/rules.yml"
    assert by_target["/prometheus"]["source"] == "prometheus-data"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "--storage.tsdb.path=/prometheus" in prometheus["command"]


def test_grafana_is_provisioned_and_open_to_viewers(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    by_target = {m["target"]: m["source"] for m in mounts(grafana)}
    assert by_target["/etc/grafana/provisioning/datasources"] == (
        "./deploy/grafana/provisioning/datasources"
    )
    assert by_target["/etc/grafana/provisioning/dashboards"] == (
        "./deploy/grafana/provisioning/dashboards"
    )
    assert by_target["/etc/grafana/dashboards"] == "./deploy/grafana/dashboards"
    assert by_target["/var/lib/grafana"] == "grafana-data"

    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    # The admin password comes from the environment, with a default for a first local run.
    assert INTERPOLATION.fullmatch(env["GF_SECURITY_ADMIN_PASSWORD"])
    home = PurePosixPath(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (
        REPO / "deploy/grafana/dashboards" / home.relative_to("/etc/grafana/dashboards")
    ).is_file()


@pytest.mark.parametrize("name", ["api", "prometheus", "grafana"])
def test_long_running_services_have_healthcheck_and_restart(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    service = services[name]
    check = service["healthcheck"]
    assert check["test"][0] in ("CMD", "CMD-SHELL"), check["test"]
    assert service["restart"] in ("unless-stopped", "always", "on-failure")


def test_api_healthcheck_asks_readiness_without_curl(services: dict[str, dict[str, Any]]) -> None:
    check = " ".join(services["api"]["healthcheck"]["test"])
    assert "/readyz" in check
    assert "urllib" in check
    assert "curl" not in check


def seconds(duration: str) -> float:
    """A Compose duration (`1m30s`, `20m`, `15s`, `1h`) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def test_api_start_period_covers_the_first_start_training(
    services: dict[str, dict[str, Any]],
) -> None:
    # --train-if-missing trains before the server listens: every check fails until training,
    # loading and warm-up are done, and only failures inside start_period do not count.
    assert "--train-if-missing" in command(services["api"])
    assert seconds(services["api"]["healthcheck"]["start_period"]) >= 10 * 60


@pytest.mark.parametrize("name", ["prometheus", "grafana"])
def test_third_party_images_are_pinned(services: dict[str, dict[str, Any]], name: str) -> None:
    image = services[name]["image"]
    repository, _, tag = image.rpartition(":")
    assert repository and "/" not in tag, f"{image} has no tag"
    assert tag != "latest"
    assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{image}: pin a full version"


def test_api_and_trainer_run_under_an_init(services: dict[str, dict[str, Any]]) -> None:
    # Python as PID 1 ignores SIGTERM until it installs a handler (not yet during first-start
    # training), so `docker compose stop` would wait out the grace period and SIGKILL it.
    assert services["api"]["init"] is True
    assert services["trainer"]["init"] is True


def test_api_stop_grace_period_covers_the_drain(services: dict[str, dict[str, Any]]) -> None:
    env = environment(services["api"])
    drain = Settings(request_timeout_s=float(env["VAE_REQUEST_TIMEOUT_S"])).shutdown_drain_s
    # Docker's default is 10 s; past the grace period it SIGKILLs requests mid-drain.
    assert seconds(services["api"]["stop_grace_period"]) >= drain + 10, drain


@pytest.mark.parametrize(("name", "port"), [("prometheus", "9090"), ("grafana", "3000")])
def test_monitoring_publishes_on_loopback_unless_told(
    services: dict[str, dict[str, Any]], name: str, port: str
) -> None:
    # Prometheus has no authentication, and Docker's port rules bypass ufw/firewalld.
    (published,) = services[name]["ports"]
    assert with_defaults(published) == f"127.0.0.1:{port}:{port}"
    bind = f"{name.upper()}_BIND"
    assert with_defaults(published, {bind: "0.0.0.0"}) == f"0.0.0.0:{port}:{port}"


def test_trainer_trains_mnist_full_with_its_data_on_a_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    from training.cli import build_parser, config_from_args

    trainer = services["trainer"]
    argv = command(trainer, {"VAE_TRAIN_PRESET": "mnist-full", "VAE_TRAIN_MODEL": "mnist-full"})
    assert argv[:3] == ["python", "-m", "training"]
    config = config_from_args(build_parser().parse_args(argv[3:]))
    assert (config.preset, config.dataset, config.download) == ("mnist-full", "mnist", True)
    assert config.out == "/checkpoints/mnist-full"
    # The data outlives the container, so the next run does not fetch it again.
    volumes = {m["target"]: m["source"] for m in mounts(trainer) if m["type"] == "volume"}
    assert is_under(config.data_dir, "/data") and volumes["/data"] in compose["volumes"]
    # By default the slower quality preset (embedded mnist-5k) retrains the served model: the
    # data flags do nothing there.
    default = config_from_args(build_parser().parse_args(command(trainer)[3:]))
    assert (default.preset, default.dataset, default.out) == (
        "quality",
        "mnist-5k",
        "/checkpoints/default",
    )
