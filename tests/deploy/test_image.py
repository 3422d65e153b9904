"""The Docker image, built by a real engine and run as compose and the Kubernetes manifests run
it: as uid 10001 on a read-only root with a tmpfs /tmp, training a short preset into an empty
named volume on its first start, healthy by its own HEALTHCHECK, serving through a port
published on 127.0.0.1, not training again after a restart, stopping cleanly on SIGTERM (while
serving and while training), and serving what its trainer command writes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import yaml
from containers import FAST_PRESET, Container, build_image, run
from deploy_tools import REPO
from prometheus_client.parser import text_string_to_metric_families

from app.service.imaging import encode_png
from training.data import load_dataset, to_float

pytestmark = pytest.mark.slow

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
# compose's stop_grace_period for the api (45s), as `docker run --stop-timeout` takes it.
GRACE_S = int(COMPOSE["api"]["stop_grace_period"].removesuffix("s"))
# Training the tiny preset takes ~15 s on 2 quiet cores, many minutes on a loaded machine:
# allow the image's own start period (compose's), after which the engine calls it unhealthy.
FIRST_START_S = int(COMPOSE["api"]["healthcheck"]["start_period"].removesuffix("m")) * 60
TRAINING_LINE = f"training the {FAST_PRESET} preset into it first"


def start(
    engine: str, image: str, volume: str, *command: str, env: dict[str, str] | None = None
) -> Container:
    """`docker run -d` as compose's api runs (an init, its grace period) and as the Kubernetes
    pods run (read-only root, a tmpfs /tmp), the volume at /checkpoints, port 8000 published on
    a free port of 127.0.0.1."""
    name = f"vae-test-{uuid.uuid4().hex[:8]}"
    environment = [arg for key, value in (env or {}).items() for arg in ("-e", f"{key}={value}")]
    run(
        [
            engine, "run", "-d", "--name", name, "--init", "--read-only", "--tmpfs", "/tmp",
            "--stop-timeout", str(GRACE_S), "-p", "127.0.0.1::8000",
            "-v", f"{volume}:/checkpoints", *environment, image, *command,
        ]
    )  # fmt: skip
    return Container(engine, name)


@pytest.fixture(scope="module")
def volume(engine: str) -> Iterator[str]:
    name = f"vae-test-checkpoints-{uuid.uuid4().hex[:8]}"
    run([engine, "volume", "create", name])
    yield name
    subprocess.run([engine, "volume", "rm", "-f", name], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def api(engine: str, image: str, volume: str) -> Iterator[Container]:
    """compose's api command, with the fast first-start preset, on an empty named volume."""
    container = start(
        engine, image, volume, "python", "-m", "app", "--train-if-missing",
        "--train-preset", FAST_PRESET,
    )  # fmt: skip
    yield container
    container.remove()


