"""The Open Inference Protocol (v2) routes, driven by the client users have (tritonclient's
InferenceServerClient) against a real `python -m app`, with values checked against the REST API
for the same inputs and seeds, and every kind of malformed request answered 4xx."""

from __future__ import annotations

import base64
import gzip
import http.client
import importlib.metadata
import json
import math
import re
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from app_testing import (
    JSON_ACCEPT,
    LiveApp,
    files,
    metric,
    png_of,
    readme_blocks,
    start_app,
    stop_app,
)
from conftest import UNCONDITIONAL_NAME
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from app.main import create_app
from app.settings import Settings
from models import VAE, load_checkpoint

pytestmark = pytest.mark.slow

DEFAULT = "default"  # the conditional checkpoint, served under the README's model name
MODELS = (DEFAULT, UNCONDITIONAL_NAME)
BINARY = pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
# v2 images against the model's own in this process: the same float32 math, batched and
# threaded differently (PNG bytes alone would let any error under 1/255 through).
FLOAT_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    trained_checkpoint: Path,
    named_checkpoints: dict[str, Path],
) -> Iterator[LiveApp]:
    root = tmp_path_factory.mktemp("v2")
    default = shutil.copytree(trained_checkpoint, root / DEFAULT)
    checkpoints = f"{default},{named_checkpoints[UNCONDITIONAL_NAME]}"
    app = start_app(
        root / "server.log", "--checkpoints", checkpoints, "--device", "cpu", ready_within_s=120
    )
    yield app
    stop_app(app)


@pytest.fixture(scope="module")
def triton(server: LiveApp) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def rest(server: LiveApp) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=server.base, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def cards(rest: httpx2.Client) -> dict[str, dict[str, Any]]:
    return {card["name"]: card for card in rest.get("/models").json()["models"]}


@pytest.fixture(scope="module")
def direct(trained_checkpoint: Path, named_checkpoints: dict[str, Path]) -> dict[str, VAE]:
    """The served checkpoints loaded here, to check v2's float outputs against the model's."""
    cpu = torch.device("cpu")
    return {
        DEFAULT: load_checkpoint(trained_checkpoint, cpu).model,
        UNCONDITIONAL_NAME: load_checkpoint(named_checkpoints[UNCONDITIONAL_NAME], cpu).model,
    }


def decoded(model: VAE, z: np.ndarray, digits: np.ndarray | None) -> np.ndarray:
    """The model's own images (N, 28, 28) of latents z at their digits."""
    labels = None
    if digits is not None:
        labels = torch.nn.functional.one_hot(torch.tensor(digits), 10).float()
    with torch.inference_mode():
        return model.decode(torch.tensor(z), labels)[:, 0].numpy()


def assert_same_floats(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal as floats, not merely after 8-bit PNG encoding (which hides errors < 1/255)."""
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=FLOAT_TOLERANCE)


def infer(
    triton: httpclient.InferenceServerClient,
    model: str,
    tensors: dict[str, np.ndarray],
    *,
    binary: bool,
    outputs: list[str],
    parameters: dict[str, Any] | None = None,
) -> httpclient.InferResult:
    """One inference with every input and output in binary, or every one in JSON."""
    inputs = []
    for name, array in tensors.items():
        item = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array, binary_data=binary)
        inputs.append(item)
    wanted = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in outputs]
    result = triton.infer(model, inputs, outputs=wanted, parameters=parameters)
    for output in result.get_response()["outputs"]:  # the encoding asked for, each way
        assert ("data" not in output) is binary, output
    return result


def rest_pngs(response: httpx2.Response) -> list[bytes]:
    assert response.status_code == 200, response.text
    return [base64.b64decode(image) for image in response.json()["images"]]


def as_pngs(images: np.ndarray) -> list[bytes]:
    """v2's float images encoded as the REST API encodes its PNGs."""
    assert images.dtype == np.float32 and images.shape[1:] == (28, 28)
    assert images.min() >= 0.0 and images.max() <= 1.0
    return [png_of(torch.from_numpy(image.copy())[None]) for image in images]


def real_digits(mnist_test: tuple[torch.Tensor, torch.Tensor], count: int) -> np.ndarray:
    """Held-out digits (N, 28, 28) float32 in [0, 1], as a client would send them."""
    images, _ = mnist_test
    return images[:count, 0].numpy().copy()


def only(tensors: dict[str, Any], conditional: bool) -> dict[str, Any]:
    """The tensors a conditional model has and an unconditional one lacks."""
    return tensors if conditional else {}


# ---- health and metadata --------------------------------------------------------------------


def test_server_health_and_metadata(triton: httpclient.InferenceServerClient) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.get_server_metadata() == {
        "name": "vae-serve",
        "version": importlib.metadata.version("vae-serve"),
        "extensions": ["binary_tensor_data", "parameters", "statistics", "model_configuration"],
    }


def test_nothing_is_ready_before_the_models_are_loaded() -> None:
    """Before the lifespan has loaded the models (no `with`: it never runs here), the process is
    live and everything else answers 503, in the protocol's error format."""
    client = TestClient(create_app(Settings(checkpoints="unused")))
    live = client.get("/v2/health/live")
    assert (live.status_code, live.json()) == (200, {"live": True})
    for method, path in (
        ("GET", "/v2/health/ready"),
        ("GET", "/v2/models/default-decode"),
        ("GET", "/v2/models/default-decode/versions/1/ready"),
        ("POST", "/v2/models/default-decode/infer"),
    ):
        response = client.request(method, path, json={"inputs": []})
        assert response.status_code == 503, path
        assert response.headers["retry-after"] == "1"
        assert "retry when GET /v2/health/ready answers 200" in response.json()["error"]


def test_every_op_of_every_model_is_a_ready_v2_model(
    triton: httpclient.InferenceServerClient, cards: dict[str, dict[str, Any]]
) -> None:
    for model in MODELS:
        latent = cards[model]["latent_dim"]
        conditional = cards[model]["conditional"]
        for op in ("decode", "sample", "encode", "anomaly"):
            name = f"{model}-{op}"
            assert triton.is_model_ready(name)
            assert triton.is_model_ready(name, model_version="1")
            metadata = triton.get_model_metadata(name)
            assert metadata == triton.get_model_metadata(name, model_version="1")
            assert metadata["name"] == name and metadata["versions"] == [cards[model]["version"]]
            assert metadata["platform"] == "pytorch"
            inputs = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["inputs"]}
            outputs = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["outputs"]}
            images = ("FP32", [-1, 28, 28])
            digit = ("INT64", [-1])
            if op == "decode":
                latents = ("FP32", [-1, latent])
                assert inputs == {"z": latents, **only({"digit": digit}, conditional)}
                assert outputs == {"images": images}
            elif op == "sample":
                assert inputs == {
                    **only({"digit": digit}, conditional),
                    "n": ("INT64", [1]),
                    "seed": ("INT64", [1]),
                    "temperature": ("FP32", [1]),
                }
                assert outputs == {
                    "images": images,
                    **only({"digit": digit}, conditional),
                    "z": ("FP32", [-1, latent]),
                }
            elif op == "encode":
                assert inputs == {"images": images, **only({"digit": digit}, conditional)}
                assert outputs == {
                    "mu": ("FP32", [-1, latent]),
                    "logvar": ("FP32", [-1, latent]),
                    **only({"digit": digit, "digit_probability": ("FP32", [-1])}, conditional),
                }
            else:
                assert inputs == {"images": images}
                assert outputs == {
                    "score": ("FP32", [-1]),
                    "is_anomaly": ("BOOL", [-1]),
                    **only({"digit": digit, "digit_probability": ("FP32", [-1])}, conditional),
                    "percentile": ("FP32", [-1]),
                }
    for unknown in ("default-reconstruct", "nope-decode", "default"):
        assert not triton.is_model_ready(unknown)
        with pytest.raises(InferenceServerException, match=f"no v2 model named '{unknown}'"):
            triton.get_model_metadata(unknown)
    assert not triton.is_model_ready("default-decode", model_version="2")


