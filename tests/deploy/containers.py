"""The container engines the image and compose tests drive: a Docker engine for the image
(built once per session), podman with podman-compose for `docker-compose.yml`. Where no engine
runs, the tests skip and say why; under CI (CI=true, where .ci/run starts the engines) they fail
instead, so a broken engine setup cannot pass as a skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import pytest
from deploy_tools import REPO

# The tag the tests build and compose runs (VAE_IMAGE_TAG=ci).
IMAGE = "vae-serve:ci"
# The base .ci/run makes (.ci/container-base, Debian bookworm's python3: no registry is
# reachable in CI); unset, the build uses the Dockerfile's own default, the CUDA PyTorch image.
BASE_IMAGE = os.environ.get("VAE_TEST_BASE_IMAGE")
# The first-start preset of the tests: seconds of training, where the default takes minutes.
FAST_PRESET = "tiny"

T = TypeVar("T")


def unavailable(reason: str) -> None:
    """Skip for want of an engine, or fail under CI, which must have one."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


def run(argv: Sequence[str], timeout_s: float = 300, check: bool = True) -> str:
    """A command's stdout; on failure (with `check`) the test fails with its output."""
    result = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "DOCKER_BUILDKIT": "1"},
    )
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {result.returncode}\n{result.stdout}{result.stderr}")
    return result.stdout


def docker() -> str:
    """The docker CLI ($DOCKER, else `docker`) of an engine that answers."""
    name = os.environ.get("DOCKER", "docker")
    path = shutil.which(name)
    if path is None:
        unavailable(f"no `{name}` on PATH: the image is built and run by a real Docker engine")
    assert path is not None
    info = subprocess.run([path, "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        unavailable(f"no Docker engine answers `{path} info`: {info.stderr.strip()[-300:]}")
    return path


def build_image(engine: str, tag: str = IMAGE, context: str = str(REPO)) -> str:
    """`docker build` of the project's Dockerfile (BuildKit, plain progress); its log."""
    base = ["--build-arg", f"BASE_IMAGE={BASE_IMAGE}"] if BASE_IMAGE else []
    # The host's network: pip in the build reaches the package index as the host does.
    argv = [engine, "build", "--progress=plain", "--network=host", *base, "-t", tag, context]
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "DOCKER_BUILDKIT": "1"},
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-8000:]
    return log


def wait_for(
    condition: Callable[[], T | None], what: str, timeout_s: float, log: Callable[[], str]
) -> T:
    """Polls `condition` until it returns something other than None."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{log()[-6000:]}")
        time.sleep(1)


@dataclass
class Container:
    """A container started with `docker run -d` (or podman's equivalent)."""

    engine: str
    name: str

    def inspect(self, template: str) -> str:
        return run([self.engine, "inspect", "-f", template, self.name]).strip()

    def logs(self) -> str:
        result = subprocess.run(
            [self.engine, "logs", self.name], capture_output=True, text=True, timeout=60
        )
        return result.stdout + result.stderr

    def health(self) -> str:
        return self.inspect("{{.State.Health.Status}}")

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.engine, "exec", self.name, *argv], capture_output=True, text=True, timeout=60
        )
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    def published(self, port: int) -> str:
        """The 127.0.0.1 address its container `port` is published on, as http://host:port."""
        (line,) = run([self.engine, "port", self.name, f"{port}/tcp"]).split()
        return f"http://{line}"

    def wait_healthy(self, timeout_s: float) -> None:
        """Until the engine runs the image's own HEALTHCHECK and it passes."""

        def healthy() -> bool | None:
            state = self.inspect("{{.State.Status}} {{.State.Health.Status}}")
            assert not state.startswith("exited"), f"{state}\n{self.logs()[-6000:]}"
            return True if state.endswith(" healthy") else None

        wait_for(healthy, f"{self.name} to turn healthy", timeout_s, self.logs)

    def wait_log(self, text: str, timeout_s: float) -> None:
        wait_for(
            lambda: True if text in self.logs() else None,
            f"{text!r} in the log of {self.name}",
            timeout_s,
            self.logs,
        )

    def remove(self) -> None:
        subprocess.run([self.engine, "rm", "-f", "-v", self.name], capture_output=True, timeout=120)