def test_a_source_edit_rebuilds_only_the_projects_own_layers(
    engine: str, image: str, tmp_path: Path
) -> None:
    """The dependency install and the runtime stage's copy of it (gigabytes, with torch) come
    from the layer cache when only the source changed."""
    context = tmp_path / "context"
    context.mkdir()
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, context / name)
    for package in ("app", "models", "training"):
        shutil.copytree(
            REPO / package, context / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    token = uuid.uuid4().hex[:8]
    with (context / "app" / "__init__.py").open("a") as module:
        # unique per run: the builder's cache outlives the run (CI machines are reused), and a
        # fixed edit would find its own layer from an earlier run already built
        module.write(f"# an edit {token}\n")
    tag = f"vae-serve:cache-check-{token}"
    try:
        log = build_image(engine, tag=tag, context=str(context))
    finally:
        subprocess.run([engine, "rmi", tag], capture_output=True, timeout=120)
    steps = dict(re.findall(r"^#(\d+) \[([^\]]+\] .*)$", log, flags=re.MULTILINE))
    cached = set(re.findall(r"^#(\d+) CACHED$", log, flags=re.MULTILINE))
    by_title = {title: number for number, title in steps.items()}
    install_deps = [n for t, n in by_title.items() if "pip install -r" in t]
    copy_deps = [n for t, n in by_title.items() if "COPY --from=build /opt/venv" in t]
    build_wheel = [n for t, n in by_title.items() if "pip wheel" in t]
    assert install_deps and copy_deps and build_wheel, steps
    assert set(install_deps + copy_deps) <= cached, log[-6000:]
    assert not set(build_wheel) & cached  # the edit was seen: the project was rebuilt


def test_the_image_declares_what_compose_and_kubernetes_rely_on(engine: str, image: str) -> None:
    config = json.loads(run([engine, "image", "inspect", "-f", "{{json .Config}}", image]))
    assert config["User"].split(":")[0] == "10001"
    assert "8000/tcp" in config["ExposedPorts"]
    assert config["Cmd"] == ["python", "-m", "app"]
    check = config["Healthcheck"]
    assert "/readyz" in " ".join(check["Test"])
    # A first start trains before anything listens: as long in a `docker run` as in compose.
    start_period = COMPOSE["api"]["healthcheck"]["start_period"]
    assert check["StartPeriod"] == int(start_period.removesuffix("m")) * 60 * 10**9


def test_it_runs_as_uid_10001_on_a_read_only_root_with_a_tmpfs_tmp(api: Container) -> None:
    assert api.exec("id", "-u").stdout.strip() == "10001"
    assert api.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
    refused = api.exec("touch", "/home/vae/x", check=False)
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    api.exec("touch", "/tmp/upload")
    mounts = api.exec("cat", "/proc/mounts").stdout
    assert re.search(r"^\S+ /tmp tmpfs ", mounts, flags=re.MULTILINE), mounts


def test_the_image_carries_the_grpc_extra(api: Container) -> None:
    """VAE_GRPC_PORT works in the image: the `grpc` extra's packages are installed."""
    done = api.exec("python", "-c", "import grpc, tritonclient.grpc; print(grpc.__version__)")
    assert done.stdout.strip()


def test_the_first_start_trains_into_the_empty_volume_and_turns_healthy(api: Container) -> None:
    api.wait_healthy(FIRST_START_S)  # the engine ran the image's HEALTHCHECK, and it passed
    logs = api.logs()
    assert TRAINING_LINE in logs
    assert "ready: serving default" in logs


def digit_png() -> bytes:
    return encode_png(to_float(load_dataset("mnist-5k").test.images[:1])[0])


def test_it_serves_through_the_published_port(api: Container) -> None:
    api.wait_healthy(FIRST_START_S)
    url = api.published(8000)
    assert url.startswith("http://127.0.0.1:")
    with httpx2.Client(base_url=url, timeout=60) as http:
        sevens = http.post("/sample", params={"digit": 7})
        assert sevens.status_code == 200, sevens.text
        assert sevens.headers["content-type"] == "image/png"
        assert sevens.content.startswith(b"\x89PNG")
        scored = http.post("/anomaly-score", files={"file": ("d.png", digit_png(), "image/png")})
        assert scored.status_code == 200, scored.text
        (item,) = scored.json()["items"]
        assert isinstance(item["score"], float) and 0 <= item["digit"] <= 9
        inferred = http.post(
            "/v2/models/default-sample/infer",
            json={
                "inputs": [{"name": "digit", "shape": [2], "datatype": "INT64", "data": [3, 7]}],
                "outputs": [{"name": "digit"}],
            },
        )
        assert inferred.status_code == 200, inferred.text
        (digits,) = inferred.json()["outputs"]
        assert digits["data"] == [3, 7]
        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        counted = {
            sample.labels["route"]: sample.value
            for family in text_string_to_metric_families(metrics.text)
            for sample in family.samples
            if sample.name == "vae_request_duration_seconds_count"
            and sample.labels["status"] == "200"
        }
        assert counted["/sample"] >= 1 and counted["/anomaly-score"] >= 1, counted


def test_a_restart_serves_the_checkpoint_in_the_volume_without_training(api: Container) -> None:
    api.wait_healthy(FIRST_START_S)
    # Every worker (one per core by default) says it is ready, after the restart as before it.
    ready_once = api.logs().count("ready: serving default")
    assert ready_once >= 1
    run([api.engine, "restart", api.name], timeout_s=GRACE_S + 60)
    api.wait_healthy(300)
    logs = api.logs()
    assert logs.count(TRAINING_LINE) == 1
    assert logs.count("ready: serving default") == 2 * ready_once


def test_docker_stop_drains_and_exits_0_within_the_grace_period(api: Container) -> None:
    api.wait_healthy(300)
    started = time.monotonic()
    run([api.engine, "stop", api.name], timeout_s=GRACE_S + 60)
    took = time.monotonic() - started
    assert api.inspect("{{.State.ExitCode}}") == "0", api.logs()[-3000:]
    assert took < GRACE_S, took  # it stopped itself: the engine did not have to SIGKILL it
    tail = api.logs().rsplit("ready: serving default", 1)[1]
    for line in (
        "Shutting down",
        "Waiting for application shutdown",
        "Application shutdown complete",
    ):
        assert line in tail, tail


def test_sigterm_during_first_start_training_reaches_python_through_the_init(
    engine: str, image: str
) -> None:
    volume = f"vae-test-stop-{uuid.uuid4().hex[:8]}"
    container = start(
        engine, image, volume, "python", "-m", "app", "--train-if-missing",
        "--train-preset", FAST_PRESET,
    )  # fmt: skip
    try:
        container.wait_log("training preset", 300)
        started = time.monotonic()
        run([engine, "stop", container.name], timeout_s=GRACE_S + 60)
        took = time.monotonic() - started
        assert container.inspect("{{.State.ExitCode}}") == "0", container.logs()[-3000:]
        assert took < GRACE_S, took
        assert "SIGTERM: stopped the first-start training" in container.logs()
    finally:
        container.remove()
        subprocess.run([engine, "volume", "rm", "-f", volume], capture_output=True, timeout=120)


def test_the_trainer_command_writes_a_checkpoint_the_api_serves(
    engine: str, image: str, volume: str
) -> None:
    """compose's trainer (`python -m training --out /checkpoints/<preset>`), one short epoch
    here, into the api's volume; then an api told to serve that folder serves it."""
    run(
        [
            engine, "run", "--rm", "--init", "--read-only", "--tmpfs", "/tmp",
            "-v", f"{volume}:/checkpoints", image,
            "python", "-m", "training", "--preset", FAST_PRESET, "--epochs", "1",
            "--out", "/checkpoints/retrained", "--no-progress",
        ],
        timeout_s=FIRST_START_S,
    )  # fmt: skip
    api = start(engine, image, volume, env={"VAE_CHECKPOINTS": "/checkpoints/retrained"})
    try:
        api.wait_healthy(300)
        with httpx2.Client(base_url=api.published(8000), timeout=60) as http:
            models = http.get("/models").json()
            assert models["default"] == "retrained", models
            assert [m["name"] for m in models["models"]] == ["retrained"], models
            assert http.post("/sample", params={"digit": 7}).status_code == 200
    finally:
        api.remove()