# ---- each op against the REST API -----------------------------------------------------------


@BINARY
@pytest.mark.parametrize("model", MODELS)
def test_decode_matches_rest(
    triton: httpclient.InferenceServerClient,
    rest: httpx2.Client,
    cards: dict[str, dict[str, Any]],
    direct: dict[str, VAE],
    model: str,
    binary: bool,
) -> None:
    z = torch.randn(3, cards[model]["latent_dim"], generator=torch.Generator().manual_seed(5))
    tensors = {"z": z.numpy()}
    body: dict[str, Any] = {"z": z.tolist()}
    if cards[model]["conditional"]:
        tensors["digit"] = np.array([1, 4, 7], dtype=np.int64)
        body["digit"] = [1, 4, 7]
    result = infer(triton, f"{model}-decode", tensors, binary=binary, outputs=["images"])
    images = result.as_numpy("images")
    assert images.shape == (3, 28, 28)
    expected = rest.post("/decode", params={"model": model}, json=body, headers=JSON_ACCEPT)
    assert as_pngs(images) == rest_pngs(expected)
    assert_same_floats(images, decoded(direct[model], z.numpy(), tensors.get("digit")))


@BINARY
def test_sample_matches_rest_for_the_same_seed(
    triton: httpclient.InferenceServerClient,
    rest: httpx2.Client,
    direct: dict[str, VAE],
    binary: bool,
) -> None:
    outputs = ["images", "digit", "z"]
    # seed and temperature as parameters...
    result = infer(
        triton,
        "default-sample",
        {"digit": np.full(4, 7, dtype=np.int64)},
        binary=binary,
        outputs=outputs,
        parameters={"seed": 42, "temperature": 0.8},
    )
    query = {"digit": 7, "n": 4, "seed": 42, "temperature": 0.8}
    expected = rest.post("/sample", params=query, headers=JSON_ACCEPT)
    assert as_pngs(result.as_numpy("images")) == rest_pngs(expected)
    assert result.as_numpy("digit").tolist() == expected.json()["digits"] == [7] * 4
    assert result.get_response()["parameters"] == {"seed": 42, "prior": "fitted"}
    assert_same_floats(result.as_numpy("images"), decoded_result(direct[DEFAULT], result))
    # ...or as inputs (0.75 is exact in FP32), and from N(0, I)
    result = infer(
        triton,
        "default-sample",
        {
            "digit": np.full(2, 3, dtype=np.int64),
            "seed": np.array([9], dtype=np.int64),
            "temperature": np.array([0.75], dtype=np.float32),
        },
        binary=binary,
        outputs=outputs,
        parameters={"prior": "standard"},
    )
    query = {"digit": 3, "n": 2, "seed": 9, "temperature": 0.75, "prior": "standard"}
    expected = rest.post("/sample", params=query, headers=JSON_ACCEPT)
    assert as_pngs(result.as_numpy("images")) == rest_pngs(expected)
    assert result.get_response()["parameters"] == {"seed": 9, "prior": "standard"}
    assert_same_floats(result.as_numpy("images"), decoded_result(direct[DEFAULT], result))


