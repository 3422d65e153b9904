"""docker-compose.yml brought up for real: podman-compose on podman runs the project's compose file
with a CI override (tests/deploy/compose-ci/: no GPU reservation, a seconds-long first-start
preset, Prometheus from Debian's package). The api trains into its empty volume and turns
healthy by its own healthcheck, and the compose Prometheus, with the project's config and rules,
scrapes it: its targets API shows the api up and a vae_ series is queryable."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx2
import pytest
from containers import BASE_IMAGE, IMAGE, run, unavailable, wait_for
from deploy_tools import REPO, tool

pytestmark = pytest.mark.slow

OVERRIDE = REPO / "tests" / "deploy" / "compose-ci" / "docker-compose.ci.yml"
PROMETHEUS_IMAGE = "vae-ci-prometheus:bookworm"
# The api's start period (20m): a first start on a loaded machine takes many minutes.
FIRST_START_S = 1200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def podman() -> str:
    info = subprocess.run(["podman", "info"], capture_output=True, text=True, timeout=120)
    if info.returncode != 0:
        unavailable(f"podman does not run here (`podman info`): {info.stderr.strip()[-300:]}")
    return "podman"


def image_id(engine: str, image: str) -> str | None:
    found = subprocess.run(
        [engine, "image", "inspect", "-f", "{{.Id}}", image],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return found.stdout.strip().removeprefix("sha256:") if found.returncode == 0 else None


def copy_image(docker: str, image: str) -> None:
    """The Docker engine's image into podman (`docker save | podman load`), unless podman
    already has that very image: one build serves both engines."""
    wanted = image_id(docker, image)
    assert wanted, f"{image} is not in the Docker engine"
    if image_id("podman", image) == wanted:
        return
    with subprocess.Popen([docker, "save", image], stdout=subprocess.PIPE) as save:
        assert save.stdout is not None
        loaded = subprocess.run(
            ["podman", "load"], stdin=save.stdout, capture_output=True, text=True, timeout=1200
        )
        save.stdout.close()
        save.wait(timeout=60)
    assert save.returncode == 0 and loaded.returncode == 0, loaded.stderr
    assert image_id("podman", image) == wanted


@dataclass
class Compose:
    project: str
    api_url: str
    prometheus_url: str

    def container(self, service: str) -> str:
        labels = (
            f"com.docker.compose.project={self.project}",
            f"com.docker.compose.service={service}",
        )
        filters = [arg for label in labels for arg in ("--filter", f"label={label}")]
        names = run(["podman", "ps", "-a", *filters, "--format", "{{.Names}}"]).split()
        assert len(names) == 1, names
        return names[0]

    def logs(self, service: str = "api") -> str:
        result = subprocess.run(
            ["podman", "logs", self.container(service)], capture_output=True, text=True, timeout=60
        )
        return result.stdout + result.stderr

    def prometheus(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.prometheus_url}{path}{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]


@pytest.fixture(scope="module")
def compose(engine: str, image: str) -> Iterator[Compose]:
    podman()
    podman_compose = tool("podman-compose")
    copy_image(engine, image)
    if image_id("podman", PROMETHEUS_IMAGE) is None:
        base = BASE_IMAGE or "vae-ci-base:bookworm"
        copy_image(engine, base)
        run(
            [
                "podman", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",
                "-f", str(OVERRIDE.with_name("prometheus.Dockerfile")), "-t", PROMETHEUS_IMAGE,
                str(OVERRIDE.parent),
            ],
            timeout_s=600,
        )  # fmt: skip
    project = f"vae-ci-{uuid.uuid4().hex[:8]}"
    api_port, prometheus_port = free_port(), free_port()
    env = {
        **os.environ,
        "API_PORT": str(api_port),
        "PROMETHEUS_PORT": str(prometheus_port),
        "VAE_IMAGE_TAG": IMAGE.split(":")[1],
    }
    argv = [podman_compose, "-p", project, "-f", "docker-compose.yml", "-f", str(OVERRIDE)]
    up = subprocess.run(
        [*argv, "up", "-d", "api", "prometheus"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield Compose(
            project, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{prometheus_port}"
        )
    finally:
        subprocess.run(
            [*argv, "down", "-v", "-t", "45"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip


def wait_healthy(compose: Compose) -> None:
    """Until the api's healthcheck (the image's, as compose declares it) has passed."""
    api = compose.container("api")

    def healthy() -> bool | None:
        # No systemd here to schedule podman's healthchecks: run the image's check as the timer
        # would; the engine records the result, read back below.
        subprocess.run(["podman", "healthcheck", "run", api], capture_output=True, timeout=60)
        state = run(["podman", "inspect", "-f", "{{.State.Status}} {{.State.Health.Status}}", api])
        assert not state.startswith("exited"), f"{state}\n{compose.logs()[-6000:]}"
        return True if state.split()[-1] == "healthy" else None

    wait_for(healthy, "the compose api to turn healthy", FIRST_START_S, compose.logs)


def test_the_api_trains_on_its_first_start_and_turns_healthy(compose: Compose) -> None:
    wait_healthy(compose)
    api = compose.container("api")
    assert "training the tiny preset into it first" in compose.logs()
    assert run(["podman", "exec", api, "id", "-u"]).strip() == "10001"
    # Published as compose publishes it (API_PORT), and answering there.
    sevens = httpx2.post(f"{compose.api_url}/sample", params={"digit": 7}, timeout=60)
    assert sevens.status_code == 200 and sevens.content.startswith(b"\x89PNG")


def test_prometheus_scrapes_the_api(compose: Compose) -> None:
    wait_healthy(compose)
    for seed in range(5):
        made = httpx2.post(
            f"{compose.api_url}/sample", params={"digit": 7, "seed": seed}, timeout=60
        )
        assert made.status_code == 200, made.text

    def api_up() -> bool | None:
        try:
            targets = compose.prometheus("/api/v1/targets")["activeTargets"]
        except (urllib.error.URLError, ConnectionError):
            return None
        return (
            True
            if [t for t in targets if t["labels"]["job"] == "vae-api" and t["health"] == "up"]
            else None
        )

    wait_for(api_up, "Prometheus to scrape the api", 120, lambda: compose.logs("prometheus"))
    # The requests above, counted by the api and scraped: a vae_ series, queryable. The first
    # scrape may predate them (Prometheus can scrape as soon as the api answers), so wait for
    # a scrape that includes them rather than for any series.
    seen: dict[str, float] = {}

    def requests_counted() -> bool | None:
        found = compose.prometheus(
            "/api/v1/query",
            query='sum by (route) (vae_request_duration_seconds_count{job="vae-api"})',
        )["result"]
        seen.clear()
        seen.update({s["metric"]["route"]: float(s["value"][1]) for s in found})
        return True if seen.get("/sample", 0) >= 5 else None

    wait_for(requests_counted, "the /sample requests in Prometheus", 60, lambda: repr(seen))
    # The project's rules loaded and evaluate cleanly against this api.
    groups = compose.prometheus("/api/v1/rules")["groups"]
    assert groups and all(r["health"] != "err" for g in groups for r in g["rules"]), groups
