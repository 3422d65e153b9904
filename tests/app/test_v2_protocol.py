"""The v2 bodies: requests in JSON and with binary tensor data, and each way one can be wrong."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from app.errors import BadRequest
from app.http.v2_protocol import (
    HEADER_LENGTH,
    OutputTensor,
    decode_request,
    encode_response,
)


def body(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def binary_body(
    inputs: list[dict[str, Any]], arrays: list[np.ndarray], **extra: Any
) -> tuple[bytes, str]:
    """A body with the arrays' bytes after the JSON, and its Inference-Header-Content-Length."""
    described = [
        {**spec, "parameters": {"binary_data_size": array.nbytes}}
        for spec, array in zip(inputs, arrays, strict=True)
    ]
    head = body(described, **extra)
    return head + b"".join(a.tobytes() for a in arrays), str(len(head))


def test_json_tensors_flat_or_nested() -> None:
    z = [[0.5, -1.0], [2.0, 3.25]]
    for data in (z, [v for row in z for v in row]):
        request = decode_request(
            body([{"name": "z", "shape": [2, 2], "datatype": "FP32", "data": data}]), None
        )
        assert request.tensors["z"].dtype == np.float32
        np.testing.assert_array_equal(request.tensors["z"], np.array(z, dtype=np.float32))
        assert request.datatypes == {"z": "FP32"}
        assert request.outputs is None and request.binary_outputs is False


def test_no_inputs_at_all_and_parameters_of_any_name() -> None:
    """An op that takes everything as parameters gets no inputs; parameters no op takes (here
    tritonclient's and MLServer's) are handed on for the model to take or pass over."""
    parameters = {"n": 3, "timeout": 5000, "priority": 1, "sequence_id": 7, "content_type": "np"}
    request = decode_request(body([], parameters=parameters), None)
    assert request.tensors == {} and request.parameters == parameters


def test_binary_tensors_in_order_after_the_json() -> None:
    z = np.arange(6, dtype="<f4").reshape(2, 3) / 4
    digit = np.array([3, 9], dtype="<i8")
    data, length = binary_body(
        [
            {"name": "z", "shape": [2, 3], "datatype": "FP32"},
            {"name": "digit", "shape": [2], "datatype": "INT64"},
        ],
        [z, digit],
        id="request-7",
        parameters={"seed": 4, "binary_data_output": True},
    )
    request = decode_request(data, length)
    np.testing.assert_array_equal(request.tensors["z"], z)
    np.testing.assert_array_equal(request.tensors["digit"], digit)
    assert request.tensors["z"].flags.writeable  # a copy: torch takes it without a warning
    assert request.id == "request-7"
    assert request.parameters == {"seed": 4}  # the protocol's own parameter is taken out
    assert request.binary_outputs is True


def test_json_and_binary_inputs_mix() -> None:
    digit = np.array([1, 2], dtype="<i8")
    head = body(
        [
            {"name": "z", "shape": [2, 1], "datatype": "FP32", "data": [1, 2]},
            {"name": "digit", "shape": [2], "datatype": "INT64", "parameters": {
                "binary_data_size": 16}},
        ]
    )  # fmt: skip
    request = decode_request(head + digit.tobytes(), str(len(head)))
    np.testing.assert_array_equal(request.tensors["digit"], digit)
    np.testing.assert_array_equal(request.tensors["z"], [[1.0], [2.0]])


def test_requested_outputs_binary_each_or_by_default() -> None:
    request = decode_request(
        body(
            [{"name": "n", "shape": [1], "datatype": "INT64", "data": [1]}],
            outputs=[
                {"name": "images", "parameters": {"binary_data": True}},
                {"name": "z"},
            ],
        ),
        None,
    )
    assert request.outputs == {"images": True, "z": False}