def decoded_result(model: VAE, result: httpclient.InferResult) -> np.ndarray:
    """The model's own images of a -sample result's latents, at its digits if it has them."""
    digits = result.as_numpy("digit") if model.config.conditional else None
    return decoded(model, result.as_numpy("z"), digits)


def test_sample_random_digits_and_unconditional_models_take_n(
    triton: httpclient.InferenceServerClient, rest: httpx2.Client, direct: dict[str, VAE]
) -> None:
    for model, outputs in (
        (DEFAULT, ["images", "digit", "z"]),
        (UNCONDITIONAL_NAME, ["images", "z"]),
    ):
        result = infer(
            triton,
            f"{model}-sample",
            {"n": np.array([5], dtype=np.int64)},
            binary=True,
            outputs=outputs,
            parameters={"seed": 11},
        )
        expected = rest.post(
            "/sample", params={"model": model, "n": 5, "seed": 11}, headers=JSON_ACCEPT
        )
        assert as_pngs(result.as_numpy("images")) == rest_pngs(expected)
        assert_same_floats(result.as_numpy("images"), decoded_result(direct[model], result))
        if "digit" in outputs:
            assert result.as_numpy("digit").tolist() == expected.json()["digits"]


def test_sample_mixed_digits_decode_to_their_latents(
    triton: httpclient.InferenceServerClient,
) -> None:
    """One digit per image, which REST cannot ask for: each image is the decoder's image of the
    latent returned beside it, at its own digit, and the seed's draw is reproducible."""
    digits = np.array([0, 3, 5, 8, 8], dtype=np.int64)
    first = infer(
        triton,
        "default-sample",
        {"digit": digits},
        binary=True,
        outputs=["images", "digit", "z"],
        parameters={"seed": 3},
    )
    again = triton.infer(
        "default-sample",
        [_input("digit", digits)],
        parameters={"seed": 3},  # no outputs named: all of them, in binary
    )
    np.testing.assert_array_equal(first.as_numpy("images"), again.as_numpy("images"))
    assert first.as_numpy("digit").tolist() == digits.tolist()
    decoded = infer(
        triton,
        "default-decode",
        {"z": first.as_numpy("z"), "digit": digits},
        binary=True,
        outputs=["images"],
    )
    np.testing.assert_allclose(
        decoded.as_numpy("images"), first.as_numpy("images"), rtol=0, atol=1e-5
    )
    drawn = triton.infer("default-sample", [_input("digit", digits)])  # no seed: one is drawn
    seed = drawn.get_response()["parameters"]["seed"]
    replay = triton.infer("default-sample", [_input("digit", digits)], parameters={"seed": seed})
    np.testing.assert_array_equal(drawn.as_numpy("images"), replay.as_numpy("images"))


def _input(name: str, array: np.ndarray) -> httpclient.InferInput:
    item = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    item.set_data_from_numpy(array)
    return item


def upload(rest: httpx2.Client, path: str, images: np.ndarray, **params: Any) -> Any:
    """The REST answer for the same images, uploaded as the PNGs a client would send."""
    pngs = [png_of(torch.from_numpy(image)[None]) for image in images]
    response = rest.post(path, params=params, files=files(*pngs))
    assert response.status_code == 200, response.text
    return response.json()


@BINARY
def test_encode_matches_rest(
    triton: httpclient.InferenceServerClient,
    rest: httpx2.Client,
    mnist_test: tuple[torch.Tensor, torch.Tensor],
    binary: bool,
) -> None:
    images = real_digits(mnist_test, 5)
    outputs = ["mu", "logvar", "digit", "digit_probability"]
    for digit, query in ((None, {}), (np.full(5, 2, dtype=np.int64), {"digit": 2})):
        tensors = {"images": images} if digit is None else {"images": images, "digit": digit}
        result = infer(triton, "default-encode", tensors, binary=binary, outputs=outputs)
        items = upload(rest, "/encode", images, **query)["items"]
        for name in outputs:
            expected = np.array([item[name] for item in items])
            np.testing.assert_allclose(result.as_numpy(name), expected, rtol=1e-6, atol=1e-6)
    result = infer(
        triton, f"{UNCONDITIONAL_NAME}-encode", {"images": images}, binary=binary,
        outputs=["mu", "logvar"],
    )  # fmt: skip
    items = upload(rest, "/encode", images, model=UNCONDITIONAL_NAME)["items"]
    np.testing.assert_allclose(result.as_numpy("mu"), [item["mu"] for item in items], atol=1e-6)


@BINARY
def test_anomaly_matches_rest(
    triton: httpclient.InferenceServerClient,
    rest: httpx2.Client,
    mnist_test: tuple[torch.Tensor, torch.Tensor],
    binary: bool,
) -> None:
    noise = torch.rand(2, 28, 28, generator=torch.Generator().manual_seed(0)).numpy()
    # Quantised to 8 bits, as the PNGs uploaded to REST are.
    noise = np.round(noise * 255).astype(np.float32) / 255
    images = np.concatenate([real_digits(mnist_test, 4), noise, np.zeros((1, 28, 28), np.float32)])
    outputs = ["score", "is_anomaly", "digit", "digit_probability", "percentile"]
    result = infer(triton, "default-anomaly", {"images": images}, binary=binary, outputs=outputs)
    answer = upload(rest, "/anomaly-score", images)
    items = answer["items"]
    flags = result.as_numpy("is_anomaly")
    assert flags.dtype == np.bool_
    assert flags.tolist() == [item["is_anomaly"] for item in items]
    assert True in flags.tolist() and False in flags.tolist()  # noise and blank are anomalies
    assert result.as_numpy("digit").tolist() == [item["digit"] for item in items]
    for name in ("score", "digit_probability", "percentile"):
        expected = [item[name] for item in items]
        np.testing.assert_allclose(result.as_numpy(name), expected, rtol=1e-6, atol=1e-5)
    assert result.get_response()["parameters"] == {"threshold": answer["threshold"]}
    # The threshold overridden, as REST's threshold= does
    high = infer(
        triton,
        "default-anomaly",
        {"images": images},
        binary=binary,
        outputs=["is_anomaly"],
        parameters={"threshold": 1e9},
    )
    assert not high.as_numpy("is_anomaly").any()


