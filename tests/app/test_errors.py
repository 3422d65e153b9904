"""Every bad input of the API contract: its status, a JSON detail, the rejection metric, and a
server that keeps answering afterwards. Never a 500."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from app_testing import files, metric, metrics_text, png_chunk, png_of
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from app.settings import Settings
from training.data import load_dataset, to_float

REASONS = {
    400: "bad_request",
    404: "unknown_model",
    413: "too_large",
    415: "bad_image",
    422: "invalid",
}


@dataclass(frozen=True)
class Dims:
    """Latent sizes of the served models, so bodies fit (or miss) them without hard-coding."""

    conditional: int
    unconditional: int | None = None


Build = Callable[[Dims], dict[str, Any]]


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    build: Build
    status: int
    server: str = "client"  # which fixture: client, multi_client or limits_client
    detail_has: str = ""
    params: dict[str, Any] = field(default_factory=dict)


# ---- inputs ---------------------------------------------------------------------------------


@cache
def digit_png() -> bytes:
    return png_of(to_float(load_dataset("mnist-5k").test.images[0]))


@cache
def huge_png(side: int = 20_000) -> bytes:
    """A valid, all-black side x side 1-bit PNG, small on disk (about 50 kB for 20000 x 20000,
    400 megapixels once decoded)."""
    rows = (b"\x00" + bytes(side // 8)) * side  # filter byte + packed bits per row
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows, 9))
        + png_chunk(b"IEND", b"")
    )


@cache
def noise_png(side: int = 64) -> bytes:
    """A real image of a few kB (noise compresses badly): over a 2000-byte limit."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def upload(*blobs: bytes, content_type: str = "image/png") -> Build:
    return lambda dims: {"files": files(*blobs, content_type=content_type)}


def lazy_upload(make: Callable[[], bytes], count: int = 1) -> Build:
    return lambda dims: {"files": files(*[make()] * count)}


def body(payload: dict[str, Any]) -> Build:
    return lambda dims: {"json": payload}


def raw(data: bytes, content_type: str) -> Build:
    return lambda dims: {"content": data, "headers": {"content-type": content_type}}


def nothing() -> Build:
    return lambda dims: {}


def z_rows(size: Callable[[Dims], int | None], digit: Any = 1, rows: int = 1) -> Build:
    def build(dims: Dims) -> dict[str, Any]:
        payload: dict[str, Any] = {"z": [[0.0] * (size(dims) or 0)] * rows}
        if digit is not None:
            payload["digit"] = digit
        return {"json": payload}

    return build


def nan_z(literal: str) -> Build:
    """A JSON body with a NaN/Infinity literal, which json.dumps-based clients never send."""

    def build(dims: Dims) -> dict[str, Any]:
        values = ", ".join([literal] + ["0"] * (dims.conditional - 1))
        data = f'{{"z": [[{values}]], "digit": 1}}'.encode()
        return {"content": data, "headers": {"content-type": "application/json"}}

    return build


def interpolate_z(size: Callable[[Dims], int]) -> Build:
    return lambda dims: {
        "json": {"start": {"z": [0.0] * size(dims), "digit": 1}, "end": {"digit": 2}}
    }


def big_json(dims: Dims) -> dict[str, Any]:
    padding = " " * (2 * 2**20)  # well over the limits client's 64 KiB JSON limit
    return {
        "content": b"{" + padding.encode() + b"}",
        "headers": {"content-type": "application/json"},
    }


def streamed(data: bytes, content_type: str) -> Build:
    """A body sent in chunks without Content-Length: the limit is enforced while it streams."""

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(data), 256 * 1024):
            yield data[start : start + 256 * 1024]

    return lambda dims: {"content": chunks(), "headers": {"content-type": content_type}}


def big_multipart(dims: Dims) -> dict[str, Any]:
    return {"files": files(bytes(2 * 2**20))}


