"""Tests for app.http.routes.system and app.http.middleware: cards, health, readiness, metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from app_testing import JSON_ACCEPT, files, label_values, metric, metrics_text, png_of
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from app.settings import Settings

MnistTest = tuple[torch.Tensor, torch.Tensor]
ROUTES = {
    "/sample",
    "/decode",
    "/interpolate",
    "/variations",
    "/encode",
    "/reconstruct",
    "/anomaly-score",
    "/models",
    "/healthz",
    "/readyz",
    "/metrics",
}


def request_count(client: TestClient, route: str, method: str, status: int) -> float:
    labels = {"route": route, "method": method, "status": str(status)}
    return metric(client, "vae_request_duration_seconds_count", labels)


# ---- /models, /healthz, /readyz -------------------------------------------------------------


def test_models_describes_the_checkpoint(
    client: TestClient, trained_checkpoint: Path, checkpoint_config: dict[str, Any]
) -> None:
    response = client.get("/models")
    assert response.status_code == 200
    body = response.json()
    (card,) = body["models"]
    assert body["default"] == card["name"] == trained_checkpoint.name
    model = checkpoint_config["model"]
    assert card["architecture"] == model["architecture"]
    assert card["latent_dim"] == model["latent_dim"]
    assert card["conditional"] is True and card["num_classes"] == model["num_classes"]
    assert card["device"] == "cpu"
    assert card["metrics"] == checkpoint_config["metrics"]
    assert card["anomaly"]["threshold"] == checkpoint_config["anomaly"]["threshold"]
    assert "quantiles" not in card["anomaly"]  # 100 numbers of no use to a client
    assert card["weights_sha256"] == checkpoint_config["weights_sha256"]


def test_models_lists_every_model_default_first(multi_client: TestClient) -> None:
    body = multi_client.get("/models").json()
    assert body["default"] == "conditional"
    assert [m["name"] for m in body["models"]] == ["conditional", "unconditional"]
    assert [m["conditional"] for m in body["models"]] == [True, False]


def test_model_query_selects_the_model(multi_client: TestClient) -> None:
    for name in ("conditional", "unconditional"):
        response = multi_client.post("/sample", params={"model": name}, headers=JSON_ACCEPT)
        assert response.json()["model"] == name
    default = multi_client.post("/sample", headers=JSON_ACCEPT).json()
    assert default["model"] == "conditional"
    assert default["digits"] is not None


def test_healthz_and_readyz(client: TestClient, model_name: str) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "models": [model_name]}


def test_not_ready_while_the_lifespan_has_not_run(trained_checkpoint: Path) -> None:
    client = TestClient(create_app(Settings(checkpoints=str(trained_checkpoint))))
    assert client.get("/healthz").status_code == 200  # alive before ready
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert int(ready.headers["retry-after"]) >= 1
    sample = client.post("/sample")
    assert sample.status_code == 503 and "retry-after" in sample.headers
    assert client.get("/metrics").status_code == 200  # scrapeable while loading
    # Starting the lifespan loads the models: the same app becomes ready.
    with client:
        assert client.get("/readyz").status_code == 200
        assert client.post("/sample").status_code == 200
    # And stopping it makes the app unready again.
    assert client.get("/readyz").status_code == 503


def test_readiness_flag_gates_the_model_endpoints(client: TestClient) -> None:
    service = client.app.state.service  # type: ignore[attr-defined]
    service.ready = False
    try:
        assert client.get("/readyz").status_code == 503
        response = client.post("/sample")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert client.get("/models").status_code == 503
        assert client.get("/healthz").status_code == 200
    finally:
        service.ready = True
    assert client.get("/readyz").status_code == 200
    assert client.post("/sample").status_code == 200


# ---- /metrics -------------------------------------------------------------------------------


def test_metrics_is_prometheus_text_with_the_contract_names(
    client: TestClient, model_name: str, checkpoint_config: dict[str, Any]
) -> None:
    client.post("/sample")
    client.post("/anomaly-score", files=files(png_of(torch.zeros(1, 28, 28))))
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    kinds = {family.name: family.type for family in text_string_to_metric_families(text)}
    expected = {
        "vae_request_duration_seconds": "histogram",
        "vae_requests_in_flight": "gauge",
        "vae_requests_rejected": "counter",
        "vae_inference_duration_seconds": "histogram",
        "vae_batch_size": "histogram",
        "vae_anomaly_score": "histogram",
        "vae_model_info": "gauge",
        "vae_queue_depth": "gauge",
    }
    assert {name: kinds.get(name) for name in expected} == expected
    info = {
        "model": model_name,
        "architecture": checkpoint_config["model"]["architecture"],
        "device": "cpu",
    }
    assert metric(client, "vae_model_info", info, text) == 1.0
    assert metric(client, "vae_queue_depth", {"model": model_name}, text) == 0.0
    # The scrape itself is the one request in flight.
    assert metric(client, "vae_requests_in_flight", text=text) == 1.0


def test_request_metrics_move_and_use_the_route_template(client: TestClient) -> None:
    before = request_count(client, "/sample", "POST", 200)
    client.post("/sample?n=2&seed=3&nrow=1")
    client.post("/sample", params={"digit": 4})
    assert request_count(client, "/sample", "POST", 200) == before + 2
    failed = request_count(client, "/sample", "POST", 422)
    client.post("/sample?n=0")
    assert request_count(client, "/sample", "POST", 422) == failed + 1


def test_unmatched_paths_are_labelled_unmatched(client: TestClient) -> None:
    before = request_count(client, "unmatched", "GET", 404)
    client.get("/nope/12345?x=1")
    client.get("/sample-but-not-really")
    assert request_count(client, "unmatched", "GET", 404) == before + 2
    routes = label_values(metrics_text(client), "vae_request_duration_seconds_count", "route")
    assert routes <= ROUTES | {"unmatched"}, routes - ROUTES


def test_route_label_is_the_template_when_refused_before_routing(
    limits_client: TestClient,
) -> None:
    """A body over the limit is refused by middleware before routing; the label is still the
    route's template."""
    before = request_count(limits_client, "/encode", "POST", 413)
    response = limits_client.post("/encode?x=1", files=files(bytes(2 * 2**20)))
    assert response.status_code == 413
    assert request_count(limits_client, "/encode", "POST", 413) == before + 1
    routes = label_values(
        metrics_text(limits_client), "vae_request_duration_seconds_count", "route"
    )
    assert routes <= ROUTES | {"unmatched"}