def test_requests_go_through_the_batcher_and_the_metrics(
    triton: httpclient.InferenceServerClient,
    rest: httpx2.Client,
    mnist_test: tuple[torch.Tensor, torch.Tensor],
) -> None:
    template = "/v2/models/{model_name}/infer"
    versioned = "/v2/models/{model_name}/versions/{model_version}/infer"
    batches = {"model": DEFAULT, "op": "encode"}
    before = rest.get("/metrics").text
    images = real_digits(mnist_test, 3)
    triton.infer("default-encode", [_input("images", images)])
    triton.infer("default-encode", [_input("images", images)], model_version="1")
    with pytest.raises(InferenceServerException):
        triton.infer("default-encode", [_input("images", images + 2)])
    after = rest.get("/metrics").text

    def grew(name: str, labels: dict[str, str]) -> float:
        return metric(rest, name, labels, after) - metric(rest, name, labels, before)

    ok = {"method": "POST", "status": "200"}
    assert grew("vae_request_duration_seconds_count", {"route": template, **ok}) == 1
    assert grew("vae_request_duration_seconds_count", {"route": versioned, **ok}) == 1
    refused = {"route": template, "method": "POST", "status": "400"}
    assert grew("vae_request_duration_seconds_count", refused) == 1
    assert grew("vae_requests_rejected_total", {"reason": "bad_request"}) == 1
    assert grew("vae_batch_size_count", batches) == 2  # two forward passes, one per request
    assert grew("vae_batch_size_sum", batches) == 6


# ---- malformed requests ---------------------------------------------------------------------


def request_body(*inputs: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"inputs": list(inputs), **extra}


