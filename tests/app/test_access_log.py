"""The JSON access log (app/http/access_log.py): the lines a real `python -m app` writes for
real requests, field by field; and no access line at all when it is off."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import torch
from app_testing import LiveApp, png_of, post_uploads_together, start_app, stop_app

pytestmark = pytest.mark.slow

KEY = "log-key-0123456789abcdef"
BATCH_WAIT_MS = 600  # long enough that two requests sent at once share one forward pass
FIELDS = {
    "time", "request_id", "method", "route", "status", "duration_ms", "model", "model_version",
    "images", "batch_size", "key_id",
}  # fmt: skip


@pytest.fixture(scope="module")
def server(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    """VAE_ACCESS_LOG=json, a key, and a batch wait that makes concurrent requests batch."""
    settings = {
        "checkpoints": str(trained_checkpoint),
        "device": "cpu",
        "log_level": "info",
        "access_log": "json",
        "api_keys": f"alice:user:{KEY}",
        "max_batch_wait_ms": str(BATCH_WAIT_MS),
    }
    app = start_app(
        tmp_path_factory.mktemp("access") / "server.log", ready_within_s=120, settings=settings
    )
    yield app
    stop_app(app)


@pytest.fixture(scope="module")
def card(server: LiveApp) -> dict[str, Any]:
    (model,) = httpx2.get(f"{server.base}/models", headers=KEYED, timeout=10).json()["models"]
    return dict(model)


KEYED = {"Authorization": f"Bearer {KEY}"}


def access_lines(log: Path) -> list[dict[str, Any]]:
    """The log's JSON access lines (the other lines are text)."""
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    return [json.loads(line) for line in lines]


def line_of(log: Path, request_id: str) -> dict[str, Any]:
    """The one access line of `request_id`, once it is written (after the response)."""
    deadline = time.monotonic() + 10
    while True:
        found = [line for line in access_lines(log) if line["request_id"] == request_id]
        if found:
            (line,) = found
            assert set(line) == FIELDS, line
            return line
        assert time.monotonic() < deadline, f"no access line for {request_id}"
        time.sleep(0.05)


def test_a_sample_request_has_every_field(server: LiveApp, card: dict[str, Any]) -> None:
    started = time.perf_counter()
    response = httpx2.post(
        f"{server.base}/sample?n=3&digit=7",
        headers={**KEYED, "X-Request-ID": "log-sample"},
        timeout=30,
    )
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert response.status_code == 200
    line = line_of(server.log, "log-sample")
    assert line["method"] == "POST" and line["route"] == "/sample" and line["status"] == 200
    # The request waited out the batch wait, and the client waited for all of it.
    assert BATCH_WAIT_MS <= line["duration_ms"] <= elapsed_ms
    assert line["model"] == card["name"]
    assert line["model_version"] == card["weights_sha256"][:12]
    assert line["images"] == 3 and line["batch_size"] == 3  # alone in its forward pass
    assert line["key_id"] == "alice"
    assert line["time"].endswith("+00:00")
    # uvicorn's text access line is replaced, not doubled.
    assert '"POST /sample?n=3&digit=7 HTTP/1.1"' not in server.log.read_text()


def test_batch_size_is_the_micro_batch_the_request_ran_in(
    server: LiveApp, mnist_test: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Two uploads sent at once (1 and 2 images) share a forward pass of 3 images."""
    images, _ = mnist_test
    uploads = {
        "log-batch-a": [png_of(images[0])],
        "log-batch-b": [png_of(images[1]), png_of(images[2])],
    }
    statuses = post_uploads_together(
        server.base,
        list(uploads.values()),
        [{**KEYED, "X-Request-ID": request_id} for request_id in uploads],
    )
    assert statuses == [200, 200]
    for request_id, blobs in uploads.items():
        line = line_of(server.log, request_id)
        assert line["route"] == "/anomaly-score" and line["status"] == 200
        assert line["images"] == len(blobs)
        assert line["batch_size"] == 3


def test_routes_are_templates_and_refusals_are_logged(
    server: LiveApp, card: dict[str, Any]
) -> None:
    model = f"{card['name']}-decode"
    latent = card["latent_dim"]
    z = {"name": "z", "datatype": "FP32", "shape": [1, latent], "data": [0.0] * latent}
    digit = {"name": "digit", "datatype": "INT64", "shape": [1], "data": [3]}
    body = {"inputs": [z, digit]}
    v2 = httpx2.post(
        f"{server.base}/v2/models/{model}/infer",
        json=body,
        headers={**KEYED, "X-Request-ID": "log-v2"},
        timeout=30,
    )
    assert v2.status_code == 200, v2.text
    line = line_of(server.log, "log-v2")
    assert line["route"] == "/v2/models/{model_name}/infer"  # never the raw path
    assert (line["model"], line["images"], line["batch_size"]) == (card["name"], 1, 1)

    refused = httpx2.post(
        f"{server.base}/sample?n=99999", headers={**KEYED, "X-Request-ID": "log-422"}, timeout=10
    )
    assert refused.status_code == 422
    line = line_of(server.log, "log-422")
    assert (line["status"], line["route"], line["key_id"]) == (422, "/sample", "alice")
    assert line["model"] is line["images"] is line["batch_size"] is None  # no model work

    anonymous = httpx2.post(f"{server.base}/sample", headers={"X-Request-ID": "log-401"})
    assert anonymous.status_code == 401
    line = line_of(server.log, "log-401")
    assert (line["status"], line["key_id"], line["model"]) == (401, None, None)

    probe = httpx2.get(f"{server.base}/healthz", headers={"X-Request-ID": "log-probe"})
    assert probe.status_code == 200
    line = line_of(server.log, "log-probe")
    assert (line["method"], line["route"], line["status"]) == ("GET", "/healthz", 200)


def test_no_access_line_when_off(trained_checkpoint: Path, tmp_path: Path) -> None:
    settings = {
        "checkpoints": str(trained_checkpoint),
        "device": "cpu",
        "log_level": "info",
        "access_log": "off",
    }
    app = start_app(tmp_path / "server.log", ready_within_s=120, settings=settings)
    try:
        answer = httpx2.post(
            f"{app.base}/sample?digit=7", headers={"X-Request-ID": "quiet-1"}, timeout=30
        )
        assert answer.status_code == 200
        time.sleep(0.5)
        text = app.log.read_text()
    finally:
        stop_app(app)
    assert "ready: serving" in text  # the log is written, only the access lines are gone
    assert "quiet-1" not in text and "/sample" not in text