@pytest.mark.parametrize(
    ("inputs", "extra", "message"),
    [
        ([{"name": "z", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}], {},
         r"shape \[2, 2\] holds 4 values, but 'data' has 3"),
        ([{"name": "z", "shape": [2], "datatype": "FP32", "data": [[1, 2], [3]]}], {},
         "must be a list of values"),
        ([{"name": "d", "shape": [2], "datatype": "INT64", "data": [1, 2.5]}], {},
         "is INT64, but its 'data' holds floats"),
        ([{"name": "d", "shape": [1], "datatype": "INT8", "data": [300]}], {},
         r"values must be in -128\.\.127"),
        ([{"name": "d", "shape": [1], "datatype": "FP32", "data": ["1"]}], {},
         "holds strings"),
        ([{"name": "d", "shape": [1], "datatype": "BOOL", "data": [1]}], {},
         "is BOOL, but its 'data' holds integers"),
        ([{"name": "d", "shape": [1], "datatype": "BYTES", "data": ["x"]}], {},
         "datatype 'BYTES', which is not taken here"),
        ([{"name": "d", "shape": [1], "datatype": "FP32"}], {}, "has no 'data'"),
        ([{"name": "d", "shape": [-1], "datatype": "FP32", "data": [1]}], {},
         r"inputs\.0\.shape\.0: Input should be greater than or equal to 0"),
        ([{"name": "d", "shape": [1], "datatype": "FP32", "data": [1]}] * 2, {},
         "input 'd' is given twice"),
        ([{"name": "d", "shape": [1], "datatype": "FP32", "data": [1]}],
         {"outputs": [{"name": "x"}, {"name": "x"}]}, "output 'x' is asked for twice"),
        ([{"name": "d", "shape": [1], "datatype": "FP32", "data": [1]}],
         {"outputs": [{"name": "x", "parameters": {"binary_data": "yes"}}]},
         "binary_data must be true or false"),
        ([{"name": "d", "shape": [1], "datatype": "FP32", "data": [1]}],
         {"parameters": {"binary_data_output": 1}}, "must be true or false"),
        ([{"name": "d", "shape": [1], "datatype": "FP32", "data": [1]}],
         {"parameters": {"seed": [1]}}, r"parameters\.seed"),
        ([{"name": "d", "shape": [1], "datatype": "FP32", "data": [1]}], {"id": 5},
         "id: Input should be a valid string"),
    ],
)  # fmt: skip
def test_malformed_json_requests(
    inputs: list[dict[str, Any]], extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(BadRequest, match=message):
        decode_request(body(inputs, **extra), None)


def test_a_body_that_is_not_json() -> None:
    with pytest.raises(BadRequest, match=r"the body is not JSON .*Inference-Header-Content-Length"):
        decode_request(b"\x00\x01 not json", None)


@pytest.mark.parametrize(
    ("length", "message"),
    [
        ("abc", f"{HEADER_LENGTH} must be the byte length"),
        ("-1", f"{HEADER_LENGTH} must be the byte length"),
        ("1_0", f"{HEADER_LENGTH} must be the byte length"),
        ("99999", "longer than the whole body"),
    ],
)
def test_bad_binary_header_lengths(length: str, message: str) -> None:
    data, _ = binary_body(
        [{"name": "z", "shape": [1], "datatype": "FP32"}], [np.zeros(1, dtype="<f4")]
    )
    with pytest.raises(BadRequest, match=message):
        decode_request(data, length)


def test_binary_sizes_must_add_up() -> None:
    z = np.zeros((2, 2), dtype="<f4")
    spec = [{"name": "z", "shape": [2, 2], "datatype": "FP32"}]
    data, length = binary_body(spec, [z])
    with pytest.raises(BadRequest, match=r"needs bytes 0\.\.16 of the binary data, but it has 12"):
        decode_request(data[:-4], length)
    with pytest.raises(BadRequest, match="4 bytes after the binary data"):
        decode_request(data + b"\x00" * 4, length)
    wrong, length = binary_body([{**spec[0], "shape": [2, 3]}], [z])
    with pytest.raises(BadRequest, match=r"shape \[2, 3\] of FP32 is 24 bytes, but its"):
        decode_request(wrong, length)
    head = body([{**spec[0], "parameters": {"binary_data_size": -1}}])
    with pytest.raises(BadRequest, match="binary_data_size must be a byte count"):
        decode_request(head, str(len(head)))
    both, length = binary_body([{**spec[0], "data": [0, 0, 0, 0]}], [z])
    with pytest.raises(BadRequest, match="has both 'data' and binary_data_size"):
        decode_request(both, length)


def test_a_wrong_header_length_makes_the_json_unreadable() -> None:
    data, length = binary_body(
        [{"name": "z", "shape": [1], "datatype": "FP32"}], [np.zeros(1, dtype="<f4")]
    )
    with pytest.raises(BadRequest, match=f"not JSON .*check that {HEADER_LENGTH}"):
        decode_request(data, str(int(length) - 1))


def test_responses_in_json_or_binary() -> None:
    images = np.linspace(0, 1, 8, dtype=np.float32).reshape(2, 2, 2)
    flags = np.array([True, False])
    outputs = [
        OutputTensor("images", "FP32", images, binary=True),
        OutputTensor("is_anomaly", "BOOL", flags, binary=False),
    ]
    content, headers = encode_response("m-decode", "1", "r1", {"seed": 3}, outputs)
    assert headers["content-type"] == "application/octet-stream"
    length = int(headers[HEADER_LENGTH.lower()])
    document = json.loads(content[:length])
    assert document["model_name"] == "m-decode" and document["id"] == "r1"
    assert document["parameters"] == {"seed": 3}
    first, second = document["outputs"]
    assert first == {
        "name": "images",
        "datatype": "FP32",
        "shape": [2, 2, 2],
        "parameters": {"binary_data_size": 32},
    }
    np.testing.assert_array_equal(np.frombuffer(content[length:], "<f4").reshape(2, 2, 2), images)
    assert second == {"name": "is_anomaly", "datatype": "BOOL", "shape": [2], "data": [True, False]}
    content, headers = encode_response("m-decode", "1", None, {}, outputs[1:])
    assert headers == {"content-type": "application/json"}
    assert "id" not in json.loads(content) and "parameters" not in json.loads(content)