def tensor(name: str, datatype: str, shape: list[int], data: list[Any]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def malformed_cases(latent: int) -> list[tuple[str, str, dict[str, Any], int, str]]:
    """(what, path, httpx request arguments, status, part of the message) for each mistake."""
    z = tensor("z", "FP32", [1, latent], [0.0] * latent)
    digit = tensor("digit", "INT64", [1], [3])
    image = tensor("images", "FP32", [1, 28, 28], [0.0] * 784)
    decode = "/v2/models/default-decode/infer"
    sample = "/v2/models/default-sample/infer"
    encode = "/v2/models/default-encode/infer"
    head = json.dumps(request_body(z, digit)).encode()
    return [
        ("wrong datatype", decode,
         {"json": request_body({**z, "datatype": "FP64"}, digit)}, 400,
         "input 'z' must be FP32, got FP64"),
        ("wrong shape", decode,
         {"json": request_body(tensor("z", "FP32", [1, latent + 1], [0.0] * (latent + 1)),
                               digit)}, 400,
         f"input 'z' must have shape [-1, {latent}] (-1: any size), got [1, {latent + 1}]"),
        ("shape and data size disagree", decode,
         {"json": request_body({**z, "shape": [2, latent]}, digit)}, 400,
         f"shape [2, {latent}] holds {2 * latent} values, but 'data' has {latent}"),
        ("unknown model", "/v2/models/nope-decode/infer",
         {"json": request_body(z, digit)}, 404, "no v2 model named 'nope-decode'"),
        ("unknown op", "/v2/models/default-explode/infer",
         {"json": request_body(z, digit)}, 404, "no v2 model named 'default-explode'"),
        ("unknown version", "/v2/models/default-decode/versions/2/infer",
         {"json": request_body(z, digit)}, 404, "has no loaded version '2'"),
        ("unknown input name", decode,
         {"json": request_body(z, digit, tensor("w", "FP32", [1], [0.0]))}, 400,
         "model 'default-decode' has no input 'w'"),
        ("missing input", decode, {"json": request_body(digit)}, 400,
         "model 'default-decode' needs input z (FP32"),
        ("a body that is not JSON", decode,
         {"content": b"z=0,0,0", "headers": {"content-type": "text/plain"}}, 400,
         "the body is not JSON"),
        ("binary header longer than the body", decode,
         {"content": head, "headers": {"Inference-Header-Content-Length": str(len(head) + 1)}},
         400, "longer than the whole body"),
        ("binary header not a number", decode,
         {"content": head, "headers": {"Inference-Header-Content-Length": "ten"}},
         400, "must be the byte length of the body's JSON"),
        ("binary data shorter than declared", decode,
         {"content": json.dumps(request_body(
             {**z, "data": None, "parameters": {"binary_data_size": 4 * latent}},
             digit)).encode() + b"\x00" * 4,
          "headers": {"Inference-Header-Content-Length": str(len(json.dumps(request_body(
             {**z, "data": None, "parameters": {"binary_data_size": 4 * latent}}, digit))))}},
         400, f"needs bytes 0..{4 * latent} of the binary data, but it has 4"),
        ("batch sizes disagree", decode,
         {"json": request_body(z, {**digit, "shape": [2], "data": [3, 4]})}, 400,
         "first dimensions must agree"),
        ("digit out of range", decode,
         {"json": request_body(z, {**digit, "data": [10]})}, 400, "digit must be in 0..9"),
        ("non-finite latent", decode,
         {"content": json.dumps(request_body({**z, "data": [math.nan] * latent}, digit)),
          "headers": {"content-type": "application/json"}}, 400, "NaN or infinite"),
        ("pixels out of range", encode,
         {"json": request_body({**image, "data": [2.0] * 784})}, 400,
         "pixel values in [0, 1]"),
        ("unknown output", decode,
         {"json": request_body(z, digit, outputs=[{"name": "pixels"}])}, 400,
         "model 'default-decode' has no output 'pixels'"),
        ("a timeout that is no count of microseconds", sample,
         {"json": request_body(digit, parameters={"timeout": 1.5})}, 400,
         "parameter 'timeout' must be the request's deadline in microseconds"),
        ("a negative timeout", sample,
         {"json": request_body(digit, parameters={"timeout": -1})}, 400,
         "an integer >= 0"),
        ("a body that is not the gzip it says", decode,
         {"content": head, "headers": {"content-encoding": "gzip"}}, 400,
         "the body is not valid gzip data (Error -3"),
        ("a gzip body cut short", decode,
         {"content": gzip.compress(head)[:-12], "headers": {"content-encoding": "gzip"}}, 400,
         "it ends before the end of its compressed data"),
        ("bytes after the deflate data", decode,
         {"content": zlib.compress(head) + b"tail", "headers": {"content-encoding": "deflate"}},
         400, "it has bytes after the end of its compressed data"),
        ("a content coding not taken", decode,
         {"content": head, "headers": {"content-encoding": "br"}}, 415,
         "Content-Encoding 'br' is not taken here"),
        ("a gzip body over the size limit once inflated", decode,
         {"content": gzip.compress(b" " * (4 * 2**20 + 1)),
          "headers": {"content-encoding": "gzip"}}, 413,
         "request body over 4194304 bytes once inflated from gzip (VAE_MAX_JSON_BYTES)"),
        ("temperature out of range", sample,
         {"json": request_body(digit, parameters={"temperature": 0})}, 400,
         "temperature must be in (0, 2]"),
        ("seed twice", sample,
         {"json": request_body(digit, tensor("seed", "INT64", [1], [1]),
                               parameters={"seed": 1})}, 400,
         "'seed' is given as an input and as a parameter"),
        ("n and digits disagree", sample,
         {"json": request_body(digit, tensor("n", "INT64", [1], [2]))}, 400,
         "n is 2 but 1 digits were given"),
        ("digit to an unconditional model", f"/v2/models/{UNCONDITIONAL_NAME}-sample/infer",
         {"json": request_body(digit)}, 400, f"'{UNCONDITIONAL_NAME}-sample' has no input 'digit'"),
        ("too many images", encode,
         {"json": request_body({**image, "shape": [65, 28, 28], "data": [0.0] * 784 * 65})}, 413,
         "at most 64 per request (VAE_MAX_FILES)"),
        ("too many latents", decode,
         {"json": request_body(tensor("z", "FP32", [257, latent], [0.0] * latent * 257),
                               {**digit, "shape": [257], "data": [3] * 257})}, 413,
         "at most 256 per request (VAE_MAX_SAMPLES)"),
        ("a latent past /decode's cap", decode,
         {"json": request_body({**z, "data": [3e38] * latent}, digit)}, 400,
         "input 'z' must hold values in [-10000, 10000]"),
        ("an empty shape too large to describe", encode,
         {"json": request_body({**image, "shape": [0, 2**40, 2**40], "data": []})}, 400,
         "describes more than 4294967296 values"),
        ("an integer parameter past 64 bits", sample,
         {"json": request_body(digit, parameters={"temperature": 10**400})}, 400,
         "parameters.temperature"),
        ("a float parameter past float64", sample,
         {"content": json.dumps(request_body(digit)).replace(
             '"inputs"', '"parameters": {"threshold": 1e400}, "inputs"'),
          "headers": {"content-type": "application/json"}}, 400, "parameters.threshold"),
        ("a body over the size limit", decode,
         {"content": b" " * (4 * 2**20 + 1), "headers": {"content-type": "application/json"}},
         413, "request body over"),
        ("JSON nested 1M deep", decode,
         {"content": b'{"inputs": ' + b"[" * 2**20 + b"]" * 2**20 + b"}",
          "headers": {"content-type": "application/json"}}, 400, "the body is not JSON"),
        ("the wrong method", decode, {"method": "GET"}, 405, "Method Not Allowed"),
    ]  # fmt: skip


def test_malformed_requests_get_4xx_with_a_message(
    rest: httpx2.Client, cards: dict[str, dict[str, Any]]
) -> None:
    for what, path, arguments, status, message in malformed_cases(cards[DEFAULT]["latent_dim"]):
        method = arguments.pop("method", "POST")
        response = rest.request(method, path, **arguments)
        assert response.status_code == status, (what, response.status_code, response.text)
        body = response.json()
        assert list(body) == ["error"] and isinstance(body["error"], str), (what, body)
        assert message in body["error"], (what, body["error"])


def test_the_client_sees_the_servers_message(triton: httpclient.InferenceServerClient) -> None:
    z = np.zeros((2, 3), dtype=np.float64)
    with pytest.raises(InferenceServerException, match="input 'z' must be FP32, got FP64"):
        triton.infer("default-decode", [_input("z", z), _input("digit", np.array([1, 2]))])
    with pytest.raises(InferenceServerException, match="needs input z"):
        triton.infer("default-decode", [_input("digit", np.array([1, 2]))])


def test_anomaly_and_percentile_only_where_the_checkpoint_has_them(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    """A checkpoint saved without an anomaly calibration has no -anomaly; one calibrated without
    the validation scores' quantiles has -anomaly with no `percentile` output."""
    uncalibrated = shutil.copytree(trained_checkpoint, tmp_path / "uncalibrated")
    unranked = shutil.copytree(trained_checkpoint, tmp_path / "unranked")
    for folder, edit in ((uncalibrated, "anomaly"), (unranked, "quantiles")):
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        if edit == "anomaly":
            del config["anomaly"]
        else:
            del config["anomaly"]["quantiles"]
        config_path.write_text(json.dumps(config))
    settings = Settings(checkpoints=f"{uncalibrated},{unranked}", device="cpu")
    with TestClient(create_app(settings)) as client:
        missing = client.get("/v2/models/uncalibrated-anomaly")
        assert missing.status_code == 404
        assert "no v2 model named 'uncalibrated-anomaly'" in missing.json()["error"]
        assert client.get("/v2/models/uncalibrated-encode").status_code == 200
        outputs = [t["name"] for t in client.get("/v2/models/unranked-anomaly").json()["outputs"]]
        assert outputs == ["score", "is_anomaly", "digit", "digit_probability"]
        images = tensor("images", "FP32", [1, 28, 28], [0.0] * 784)
        scored = client.post("/v2/models/unranked-anomaly/infer", json=request_body(images))
        assert scored.status_code == 200, scored.text
        assert [o["name"] for o in scored.json()["outputs"]] == outputs
        asked = client.post(
            "/v2/models/unranked-anomaly/infer",
            json=request_body(images, outputs=[{"name": "percentile"}]),
        )
        assert asked.status_code == 400
        assert "has no output 'percentile'" in asked.json()["error"]


# ---- what tritonclient and other clients send ------------------------------------------------


def test_parameters_the_service_does_not_use_are_passed_over(
    triton: httpclient.InferenceServerClient, rest: httpx2.Client, direct: dict[str, VAE]
) -> None:
    """tritonclient's sequence_id, priority and timeout, MLServer's content_type and any other
    parameter an op does not take change nothing, as KServe ignores them."""
    z = np.random.default_rng(2).standard_normal((2, direct[DEFAULT].config.latent_dim))
    z = z.astype(np.float32)
    digits = np.array([4, 9], dtype=np.int64)
    result = triton.infer(
        "default-decode",
        [_input("z", z), _input("digit", digits)],
        request_id="with-everything",
        sequence_id=7,
        sequence_start=True,
        priority=2,
        timeout=30_000_000,
        parameters={"content_type": "np", "x-tenant": "blue"},
    )
    assert result.get_response()["id"] == "with-everything"
    assert_same_floats(result.as_numpy("images"), decoded(direct[DEFAULT], z, digits))
    described = {"name": "z", "shape": [2, z.shape[1]], "datatype": "FP32", "data": z.tolist()}
    body = {
        "parameters": {"content_type": "np", "seed": 1},  # seed: -sample's, not -decode's
        "inputs": [
            {**described, "parameters": {"content_type": "np"}},
            {"name": "digit", "shape": [2], "datatype": "INT64", "data": [4, 9]},
        ],
    }
    answer = rest.post("/v2/models/default-decode/infer", json=body)
    assert answer.status_code == 200, answer.text
    images = np.array(answer.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 28, 28)
    assert_same_floats(images, result.as_numpy("images"))


def test_sample_takes_no_inputs_at_all(
    triton: httpclient.InferenceServerClient, rest: httpx2.Client
) -> None:
    """`"inputs": []`: -sample takes n and seed as parameters."""
    result = triton.infer("default-sample", [], parameters={"n": 3, "seed": 5})
    expected = rest.post("/sample", params={"n": 3, "seed": 5}, headers=JSON_ACCEPT)
    assert as_pngs(result.as_numpy("images")) == rest_pngs(expected)
    assert result.as_numpy("digit").tolist() == expected.json()["digits"]
    with pytest.raises(InferenceServerException, match="'default-decode' needs input"):
        triton.infer("default-decode", [])  # an op with required inputs still says so


def test_n_past_max_samples_is_a_400(triton: httpclient.InferenceServerClient) -> None:
    for count in (np.array([257]), None):
        inputs = [] if count is None else [_input("n", count)]
        parameters = {"n": 257} if count is None else None
        with pytest.raises(InferenceServerException, match=r"n must be in 1\.\.256") as refused:
            triton.infer("default-sample", inputs, parameters=parameters)
        assert refused.value.status() == "400"
        assert "(VAE_MAX_SAMPLES), got 257" in str(refused.value)


def test_model_ready_names_the_model(rest: httpx2.Client) -> None:
    for path in ("/v2/models/default-sample/ready", "/v2/models/default-sample/versions/1/ready"):
        assert rest.get(path).json() == {"name": "default-sample", "ready": True}


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_compressed_requests_and_responses(
    triton: httpclient.InferenceServerClient,
    server: LiveApp,
    mnist_test: tuple[torch.Tensor, torch.Tensor],
    coding: str,
) -> None:
    """tritonclient's request_compression_algorithm and response_compression_algorithm; on the
    wire the response is compressed and its Inference-Header-Content-Length still gives the
    JSON's length within the inflated body, as tritonclient reads it."""
    images = real_digits(mnist_test, 16)
    plain = triton.infer("default-encode", [_input("images", images)])
    packed = triton.infer(
        "default-encode",
        [_input("images", images)],
        request_compression_algorithm=coding,
        response_compression_algorithm=coding,
    )
    for name in ("mu", "logvar", "digit", "digit_probability"):
        np.testing.assert_array_equal(packed.as_numpy(name), plain.as_numpy(name))
    head = json.dumps({
        "inputs": [{"name": "images", "shape": [16, 28, 28], "datatype": "FP32",
                    "parameters": {"binary_data_size": images.nbytes}}],
        "parameters": {"binary_data_output": True},
    }).encode()  # fmt: skip
    compress = gzip.compress if coding == "gzip" else zlib.compress
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request(
            "POST",
            "/v2/models/default-encode/infer",
            body=compress(head + images.tobytes()),
            headers={
                "Content-Encoding": coding,
                "Accept-Encoding": f"br;q=1, {coding};q=0.5",
                "Inference-Header-Content-Length": str(len(head)),
            },
        )
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    assert response.status == 200, raw
    assert response.headers["content-encoding"] == coding
    assert int(response.headers["content-length"]) == len(raw)
    body = gzip.decompress(raw) if coding == "gzip" else zlib.decompress(raw)
    assert len(raw) < len(body)
    length = int(response.headers["inference-header-content-length"])
    document = json.loads(body[:length])
    offset = length
    for output in document["outputs"]:
        size = output["parameters"]["binary_data_size"]
        array = np.frombuffer(body[offset : offset + size], dtype="<f4" if output["datatype"]
                              == "FP32" else "<i8").reshape(output["shape"])  # fmt: skip
        np.testing.assert_array_equal(array, plain.as_numpy(output["name"]))
        offset += size
    assert offset == len(body)


def test_a_compressed_bomb_is_refused_without_inflating_it(server: LiveApp) -> None:
    """256 MiB of zeros in 256 KiB of gzip: a 413 once 4 MiB (VAE_MAX_JSON_BYTES) come out, and
    the server's memory never holds the rest."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    megabyte = bytes(2**20)
    bomb = b"".join(compressor.compress(megabyte) for _ in range(256)) + compressor.flush()
    assert len(bomb) < 2**19
    peak_before = peak_rss_bytes(server)
    response = httpx2.post(
        f"{server.base}/v2/models/default-encode/infer",
        content=bomb,
        headers={"content-encoding": "gzip"},
        timeout=60,
    )
    assert response.status_code == 413
    assert "over 4194304 bytes once inflated from gzip" in response.json()["error"]
    assert peak_rss_bytes(server) - peak_before < 64 * 2**20


def peak_rss_bytes(server: LiveApp) -> int:
    """The server process's peak resident memory so far (VmHWM)."""
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


# ---- Triton's statistics and model configuration ----------------------------------------------


def test_statistics_count_each_v2_models_requests(
    triton: httpclient.InferenceServerClient, mnist_test: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """get_inference_statistics: successes with their rows, failures, one queue wait and one
    forward pass per request sent alone, by batch size, in Triton's shape."""
    name = "default-anomaly"
    (before,) = triton.get_inference_statistics(name)["model_stats"]
    images = real_digits(mnist_test, 5)
    triton.infer(name, [_input("images", images)])
    triton.infer(name, [_input("images", images[:2])])
    with pytest.raises(InferenceServerException):
        triton.infer(name, [_input("images", images + 2)])
    (after,) = triton.get_inference_statistics(name)["model_stats"]
    (version,) = triton.get_model_metadata(name)["versions"]
    assert (after["name"], after["version"]) == (name, version)
    assert after["inference_count"] - before["inference_count"] == 7
    assert after["execution_count"] - before["execution_count"] == 2
    assert abs(after["last_inference"] - time.time() * 1000) < 60_000
    stats, earlier = after["inference_stats"], before["inference_stats"]

    def grew(kind: str) -> tuple[int, int]:
        return (
            stats[kind]["count"] - earlier[kind]["count"],
            stats[kind]["ns"] - earlier[kind]["ns"],
        )

    counts = {kind: grew(kind)[0] for kind in stats}
    assert counts == {
        "success": 2, "fail": 1, "queue": 2, "compute_input": 2, "compute_infer": 2,
        "compute_output": 2, "cache_hit": 0, "cache_miss": 0,
    }  # fmt: skip
    assert 0 < grew("compute_infer")[1] < grew("success")[1]
    assert grew("queue")[1] >= 0
    batches = {entry["batch_size"]: entry for entry in after["batch_stats"]}
    batches_before = {entry["batch_size"]: entry for entry in before["batch_stats"]}
    for size in (5, 2):
        ran = batches[size]["compute_infer"]["count"]
        assert ran - batches_before.get(size, {"compute_infer": {"count": 0}})["compute_infer"][
            "count"] == 1  # fmt: skip
    assert triton.get_inference_statistics(name, "1") == triton.get_inference_statistics(name)
    everything = triton.get_inference_statistics()["model_stats"]
    assert {entry["name"] for entry in everything} == {
        f"{model}-{op}" for model in MODELS for op in ("decode", "sample", "encode", "anomaly")
    }
    with pytest.raises(InferenceServerException, match="no v2 model named 'nope-decode'"):
        triton.get_inference_statistics("nope-decode")


def test_model_configuration_in_tritons_shape(triton: httpclient.InferenceServerClient) -> None:
    """get_model_config: the metadata's tensors as Triton's configuration gives them, which of
    them are optional, and how the model is batched and placed."""
    for model in MODELS:
        for op in ("decode", "sample", "encode", "anomaly"):
            name = f"{model}-{op}"
            metadata = triton.get_model_metadata(name)
            config = triton.get_model_config(name)
            assert config == triton.get_model_config(name, model_version="1")
            assert config["name"] == name and config["platform"] == "pytorch"
            assert config["max_batch_size"] == 0  # the shapes hold the batch dimension
            for key, tensors in (("input", "inputs"), ("output", "outputs")):
                assert [(t["name"], t["data_type"], t["dims"]) for t in config[key]] == [
                    (t["name"], f"TYPE_{t['datatype']}", t["shape"]) for t in metadata[tensors]
                ]
            optional = {t["name"] for t in config["input"] if t["optional"]}
            if op == "sample":
                assert optional == {t["name"] for t in metadata["inputs"]}
            elif op == "encode":
                assert optional == ({"digit"} if model == DEFAULT else set())
            else:
                assert optional == set()
            assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 0}
            assert config["instance_group"] == [{"name": name, "count": 1, "kind": "KIND_CPU"}]


# ---- 503 and 504, as in the REST API ---------------------------------------------------------


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory, trained_checkpoint: Path) -> Iterator[LiveApp]:
    """Test hooks on (X-Test-Fault makes a forward pass slow), a queue of 8 images (so at most 4
    per request), a 3 s deadline."""
    root = tmp_path_factory.mktemp("v2-hooked")
    default = shutil.copytree(trained_checkpoint, root / DEFAULT)
    settings = {
        "enable_test_hooks": "true",
        "max_queue_images": "8",
        "max_samples": "4",
        "max_files": "4",
        "request_timeout_s": "3",
    }
    app = start_app(
        root / "server.log", "--checkpoints", str(default), "--device", "cpu",
        ready_within_s=120, settings=settings,
    )  # fmt: skip
    yield app
    stop_app(app)


def slow(seconds: float) -> dict[str, str]:
    return {"X-Test-Fault": f"slow={seconds:g}"}


def test_the_timeout_parameter_is_the_requests_deadline(hooked: LiveApp) -> None:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{hooked.port}")
    try:
        started = time.monotonic()
        deadline = r"passed its deadline of 0\.2 s \(its 'timeout' parameter\)"
        with pytest.raises(InferenceServerException, match=deadline) as late:
            client.infer("default-sample", [], timeout=200_000, headers=slow(1.5))
        assert late.value.status() == "504"
        assert time.monotonic() - started < 1.2  # at its deadline, not after the 1.5 s pass
        # With time enough, a slow pass is waited for (behind the one still running).
        result = client.infer("default-sample", [], timeout=20_000_000, headers=slow(0.3))
        assert result.as_numpy("images").shape == (1, 28, 28)
        # The server's own deadline (VAE_REQUEST_TIMEOUT_S) holds with or without one.
        with pytest.raises(InferenceServerException, match="waited more than 3 s") as late:
            client.infer("default-sample", [], timeout=60_000_000, headers=slow(4))
        assert late.value.status() == "504"
    finally:
        client.close()


def test_a_full_queue_is_a_503_with_retry_after(hooked: LiveApp) -> None:
    """One slow pass holds the model; of three requests of 4 images, two fit the queue of 8."""
    path = f"{hooked.base}/v2/models/default-sample/infer"

    def sample(count: int, headers: dict[str, str] | None = None) -> httpx2.Response:
        body = {"inputs": [], "parameters": {"n": count}}
        return httpx2.post(path, json=body, headers=headers, timeout=60)

    time.sleep(1.5)  # the previous test's last slow pass is over
    with ThreadPoolExecutor(4) as pool:
        blocker = pool.submit(sample, 1, slow(2.5))
        deadline = time.monotonic() + 10
        while httpx2.get(f"{hooked.base}/metrics").text.count("vae_requests_in_flight 2.0") == 0:
            assert time.monotonic() < deadline, "the slow request never started"
            time.sleep(0.05)
        time.sleep(0.2)  # its pass has started: the queue is empty
        answers = list(pool.map(sample, [4, 4, 4]))
        assert blocker.result().status_code == 200
    assert sorted(r.status_code for r in answers) == [200, 200, 503]
    (refused,) = [r for r in answers if r.status_code == 503]
    assert refused.headers["retry-after"] == "1"
    assert "images queued (limit 8); retry shortly" in refused.json()["error"]


# ---- the README's examples ------------------------------------------------------------------


def on_server(text: str, server: LiveApp) -> str:
    return text.replace("localhost:8000", f"127.0.0.1:{server.port}")


def test_the_readme_curl_examples_work_as_printed(server: LiveApp) -> None:
    """Each command of the README's v2 shell block, run by bash, prints the JSON in the comment
    below it."""
    (block,) = readme_blocks("### Open Inference Protocol (v2)")["bash"]
    examples: list[tuple[str, str]] = []
    command = ""
    for line in block.splitlines():
        if command == "" and line.startswith("# "):
            examples[-1] = (examples[-1][0], line[2:])
            continue
        command += line + "\n"
        if command.count("'") % 2 == 0 and not line.endswith("\\"):
            examples.append((command, ""))
            command = ""
    assert len(examples) == 5 and all(expected for _, expected in examples), examples
    for command, expected in examples:
        result = subprocess.run(
            ["bash", "-c", on_server(command, server)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, (command, result.stderr)
        # A version is the checkpoint's digest: the README shows an example one.
        digestless = [
            re.sub(r'"[0-9a-f]{12}"', '"digest"', text) for text in (result.stdout, expected)
        ]
        assert json.loads(digestless[0]) == json.loads(digestless[1]), command


def test_the_readme_tritonclient_example_works_as_printed(server: LiveApp, tmp_path: Path) -> None:
    blocks = readme_blocks("### Open Inference Protocol (v2)")
    (example,) = blocks["python"]
    (printed,) = blocks["text"]
    script = tmp_path / "example.py"
    script.write_text(on_server(example, server))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == printed
