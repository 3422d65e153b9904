"""Tests for app.__main__: the real server over real HTTP, and startup failures as exit codes."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import numpy as np
import pytest
import torch
from app_testing import REPO, clean_environment, open_image, png_of, start_app, stop_app
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

READY_WITHIN_S = 60.0


def run_app(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=REPO,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def server(
    trained_checkpoint: Path, tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`python -m app` on a free port, ready."""
    app = start_app(
        tmp_path / "server.log",
        "--checkpoints",
        str(trained_checkpoint),
        ready_within_s=READY_WITHIN_S,
    )
    try:
        yield app.base, app.process
    finally:
        stop_app(app)


def test_real_server_serves_and_stops_cleanly_on_sigterm(
    server: tuple[str, subprocess.Popen[bytes]], mnist_test: tuple[torch.Tensor, torch.Tensor]
) -> None:
    base, process = server
    with httpx2.Client(base_url=base, timeout=30) as http:
        sample = http.post("/sample", params={"digit": 7, "seed": 3})
        assert sample.status_code == 200
        assert sample.headers["content-type"] == "image/png"
        assert sample.headers["x-seed"] == "3"
        image = open_image(sample.content)
        assert (image.mode, image.size) == ("L", (28, 28))
        assert np.asarray(image).std() > 0

        images, labels = mnist_test
        seven = png_of(images[int((labels == 7).nonzero()[0])])
        blank = png_of(torch.zeros(1, 28, 28))
        scored = http.post(
            "/anomaly-score",
            files=[
                ("file", ("seven.png", seven, "image/png")),
                ("file", ("b.png", blank, "image/png")),
            ],
        )
        assert scored.status_code == 200
        normal, empty = scored.json()["items"]
        assert normal["score"] < empty["score"]
        assert empty["is_anomaly"]

        assert http.post("/sample", params={"digit": 10}).status_code == 422
        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        counts = {
            (s.labels["route"], s.labels["status"]): s.value
            for family in text_string_to_metric_families(metrics.text)
            for s in family.samples
            if s.name == "vae_request_duration_seconds_count"
        }
        assert counts[("/sample", "200")] == 1
        assert counts[("/sample", "422")] == 1
        assert counts[("/anomaly-score", "200")] == 1

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def assert_fails_cleanly(result: subprocess.CompletedProcess[str], *mentions: str) -> None:
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for mention in mentions:
        assert mention in errors[0]


def test_missing_checkpoint_folder_exits_2_with_one_error_line() -> None:
    result = run_app("--checkpoints", "/nonexistent")
    assert_fails_cleanly(result, "/nonexistent", "does not exist")


def flip_a_weight_byte(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))


def break_config(folder: Path) -> None:
    (folder / "config.json").write_text('{"model": ')


def drop_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


@pytest.mark.parametrize(
    ("damage", "named_file"),
    [
        (flip_a_weight_byte, "model.safetensors"),
        (break_config, "config.json"),
        (drop_weights, "model.safetensors"),
    ],
)
def test_corrupt_checkpoint_exits_2_with_one_error_line(
    tmp_path: Path,
    trained_checkpoint: Path,
    damage: Callable[[Path], None],
    named_file: str,
) -> None:
    folder = Path(shutil.copytree(trained_checkpoint, tmp_path / "damaged"))
    damage(folder)
    assert_fails_cleanly(run_app("--checkpoints", str(folder)), named_file)


def test_invalid_setting_exits_2_with_one_error_line(trained_checkpoint: Path) -> None:
    result = run_app("--checkpoints", str(trained_checkpoint), "--device", "tpu")
    assert_fails_cleanly(result, "VAE_DEVICE")