@cache
def truncated_png() -> bytes:
    return digit_png()[: len(digit_png()) // 2]


UPLOAD_PATHS = ["/encode", "/reconstruct", "/anomaly-score", "/variations"]
MODEL_PATHS = ["/sample", "/decode", "/interpolate", *UPLOAD_PATHS]
GOOD: dict[str, Build] = {
    "/sample": nothing(),
    "/decode": z_rows(lambda d: d.conditional),
    "/interpolate": body({"start": {"digit": 1}, "end": {"digit": 2}, "steps": 2}),
    **{path: lazy_upload(digit_png) for path in UPLOAD_PATHS},
}
CONDITIONAL = {"model": "conditional"}
UNCONDITIONAL = {"model": "unconditional"}


CASES = [
    # 415: not an image
    *(
        Case(f"text file {p}", p, upload(b"hello, this is text\n", content_type="text/plain"), 415)
        for p in UPLOAD_PATHS
    ),
    Case("truncated png", "/encode", lazy_upload(truncated_png), 415, detail_has="truncated"),
    Case("zero bytes", "/encode", upload(b""), 415, detail_has="empty"),
    Case("zero bytes anomaly", "/anomaly-score", upload(b""), 415),
    Case("png signature only", "/reconstruct", upload(b"\x89PNG\r\n\x1a\n"), 415),
    Case(
        "text field named file",
        "/encode",
        lambda d: {"data": {"file": "not a file"}, "files": [("other", ("a.png", b"x"))]},
        415,
        detail_has="text field",
    ),
    Case(
        "bad base64 image end",
        "/interpolate",
        body({"start": {"image": "!!not base64!!"}, "end": {"digit": 1}}),
        415,
    ),
    Case(
        "text as base64 image end",
        "/interpolate",
        body({"start": {"image": "aGVsbG8gd29ybGQ="}, "end": {"digit": 1}}),
        415,
    ),
    # 413: too large
    Case("20000x20000 png", "/encode", lazy_upload(huge_png), 413, detail_has="pixels"),
    Case(
        "5000x5000 png over VAE_MAX_IMAGE_PIXELS",
        "/anomaly-score",
        lazy_upload(lambda: huge_png(5000)),
        413,
        detail_has="5000x5000",
    ),
    Case("20000x20000 png variations", "/variations", lazy_upload(huge_png), 413),
    Case("65 files", "/encode", lazy_upload(digit_png, 65), 413, detail_has="too many files"),
    Case("2 files to variations", "/variations", lazy_upload(digit_png, 2), 413),
    Case("file over byte limit", "/encode", lazy_upload(noise_png), 413, "limits_client", "2000"),
    Case(
        "4 files over max_files=3",
        "/anomaly-score",
        lazy_upload(digit_png, 4),
        413,
        "limits_client",
    ),
    Case("json body over limit", "/decode", big_json, 413, "limits_client"),
    Case(
        "json body over limit, streamed",
        "/interpolate",
        streamed(b"{" + b" " * (2 * 2**20) + b"}", "application/json"),
        413,
        "limits_client",
    ),
    Case("multipart body over limit", "/encode", big_multipart, 413, "limits_client"),
    Case(
        "multipart body over limit, streamed",
        "/reconstruct",
        streamed(b"--b\r\n" + bytes(2 * 2**20), "multipart/form-data; boundary=b"),
        413,
        "limits_client",
    ),
    # 422: validation
    *(
        Case(f"digit={digit} {p}", p, GOOD[p], 422, params={"digit": digit})
        for digit in (10, -1)
        for p in ("/sample", "/encode", "/reconstruct", "/variations")
    ),
    Case("n=0", "/sample", nothing(), 422, params={"n": 0}),
    Case("n=100000", "/sample", nothing(), 422, params={"n": 100_000}),
    Case("n over VAE_MAX_SAMPLES", "/sample", nothing(), 422, params={"n": 257}),
    Case("n=17 over max_samples=16", "/sample", nothing(), 422, "limits_client", "16", {"n": 17}),
    Case(
        "variations n over VAE_MAX_SAMPLES",
        "/variations",
        GOOD["/variations"],
        422,
        params={"n": 300},
    ),
    Case("variations n=0", "/variations", GOOD["/variations"], 422, params={"n": 0}),
    *(
        Case(f"temperature={t}", "/sample", nothing(), 422, params={"temperature": t})
        for t in ("nan", "inf", "-inf", "0", "3", "-1", "hot")
    ),
    *(
        Case(f"scale={s}", "/variations", GOOD["/variations"], 422, params={"scale": s})
        for s in ("nan", "inf", "-1", "4")
    ),
    Case(
        "threshold=nan", "/anomaly-score", GOOD["/anomaly-score"], 422, params={"threshold": "nan"}
    ),
    Case("seed=-1", "/sample", nothing(), 422, params={"seed": -1}),
    Case("seed=2**63", "/sample", nothing(), 422, params={"seed": 2**63}),
    Case("nrow=0", "/sample", nothing(), 422, params={"nrow": 0}),
    Case(
        "z too long", "/decode", z_rows(lambda d: d.conditional + 1), 422, detail_has="latent_dim"
    ),
    Case("z too short", "/decode", z_rows(lambda d: d.conditional - 1), 422),
    Case("z empty row", "/decode", z_rows(lambda d: 0), 422),
    Case("z no rows", "/decode", z_rows(lambda d: d.conditional, rows=0), 422),
    Case("z rows over VAE_MAX_SAMPLES", "/decode", z_rows(lambda d: d.conditional, rows=257), 422),
    Case("z NaN literal", "/decode", nan_z("NaN"), 422),
    Case("z Infinity literal", "/decode", nan_z("Infinity"), 422),
    Case("z -Infinity literal", "/decode", nan_z("-Infinity"), 422),
    Case("z 1e308 overflows float32", "/decode", nan_z("1e308"), 422),
    Case(
        "interpolate z -1e308",
        "/interpolate",
        lambda d: {
            "json": {"start": {"z": [-1e308] * d.conditional, "digit": 1}, "end": {"digit": 2}}
        },
        422,
    ),
    Case("z not a list", "/decode", body({"z": "zeros", "digit": 1}), 422),
    Case("digit list of wrong length", "/decode", z_rows(lambda d: d.conditional, [1, 2]), 422),
    Case("decode digit=10", "/decode", z_rows(lambda d: d.conditional, 10), 422),
    Case("decode missing z", "/decode", body({"digit": 1}), 422),
    Case("decode unknown field", "/decode", body({"z": [[0.0]], "digit": 1, "extra": 1}), 422),
    Case("decode malformed json", "/decode", raw(b'{"z": [[0.0', "application/json"), 422),
    Case("decode empty body", "/decode", nothing(), 422),
    Case("decode text/plain body", "/decode", raw(b'{"z": [[0]], "digit": 1}', "text/plain"), 422),
    Case(
        "interpolate steps=1000",
        "/interpolate",
        body({"start": {"digit": 1}, "end": {"digit": 2}, "steps": 1000}),
        422,
    ),
    Case(
        "interpolate steps=1",
        "/interpolate",
        body({"start": {"digit": 1}, "end": {"digit": 2}, "steps": 1}),
        422,
    ),
    Case(
        "interpolate unknown method",
        "/interpolate",
        body({"start": {"digit": 1}, "end": {"digit": 2}, "method": "cubic"}),
        422,
    ),
    Case("interpolate missing end", "/interpolate", body({"start": {"digit": 1}}), 422),
    Case("interpolate empty end", "/interpolate", body({"start": {"digit": 1}, "end": {}}), 422),
    Case(
        "interpolate unknown field in an end",
        "/interpolate",
        body({"start": {"digit": 1, "colour": "red"}, "end": {"digit": 2}}),
        422,
    ),
    Case(
        "interpolate unknown top-level field",
        "/interpolate",
        body({"start": {"digit": 1}, "end": {"digit": 2}, "speed": 3}),
        422,
    ),
    Case(
        "interpolate z and image",
        "/interpolate",
        body({"start": {"z": [0.0], "image": "AAAA", "digit": 1}, "end": {"digit": 2}}),
        422,
    ),
    Case(
        "interpolate z wrong length",
        "/interpolate",
        interpolate_z(lambda d: d.conditional + 1),
        422,
    ),
    *(
        Case(
            f"missing file field {p}",
            p,
            lambda d: {"files": [("image", ("a.png", digit_png(), "image/png"))]},
            422,
        )
        for p in UPLOAD_PATHS
    ),
    *(
        Case(f"json to {p}", p, body({"file": "x"}), 422, detail_has="multipart")
        for p in UPLOAD_PATHS
    ),
    Case(
        "raw bytes to /encode",
        "/encode",
        lambda d: {"content": digit_png(), "headers": {"content-type": "image/png"}},
        422,
    ),
    Case("urlencoded to /encode", "/encode", lambda d: {"data": {"a": "b"}}, 422),
    Case("multipart without boundary", "/encode", raw(b"garbage", "multipart/form-data"), 422),
    Case("no body to /reconstruct", "/reconstruct", nothing(), 422),
    # 404: unknown model
    *(
        Case(f"unknown model {p}", p, GOOD[p], 404, detail_has="nope", params={"model": "nope"})
        for p in MODEL_PATHS
    ),
    # 400: valid, but not for this model
    Case(
        "decode without digit, conditional",
        "/decode",
        z_rows(lambda d: d.conditional, None),
        400,
        "multi_client",
        "digit",
        CONDITIONAL,
    ),
    Case(
        "interpolate z end without digit",
        "/interpolate",
        lambda d: {"json": {"start": {"z": [0.0] * d.conditional}, "end": {"digit": 2}}},
        400,
        "multi_client",
        params=CONDITIONAL,
    ),
    *(
        Case(
            f"digit on unconditional {p}",
            p,
            GOOD[p],
            400,
            "multi_client",
            "unconditional",
            {**UNCONDITIONAL, "digit": 3},
        )
        for p in ("/sample", "/encode", "/reconstruct", "/variations")
    ),
    # The digit is checked before the body is read: a body that is not even a form gets the 400.
    *(
        Case(
            f"digit on unconditional {p} before reading a non-form body",
            p,
            lambda d: {"content": b"not a form", "headers": {"content-type": "text/plain"}},
            400,
            "multi_client",
            "unconditional",
            {**UNCONDITIONAL, "digit": 3},
        )
        for p in ("/encode", "/reconstruct", "/variations", "/similar")
    ),
    Case(
        "decode digit on unconditional",
        "/decode",
        z_rows(lambda d: d.unconditional, 3),
        400,
        "multi_client",
        "unconditional",
        UNCONDITIONAL,
    ),
    Case(
        "interpolate digits on unconditional",
        "/interpolate",
        GOOD["/interpolate"],
        400,
        "multi_client",
        "unconditional",
        UNCONDITIONAL,
    ),
]


def dims_of(client: TestClient) -> Dims:
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    if "unconditional" in models:
        return Dims(models["conditional"]["latent_dim"], models["unconditional"]["latent_dim"])
    (only,) = models.values()
    return Dims(only["latent_dim"])


def rejections(client: TestClient) -> dict[str, float]:
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(metrics_text(client))
        for sample in family.samples
        if sample.name == "vae_requests_rejected_total"
    }


