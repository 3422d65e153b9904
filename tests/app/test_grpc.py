"""The Open Inference Protocol over gRPC (VAE_GRPC_PORT), driven by tritonclient.grpc against a
real `python -m app`: the same v2 models as over HTTP, answering the same values for the same
inputs and seeds, refusing bad calls with the right status code and a message, counted in
/metrics, behind the same API keys and concurrency cap."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx2
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from app_testing import LiveApp, free_port, metric, readme_blocks, start_app, stop_app
from conftest import UNCONDITIONAL_NAME
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

pytestmark = pytest.mark.slow

DEFAULT = "default"
MODELS = (DEFAULT, UNCONDITIONAL_NAME)
INFER_ROUTE = "/inference.GRPCInferenceService/ModelInfer"
KEY = "grpc-test-key-0123456789"
WITH_KEY = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def grpc_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    named_checkpoints: dict[str, Path],
    trained_checkpoint: Path,
    grpc_port: int,
) -> Iterator[LiveApp]:
    root = tmp_path_factory.mktemp("grpc")
    default = root / DEFAULT
    shutil.copytree(trained_checkpoint, default)
    app = start_app(
        root / "server.log",
        "--checkpoints",
        f"{default},{named_checkpoints[UNCONDITIONAL_NAME]}",
        "--device",
        "cpu",
        ready_within_s=120,
        settings={"grpc_port": str(grpc_port)},
    )
    yield app
    stop_app(app)


@pytest.fixture(scope="module")
def triton(server: LiveApp, grpc_port: int) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def triton_http(server: LiveApp) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(server: LiveApp, grpc_port: int) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    """The protocol's generated stub, for the requests tritonclient never builds (typed
    contents, malformed messages)."""
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def rest(server: LiveApp) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=server.base, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def latent_dims(rest: httpx2.Client) -> dict[str, int]:
    return {card["name"]: card["latent_dim"] for card in rest.get("/models").json()["models"]}


def grpc_inputs(tensors: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    inputs = []
    for name, array in tensors.items():
        item = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs


def http_inputs(tensors: dict[str, np.ndarray]) -> list[httpclient.InferInput]:
    inputs = []
    for name, array in tensors.items():
        item = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array, binary_data=True)
        inputs.append(item)
    return inputs


def both_ways(
    triton: grpcclient.InferenceServerClient,
    triton_http: httpclient.InferenceServerClient,
    model: str,
    tensors: dict[str, np.ndarray],
    outputs: list[str],
    parameters: dict[str, Any] | None = None,
) -> tuple[grpcclient.InferResult, httpclient.InferResult]:
    """The same request over gRPC and over HTTP (binary tensors), each checked to answer
    exactly the outputs asked for."""
    over_grpc = triton.infer(
        model,
        grpc_inputs(tensors),
        outputs=[grpcclient.InferRequestedOutput(name) for name in outputs],
        parameters=parameters,
    )
    over_http = triton_http.infer(
        model,
        http_inputs(tensors),
        outputs=[httpclient.InferRequestedOutput(name, binary_data=True) for name in outputs],
        parameters=parameters,
    )
    response = over_grpc.get_response()
    assert [output.name for output in response.outputs] == outputs
    assert len(response.raw_output_contents) == len(outputs)  # as tritonclient reads them
    answered_http = over_http.get_response()
    assert (response.model_name, response.model_version) == (model, answered_http["model_version"])
    assert len(response.model_version) == 12  # the revision's digest, as over HTTP
    return over_grpc, over_http


def assert_same_outputs(
    over_grpc: grpcclient.InferResult, over_http: httpclient.InferResult, outputs: list[str]
) -> None:
    for name in outputs:
        ours, theirs = over_grpc.as_numpy(name), over_http.as_numpy(name)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6, err_msg=name)


def response_parameters(result: grpcclient.InferResult) -> dict[str, Any]:
    parameters = result.get_response().parameters
    return {
        key: getattr(value, value.WhichOneof("parameter_choice"))
        for key, value in parameters.items()
    }


def real_digits(mnist_test: tuple[torch.Tensor, torch.Tensor], count: int) -> np.ndarray:
    images, _ = mnist_test
    return images[:count, 0].numpy().copy()


def refused(
    code: grpc.StatusCode, message: str, call: Callable[..., Any], *args: Any, **kwargs: Any
) -> None:
    """`call(*args, **kwargs)` raises tritonclient's exception with this status code and a
    message that holds `message`."""
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    assert caught.value.status() == str(code), caught.value
    assert message in caught.value.message(), caught.value.message()


# ---- health and metadata --------------------------------------------------------------------


def test_health_and_metadata(
    triton: grpcclient.InferenceServerClient, triton_http: httpclient.InferenceServerClient
) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    metadata = triton.get_server_metadata()
    assert (metadata.name, metadata.version) == ("vae-serve", "0.1.0")
    assert list(metadata.extensions) == ["parameters"]
    for model in MODELS:
        for op in ("decode", "sample", "encode", "anomaly"):
            name = f"{model}-{op}"
            assert triton.is_model_ready(name) and triton.is_model_ready(name, "1")
            ours = triton.get_model_metadata(name)
            theirs = triton_http.get_model_metadata(name)
            assert (ours.name, list(ours.versions), ours.platform) == (
                name, theirs["versions"], theirs["platform"],
            )  # fmt: skip
            for got, expected in (
                (ours.inputs, theirs["inputs"]),
                (ours.outputs, theirs["outputs"]),
            ):
                described = [
                    {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in got
                ]
                assert described == expected, name


def test_unknown_models_and_versions_are_not_found(
    triton: grpcclient.InferenceServerClient,
) -> None:
    not_found = grpc.StatusCode.NOT_FOUND
    z = {"z": np.zeros((1, 2), np.float32)}
    for name in ("nope-decode", "default-explode"):
        message = f"no v2 model named {name!r}"
        refused(not_found, message, triton.get_model_metadata, name)
        refused(not_found, message, triton.is_model_ready, name)
        refused(not_found, message, triton.infer, name, grpc_inputs(z))
    refused(
        not_found, "has no loaded version '2'", triton.infer, "default-decode", grpc_inputs(z), "2"
    )


# ---- each op against the HTTP v2 path -------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_decode_matches_http(
    triton: grpcclient.InferenceServerClient,
    triton_http: httpclient.InferenceServerClient,
    latent_dims: dict[str, int],
    model: str,
) -> None:
    z = torch.randn(3, latent_dims[model], generator=torch.Generator().manual_seed(5))
    tensors = {"z": z.numpy()}
    if model == DEFAULT:
        tensors["digit"] = np.array([1, 4, 7], dtype=np.int64)
    over_grpc, over_http = both_ways(triton, triton_http, f"{model}-decode", tensors, ["images"])
    assert over_grpc.as_numpy("images").shape == (3, 28, 28)
    assert_same_outputs(over_grpc, over_http, ["images"])


def test_sample_with_parameters_matches_http(
    triton: grpcclient.InferenceServerClient, triton_http: httpclient.InferenceServerClient
) -> None:
    outputs = ["images", "digit", "z"]
    digits = np.array([0, 3, 3, 8], dtype=np.int64)
    for parameters, prior in (
        ({"seed": 42, "temperature": 0.8}, "fitted"),
        ({"seed": 7, "prior": "standard"}, "standard"),
    ):
        over_grpc, over_http = both_ways(
            triton, triton_http, "default-sample", {"digit": digits}, outputs, parameters
        )
        assert_same_outputs(over_grpc, over_http, outputs)
        assert over_grpc.as_numpy("digit").tolist() == digits.tolist()
        assert response_parameters(over_grpc) == {"seed": parameters["seed"], "prior": prior}
    # n and seed as inputs, from the unconditional model: the same images again
    tensors = {"n": np.array([5], np.int64), "seed": np.array([11], np.int64)}
    over_grpc, over_http = both_ways(
        triton, triton_http, f"{UNCONDITIONAL_NAME}-sample", tensors, ["images"]
    )
    assert over_grpc.as_numpy("images").shape == (5, 28, 28)
    assert_same_outputs(over_grpc, over_http, ["images"])


def test_anomaly_matches_http(
    triton: grpcclient.InferenceServerClient,
    triton_http: httpclient.InferenceServerClient,
    mnist_test: tuple[torch.Tensor, torch.Tensor],
) -> None:
    noise = torch.rand(2, 28, 28, generator=torch.Generator().manual_seed(0)).numpy()
    images = np.concatenate([real_digits(mnist_test, 4), noise, np.zeros((1, 28, 28), np.float32)])
    outputs = ["score", "is_anomaly", "digit", "digit_probability", "percentile"]
    over_grpc, over_http = both_ways(
        triton, triton_http, "default-anomaly", {"images": images}, outputs
    )
    assert_same_outputs(over_grpc, over_http, outputs)
    flags = over_grpc.as_numpy("is_anomaly").tolist()
    assert flags[:4] == [False] * 4 and flags[4:] == [True] * 3  # digits, then noise and blank
    threshold = over_http.get_response()["parameters"]["threshold"]
    assert response_parameters(over_grpc) == {"threshold": threshold}
    high = triton.infer(
        "default-anomaly", grpc_inputs({"images": images}), parameters={"threshold": 1e9}
    )
    assert not high.as_numpy("is_anomaly").any()
    assert response_parameters(high) == {"threshold": 1e9}


def test_typed_contents_answer_as_raw_ones(
    server: LiveApp,
    triton: grpcclient.InferenceServerClient,
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
    mnist_test: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """The values in each input's typed `contents` (as clients other than tritonclient send
    them) instead of raw_input_contents: the same answer, in raw_output_contents."""
    images = real_digits(mnist_test, 3)
    request = service_pb2.ModelInferRequest(model_name="default-encode", id="typed-1")
    pixels = request.inputs.add(name="images", datatype="FP32", shape=images.shape)
    pixels.contents.fp32_contents.extend(images.ravel().tolist())
    digit = request.inputs.add(name="digit", datatype="INT64", shape=[3])
    digit.contents.int64_contents.extend([2, 2, 2])
    request.outputs.add(name="mu")
    answer, call = stub.ModelInfer.with_call(request, metadata=[("x-request-id", "typed-call-1")])
    typed = grpcclient.InferResult(answer)
    assert typed.get_response().id == "typed-1"
    # The request id comes back, and is on the call's access-log line
    assert ("x-request-id", "typed-call-1") in tuple(call.trailing_metadata())
    line = "[typed-call-1]: ipv4:127.0.0.1:"
    logged = [text for text in server.log.read_text().splitlines() if line in text]
    assert len(logged) == 1 and logged[0].endswith('"GRPC ' + INFER_ROUTE + '" 200'), logged
    raw = triton.infer(
        "default-encode",
        grpc_inputs({"images": images, "digit": np.full(3, 2, np.int64)}),
        outputs=[grpcclient.InferRequestedOutput("mu")],
    )
    np.testing.assert_allclose(typed.as_numpy("mu"), raw.as_numpy("mu"), rtol=1e-6, atol=1e-6)


# ---- refusals -------------------------------------------------------------------------------


def test_bad_inputs_are_invalid_arguments_with_a_message(
    triton: grpcclient.InferenceServerClient,
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
    latent_dims: dict[str, int],
) -> None:
    latent = latent_dims[DEFAULT]
    z = np.zeros((1, latent), np.float32)
    digit = np.array([3], np.int64)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases: list[tuple[str, dict[str, np.ndarray], dict[str, Any] | None, str]] = [
        ("default-decode", {"z": z.astype(np.float64), "digit": digit}, None,
         "input 'z' must be FP32, got FP64"),
        ("default-decode", {"z": np.zeros((1, latent + 1), np.float32), "digit": digit}, None,
         f"input 'z' must have shape [-1, {latent}] (-1: any size), got [1, {latent + 1}]"),
        ("default-decode", {"digit": digit}, None, "model 'default-decode' needs input z (FP32"),
        ("default-decode", {"z": z, "digit": np.array([10], np.int64)}, None,
         "digit must be in 0..9"),
        ("default-decode", {"z": np.full((1, latent), np.nan, np.float32), "digit": digit}, None,
         "NaN or infinite"),
        ("default-encode", {"images": np.full((1, 28, 28), 2.0, np.float32)}, None,
         "pixel values in [0, 1]"),
        ("default-sample", {"digit": digit}, {"temperature": 0.0}, "temperature must be in (0, 2]"),
    ]  # fmt: skip
    for model, tensors, parameters, message in cases:
        refused(invalid, message, triton.infer, model, grpc_inputs(tensors), parameters=parameters)
    # What tritonclient never sends: raw contents for some inputs only, values in the field of
    # another datatype, a negative dimension.
    request = service_pb2.ModelInferRequest(model_name="default-decode")
    request.inputs.add(name="z", datatype="FP32", shape=[1, latent])
    request.inputs.add(name="digit", datatype="INT64", shape=[1])
    request.raw_input_contents.append(z.tobytes())
    typed = service_pb2.ModelInferRequest(model_name="default-decode")
    typed.inputs.add(name="z", datatype="FP32", shape=[1, latent]).contents.int64_contents.extend(
        [0] * latent
    )
    negative = service_pb2.ModelInferRequest(model_name="default-decode")
    negative.inputs.add(name="z", datatype="FP32", shape=[-1, latent])
    negative.raw_input_contents.append(b"")
    for message, expected in (
        (request, "1 raw_input_contents for 2 inputs"),
        (typed, "so its values go in contents.fp32_contents; got int64_contents"),
        (negative, "inputs.0.shape.0"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(message)
        assert caught.value.code() == invalid
        assert expected in caught.value.details(), caught.value.details()


def test_over_a_limit_is_resource_exhausted(triton: grpcclient.InferenceServerClient) -> None:
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    images = np.zeros((65, 28, 28), np.float32)
    refused(
        exhausted,
        "at most 64 per request (VAE_MAX_FILES)",
        triton.infer,
        "default-anomaly",
        grpc_inputs({"images": images}),
    )
    # A message past VAE_MAX_JSON_BYTES (4 MiB), refused by gRPC before it is read
    big = np.zeros((4 * 2**20 // 4 + 1,), np.float32)
    refused(exhausted, "larger than max", triton.infer, "default-decode", grpc_inputs({"z": big}))


def test_calls_are_counted_in_the_metrics(
    triton: grpcclient.InferenceServerClient,
    rest: httpx2.Client,
    mnist_test: tuple[torch.Tensor, torch.Tensor],
) -> None:
    before = rest.get("/metrics").text
    images = real_digits(mnist_test, 3)
    triton.infer("default-encode", grpc_inputs({"images": images}))
    with pytest.raises(InferenceServerException):
        triton.infer("default-encode", grpc_inputs({"images": images + 2}))
    assert triton.is_server_ready()
    after = rest.get("/metrics").text

    def grew(name: str, labels: dict[str, str]) -> float:
        return metric(rest, name, labels, after) - metric(rest, name, labels, before)

    duration = "vae_request_duration_seconds_count"
    assert grew(duration, {"route": INFER_ROUTE, "method": "GRPC", "status": "200"}) == 1
    assert grew(duration, {"route": INFER_ROUTE, "method": "GRPC", "status": "400"}) == 1
    ready = "/inference.GRPCInferenceService/ServerReady"
    assert grew(duration, {"route": ready, "method": "GRPC", "status": "200"}) == 1
    assert grew("vae_requests_rejected_total", {"reason": "bad_request"}) == 1
    encode = {"model": DEFAULT, "op": "encode"}
    assert grew("vae_batch_size_count", encode) == 1  # the refused one never ran
    assert grew("vae_batch_size_sum", encode) == 3


# ---- the README's example ------------------------------------------------------------------


def test_the_readme_example_works_as_printed(
    server: LiveApp, grpc_port: int, tmp_path: Path
) -> None:
    """The README starts the server as the `server` fixture does (VAE_GRPC_PORT set), and its
    tritonclient.grpc example prints what the README says it prints."""
    blocks = readme_blocks("### Open Inference Protocol over gRPC")
    assert blocks["bash"] == ["VAE_GRPC_PORT=8001 python -m app\n"]
    (example,) = blocks["python"]
    (printed,) = blocks["text"]
    script = tmp_path / "example.py"
    script.write_text(example.replace("localhost:8001", f"127.0.0.1:{grpc_port}"))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == printed


# ---- keys, the shared concurrency cap, deadlines --------------------------------------------


@dataclass
class Guarded:
    app: LiveApp
    grpc_port: int
    rest: httpx2.Client


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory, trained_checkpoint: Path
) -> Iterator[Guarded]:
    """A server with an API key, one request in progress at most, a 2 s request deadline and
    the test hooks (x-test-fault)."""
    root = tmp_path_factory.mktemp("grpc-guarded")
    default = root / DEFAULT
    shutil.copytree(trained_checkpoint, default)
    port = free_port()
    app = start_app(
        root / "server.log",
        "--checkpoints",
        str(default),
        "--device",
        "cpu",
        ready_within_s=120,
        settings={
            "grpc_port": str(port),
            "api_keys": f"tester:user:{KEY}",
            "max_concurrency": "1",
            "request_timeout_s": "2",
            "enable_test_hooks": "true",
        },
    )
    with httpx2.Client(base_url=app.base, timeout=60) as rest:
        yield Guarded(app, port, rest)
    stop_app(app)


def test_api_keys_guard_every_call_but_health(guarded: Guarded) -> None:
    port, rest = guarded.grpc_port, guarded.rest
    before = rest.get("/metrics").text
    with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
        assert client.is_server_live() and client.is_server_ready()  # probes stay open
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        needs = "this call needs an API key: send the metadata `authorization: Bearer KEY`"
        refused(unauthenticated, needs, client.get_model_metadata, "default-sample")
        refused(
            unauthenticated,
            "this API key is not valid",
            client.get_model_metadata,
            "default-sample",
            headers={"authorization": "Bearer nope"},
        )
        assert (
            client.get_model_metadata("default-sample", headers=WITH_KEY).name == "default-sample"
        )
        sampled = client.infer(
            "default-sample", grpc_inputs({"digit": np.array([4], np.int64)}), headers=WITH_KEY
        )
        assert sampled.as_numpy("digit").tolist() == [4]
    after = rest.get("/metrics").text

    def grew(name: str, labels: dict[str, str]) -> float:
        return metric(rest, name, labels, after) - metric(rest, name, labels, before)

    route = "/inference.GRPCInferenceService/ModelMetadata"
    assert grew("vae_request_duration_seconds_count", {"route": route, "status": "401"}) == 2
    assert grew("vae_requests_rejected_total", {"reason": "unauthorized"}) == 2
    assert grew("vae_key_requests_total", {"key": "tester"}) == 2


def test_the_concurrency_cap_counts_http_and_grpc_together(guarded: Guarded) -> None:
    """With VAE_MAX_CONCURRENCY=1 and an HTTP request in progress (its body still coming), a
    gRPC call is refused UNAVAILABLE; the health calls still answer, within the reserve."""
    with grpcclient.InferenceServerClient(f"127.0.0.1:{guarded.grpc_port}") as client:
        digit = grpc_inputs({"digit": np.array([4], np.int64)})
        with socket.create_connection(("127.0.0.1", guarded.app.port)) as held:
            held.sendall(
                b"POST /v2/models/default-sample/infer HTTP/1.1\r\nHost: test\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n"
                + f"Authorization: Bearer {KEY}\r\n\r\n{{".encode()
            )
            # Scrapes count as requests in progress too (within the reserve): one that the server
            # took before the held request's headers would make it a 503, so give those the
            # time to arrive before the first scrape.
            time.sleep(0.5)
            wait_for_in_flight(guarded.rest, 2)  # the held request and this scrape
            refused(
                grpc.StatusCode.UNAVAILABLE,
                "at its limit of 1 requests in progress (VAE_MAX_CONCURRENCY)",
                client.infer,
                "default-sample",
                digit,
                headers=WITH_KEY,
            )
            assert client.is_server_ready()
        wait_for_in_flight(guarded.rest, 1)
        assert client.infer("default-sample", digit, headers=WITH_KEY).as_numpy("digit") == [4]


def wait_for_in_flight(rest: httpx2.Client, count: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        if metric(rest, "vae_requests_in_flight") == count:
            return
        assert time.monotonic() < deadline, f"never {count} requests in flight"
        time.sleep(0.1)


def test_deadlines_are_deadline_exceeded(guarded: Guarded) -> None:
    """The service's deadline (VAE_REQUEST_TIMEOUT_S, 2 s here) and the client's (a gRPC
    deadline) both end a call that the x-test-fault hook makes slow, counted as a 504."""
    rest = guarded.rest
    before = rest.get("/metrics").text
    digit = grpc_inputs({"digit": np.array([4], np.int64)})
    with grpcclient.InferenceServerClient(f"127.0.0.1:{guarded.grpc_port}") as client:

        def faulty(fault: str, **options: Any) -> None:
            headers = {**WITH_KEY, "x-test-fault": fault}
            client.infer("default-sample", digit, headers=headers, **options)

        exceeded = grpc.StatusCode.DEADLINE_EXCEEDED
        refused(exceeded, "the request waited more than 2 s", faulty, "slow=3")
        time.sleep(1.5)  # the slow pass ends
        started = time.monotonic()
        refused(exceeded, "Deadline Exceeded", faulty, "slow=1.5", client_timeout=0.5)
        assert time.monotonic() - started < 1.5
        refused(grpc.StatusCode.INTERNAL, "", faulty, "raise")
        refused(
            grpc.StatusCode.INVALID_ARGUMENT, "X-Test-Fault 'soon' is not a fault", faulty, "soon"
        )
    wait_for_in_flight(guarded.rest, 1)
    after = rest.get("/metrics").text
    timed_out = {"route": INFER_ROUTE, "method": "GRPC", "status": "504"}
    count = "vae_request_duration_seconds_count"
    assert metric(rest, count, timed_out, after) - metric(rest, count, timed_out, before) == 2


def test_each_worker_serves_grpc_on_the_shared_port(
    tmp_path: Path, trained_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With two worker processes both bind VAE_GRPC_PORT (SO_REUSEPORT) and the kernel spreads
    connections over them: calls on separate connections reach both workers, each counting its
    own in its metrics file."""
    default = tmp_path / DEFAULT
    shutil.copytree(trained_checkpoint, default)
    samples = tmp_path / "metrics"
    samples.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(samples))
    port = free_port()
    app = start_app(
        tmp_path / "server.log",
        "--checkpoints",
        str(default),
        "--device",
        "cpu",
        ready_within_s=180,
        settings={"grpc_port": str(port), "workers": "2"},
    )
    try:
        deadline = time.monotonic() + 120
        # Both workers listening and both with their models loaded: gRPC starts before the
        # models do, so a worker still loading answers ModelReady with ready=False.
        while (
            app.log.read_text().count("gRPC: the Open Inference Protocol on") < 2
            or app.log.read_text().count("ready: serving") < 2
        ):
            assert time.monotonic() < deadline, app.log.read_text()
            time.sleep(0.2)
        calls = 32
        for _ in range(calls):  # a connection of its own for each call
            with grpcclient.InferenceServerClient(
                f"127.0.0.1:{port}", channel_args=[("grpc.use_local_subchannel_pool", 1)]
            ) as client:
                assert client.is_model_ready("default-decode")
        ready = "/inference.GRPCInferenceService/ModelReady"
        labels = {"route": ready, "method": "GRPC", "status": "200"}
        with httpx2.Client(base_url=app.base) as rest:
            assert metric(rest, "vae_request_duration_seconds_count", labels) == calls
        per_worker = {
            pid: worker_count(samples, pid, "vae_request_duration_seconds_count", labels)
            for pid in {path.stem.rsplit("_", 1)[-1] for path in samples.glob("histogram_*.db")}
        }
        assert len(per_worker) == 2 and all(per_worker.values()), per_worker
    finally:
        stop_app(app)


def worker_count(samples: Path, pid: str, name: str, labels: dict[str, str]) -> float:
    """One worker's value of a sample, read from its own multiprocess metrics file."""
    alone = samples.parent / f"worker-{pid}"
    alone.mkdir()
    shutil.copy(samples / f"histogram_{pid}.db", alone)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(alone))
    return metric(None, name, labels, generate_latest(registry).decode())
