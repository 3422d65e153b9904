"""bench/peers/section.py: each case of the peers section, as the project is asked it, is work
the project answers (200, the outputs the peer gives too); no peer venv needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from bench.peers.section import BINARY_HEADER, build_cases
from bench.serving import peer_inputs


@pytest.mark.slow
def test_every_peer_case_is_work_the_project_answers(trained_checkpoint: Path) -> None:
    image, latent = peer_inputs(trained_checkpoint)
    assert image.shape == (28, 28) and 0.0 <= image.min() < image.max() <= 1.0
    cases = build_cases(trained_checkpoint.name, image, latent)
    assert {case.name for case in cases} == {
        "sample_c32",
        "anomaly_json_c8",
        "anomaly_binary_c8",
        "decode_json_c32",
        "decode_binary_c32",
    }
    with TestClient(create_app(Settings(checkpoints=str(trained_checkpoint)))) as client:
        for case in cases:
            request = case.project
            headers = dict(request.headers)
            if request.content_type:
                headers["content-type"] = request.content_type
            answer = client.request(
                request.method, request.target, content=request.body, headers=headers
            )
            assert answer.status_code == 200, (case.name, answer.text)
            if case.name == "sample_c32":
                assert answer.headers["content-type"] == "image/png"
                continue
            if BINARY_HEADER in dict(request.headers):
                length = int(answer.headers[BINARY_HEADER.lower()])
                head = json.loads(answer.content[:length])
                assert all("binary_data_size" in out["parameters"] for out in head["outputs"])
            else:
                head = answer.json()
            outputs = {out["name"]: out for out in head["outputs"]}
            if case.name.startswith("anomaly"):
                # What the Triton peer answers too (bench/peers/triton_server.py).
                assert set(outputs) == {
                    "score",
                    "is_anomaly",
                    "digit",
                    "digit_probability",
                    "percentile",
                }
                if "data" in outputs["digit"]:
                    assert outputs["digit"]["data"] == [7]  # a real held-out 7
            else:
                assert outputs["images"]["shape"] == [1, 28, 28]
                if "data" in outputs["images"]:
                    pixels = np.asarray(outputs["images"]["data"], dtype=np.float32)
                    assert 0.0 <= pixels.min() < pixels.max() <= 1.0