def assert_still_serving(client: TestClient) -> None:
    response = client.post("/sample", params={"seed": 0})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_and_the_server_keeps_answering(
    request: pytest.FixtureRequest, case: Case
) -> None:
    client: TestClient = request.getfixturevalue(case.server)
    before = rejections(client)
    response = client.post(case.path, params=case.params, **case.build(dims_of(client)))
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert detail
    if case.detail_has:
        assert case.detail_has in str(detail)
    after = rejections(client)
    changed = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
    assert changed == {REASONS[case.status]: 1.0}
    assert_still_serving(client)


def test_unmatched_path_and_wrong_method(client: TestClient) -> None:
    assert client.get("/nope").status_code == 404
    assert client.get("/sample").status_code == 405
    assert client.post("/models").status_code == 405
    assert_still_serving(client)


def test_good_requests_pass_on_every_server(
    client: TestClient, multi_client: TestClient, limits_client: TestClient
) -> None:
    """The cases above fail for their one reason: the same requests, fixed, succeed."""
    for server in (client, multi_client, limits_client):
        dims = dims_of(server)
        for path, build in GOOD.items():
            response = server.post(path, **build(dims))
            assert response.status_code == 200, (path, response.text)
    response = limits_client.post("/anomaly-score", files=files(*[digit_png()] * 3))
    assert response.status_code == 200
    assert limits_client.post("/sample", params={"n": 16}).status_code == 200


