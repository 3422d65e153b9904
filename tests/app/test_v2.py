"""The Open Inference Protocol (v2) routes, driven by the client users have (tritonclient's
InferenceServerClient) against a real `python -m app`, with values checked against the REST API
for the same inputs and seeds, and every kind of malformed request answered 4xx."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from app_testing import JSON_ACCEPT, REPO, LiveApp, files, metric, png_of, start_app, stop_app
from conftest import UNCONDITIONAL_NAME
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from app.main import create_app
from app.settings import Settings

pytestmark = pytest.mark.slow

DEFAULT = "default"  # the conditional checkpoint, served under the README's model name
MODELS = (DEFAULT, UNCONDITIONAL_NAME)
BINARY = pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])


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
    metadata = triton.get_server_metadata()
    assert metadata["name"] == "vae-serve"
    assert "binary_tensor_data" in metadata["extensions"]


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


@BINARY
def test_sample_matches_rest_for_the_same_seed(
    triton: httpclient.InferenceServerClient, rest: httpx2.Client, binary: bool
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


def test_sample_random_digits_and_unconditional_models_take_n(
    triton: httpclient.InferenceServerClient, rest: httpx2.Client
) -> None:
    for model, outputs in (("default", ["images", "digit"]), (UNCONDITIONAL_NAME, ["images"])):
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
         {"json": request_body(z, digit)}, 404, "has no version '2'"),
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
        ("unknown parameter", sample,
         {"json": request_body(digit, parameters={"temprature": 0.5})}, 400,
         "takes no parameter 'temprature'"),
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


# ---- the README's examples ------------------------------------------------------------------


def readme_blocks() -> dict[str, list[str]]:
    """The fenced blocks of the README's v2 section, by language."""
    text = (REPO / "README.md").read_text()
    start = text.index("### Open Inference Protocol (v2)")
    section = text[start : text.index("\n### ", start + 1)]
    blocks: dict[str, list[str]] = {}
    for language, block in re.findall(r"```(\w+)\n(.*?)```", section, re.S):
        blocks.setdefault(language, []).append(block)
    return blocks


def on_server(text: str, server: LiveApp) -> str:
    return text.replace("localhost:8000", f"127.0.0.1:{server.port}")


def test_the_readme_curl_examples_work_as_printed(server: LiveApp) -> None:
    """Each command of the README's v2 shell block, run by bash, prints the JSON in the comment
    below it."""
    (block,) = readme_blocks()["bash"]
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
    assert len(examples) == 3 and all(expected for _, expected in examples), examples
    for command, expected in examples:
        result = subprocess.run(
            ["bash", "-c", on_server(command, server)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, (command, result.stderr)
        assert json.loads(result.stdout) == json.loads(expected), command


def test_the_readme_tritonclient_example_works_as_printed(server: LiveApp, tmp_path: Path) -> None:
    blocks = readme_blocks()
    (example,) = blocks["python"]
    (printed,) = blocks["text"]
    script = tmp_path / "example.py"
    script.write_text(on_server(example, server))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == printed