@pytest.mark.parametrize(
    ("path", "kwargs", "reason"),
    [
        ("/sample", {"params": {"model": "nope"}}, "unknown_model"),
        ("/sample", {"params": {"temperature": "nan"}}, "invalid"),
        ("/encode", {"files": [("file", ("a.txt", b"text", "text/plain"))]}, "bad_image"),
        ("/encode", {"files": [("file", ("a.png", b"", "image/png"))] * 70}, "too_large"),
        ("/decode", {"json": {"z": [[0.0]]}}, "invalid"),
    ],
)
def test_rejections_are_counted_by_reason(
    client: TestClient, path: str, kwargs: dict[str, Any], reason: str
) -> None:
    labels = {"reason": reason}
    before = metric(client, "vae_requests_rejected_total", labels)
    assert client.post(path, **kwargs).status_code >= 400
    assert metric(client, "vae_requests_rejected_total", labels) == before + 1


def test_bad_request_reason_on_the_unconditional_model(multi_client: TestClient) -> None:
    labels = {"reason": "bad_request"}
    before = metric(multi_client, "vae_requests_rejected_total", labels)
    response = multi_client.post("/sample", params={"model": "unconditional", "digit": 1})
    assert response.status_code == 400
    assert metric(multi_client, "vae_requests_rejected_total", labels) == before + 1


@pytest.mark.parametrize(
    ("op", "path", "images"),
    [
        ("sample", "/sample", 5),
        ("decode", "/sample prior=standard", 4),
        ("encode", "/encode", 3),
        ("reconstruct", "/reconstruct", 2),
    ],
)
def test_inference_and_batch_size_histograms(
    client: TestClient, mnist_test: MnistTest, model_name: str, op: str, path: str, images: int
) -> None:
    labels = {"model": model_name, "op": op}
    batches = metric(client, "vae_batch_size_count", labels)
    batched_images = metric(client, "vae_batch_size_sum", labels)
    passes = metric(client, "vae_inference_duration_seconds_count", labels)
    seconds = metric(client, "vae_inference_duration_seconds_sum", labels)
    if op in ("sample", "decode"):
        # The fitted prior's draws go through the digit-checking "sample" op; N(0, I) decodes.
        route, _, prior = path.partition(" prior=")
        response = client.post(route, params={"n": images, **({"prior": prior} if prior else {})})
    else:
        uploads = [png_of(image) for image in mnist_test[0][:images]]
        response = client.post(path, files=files(*uploads))
    assert response.status_code == 200
    # One request alone is one forward pass of exactly its images.
    assert metric(client, "vae_batch_size_count", labels) == batches + 1
    assert metric(client, "vae_batch_size_sum", labels) == batched_images + images
    assert metric(client, "vae_inference_duration_seconds_count", labels) == passes + 1
    assert metric(client, "vae_inference_duration_seconds_sum", labels) > seconds


def test_anomaly_op_metrics(client: TestClient, model_name: str) -> None:
    labels = {"model": model_name, "op": "anomaly"}
    before = metric(client, "vae_batch_size_sum", labels)
    scores = metric(client, "vae_anomaly_score_count", {"model": model_name})
    blank = png_of(torch.zeros(1, 28, 28))
    assert client.post("/anomaly-score", files=files(blank, blank)).status_code == 200
    assert metric(client, "vae_batch_size_sum", labels) == before + 2
    assert metric(client, "vae_anomaly_score_count", {"model": model_name}) == scores + 2


def test_metrics_are_per_model(
    multi_client: TestClient, named_checkpoints: dict[str, Path]
) -> None:
    labels = {"model": "unconditional", "op": "decode"}
    before = metric(multi_client, "vae_batch_size_sum", labels)
    other = metric(multi_client, "vae_batch_size_sum", {"model": "conditional", "op": "decode"})
    multi_client.post("/sample", params={"model": "unconditional", "n": 4})
    assert metric(multi_client, "vae_batch_size_sum", labels) == before + 4
    assert (
        metric(multi_client, "vae_batch_size_sum", {"model": "conditional", "op": "decode"})
        == other
    )
    text = metrics_text(multi_client)
    assert label_values(text, "vae_model_info", "model") == {"conditional", "unconditional"}
    architectures = {
        json.loads((path / "config.json").read_text())["model"]["architecture"]
        for path in named_checkpoints.values()
    }
    assert label_values(text, "vae_model_info", "architecture") == architectures