def test_not_ready_is_503_with_retry_after(
    trained_checkpoint: Path, checkpoint_config: dict[str, Any]
) -> None:
    app = create_app(Settings(checkpoints=str(trained_checkpoint)))
    client = TestClient(app)  # not entered: the lifespan has not loaded the models
    for path in ("/readyz", "/models"):
        response = client.get(path)
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1
    for path, build in GOOD.items():
        response = client.post(path, **build(Dims(checkpoint_config["model"]["latent_dim"])))
        assert response.status_code == 503, path
        assert int(response.headers["retry-after"]) >= 1
        assert "readyz" in response.json()["detail"]
    assert client.get("/healthz").status_code == 200
    assert metric(client, "vae_requests_rejected_total", {"reason": "not_ready"}) == 2 + len(GOOD)


def test_many_bad_values_give_a_small_answer(client: TestClient, latent_dim: int) -> None:
    """Validation reports the first few errors, not one per bad value of a large body."""
    row = "[" + ",".join(["NaN"] * latent_dim) + "]"
    data = ('{"z": [' + ",".join([row] * 256) + '], "digit": 1}').encode()
    response = client.post("/decode", content=data, headers={"content-type": "application/json"})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert 1 <= len(detail) < 256 * latent_dim
    assert len(response.content) < 64 * 1024
    assert detail[0]["loc"] == ["body", "z", 0, 0]
    assert_still_serving(client)
