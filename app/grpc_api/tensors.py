"""The Open Inference Protocol's gRPC messages (the generated modules tritonclient ships) to the
v2 adapter's decoded request, checked by the same rules as a JSON body, and outputs back to a
ModelInferResponse with raw_output_contents, as tritonclient.grpc reads them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from app.errors import BadRequest
from app.http.v2_protocol import (
    DATATYPES,
    DecodedRequest,
    OutputTensor,
    ParameterValue,
    datatype,
    decode_inputs,
    validated_request,
)

# The typed field of InferTensorContents that holds each datatype's values; FP16 has none (its
# values come in raw_input_contents only).
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
INT64_MAX = 2**63 - 1


def decode_infer_request(request: pb.ModelInferRequest) -> DecodedRequest:
    """A ModelInferRequest's tensors, from raw_input_contents (one per input, in order, as
    tritonclient sends them) or from each input's typed `contents`."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"the request has {len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
            "give one per input, in order, or none (and each input its typed contents)"
        )
    inputs: list[dict[str, Any]] = []
    for item in request.inputs:
        document: dict[str, Any] = {
            "name": item.name,
            "shape": list(item.shape),
            "datatype": item.datatype,
            "parameters": _parameters(item.parameters),
        }
        if not raw:
            document["data"] = _typed_values(item)
        elif item.HasField("contents"):
            raise BadRequest(
                f"input {item.name!r} has typed contents, but the request sends its inputs in "
                "raw_input_contents; give each input's values one way"
            )
        inputs.append(document)
    outputs = [
        {"name": output.name, "parameters": _parameters(output.parameters)}
        for output in request.outputs
    ]
    document = {
        "id": request.id or None,
        "parameters": _parameters(request.parameters),
        "inputs": inputs,
        "outputs": outputs or None,  # none named: every output
    }
    return decode_inputs(validated_request(document), raw or [None] * len(inputs))


def infer_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    parameters: Mapping[str, ParameterValue],
    outputs: list[OutputTensor],
) -> pb.ModelInferResponse:
    """The response, every output's bytes (little-endian, row-major) in raw_output_contents."""
    response = pb.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request_id or ""
    )
    for key, value in parameters.items():
        set_parameter(response.parameters[key], value)
    for output in outputs:
        array = np.ascontiguousarray(output.array, dtype=DATATYPES[output.datatype])
        response.outputs.add(name=output.name, datatype=output.datatype, shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response


def set_parameter(parameter: pb.InferParameter, value: ParameterValue) -> None:
    if isinstance(value, bool):  # before int: a bool is an int
        parameter.bool_param = value
    elif isinstance(value, int):
        if value > INT64_MAX:
            parameter.uint64_param = value
        else:
            parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = value


def _parameters(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any] | None:
    """Parameters as the JSON request has them (None for a parameter with no value set, which
    validation refuses by name)."""
    if not parameters:
        return None
    return {
        key: None
        if (kind := value.WhichOneof("parameter_choice")) is None
        else getattr(value, kind)
        for key, value in parameters.items()
    }


def _typed_values(item: pb.ModelInferRequest.InferInputTensor) -> list[Any]:
    """An input's values from the field of `contents` its datatype uses."""
    what = f"input {item.name!r}"
    datatype(item.datatype, what)  # an unknown datatype: a 400 that names the ones taken
    field = CONTENTS_FIELDS.get(item.datatype)
    if field is None:
        raise BadRequest(
            f"{what} is {item.datatype}, which has no typed contents; send it in raw_input_contents"
        )
    held = [described.name for described, _ in item.contents.ListFields()]
    if any(name != field for name in held):
        raise BadRequest(
            f"{what} is {item.datatype}, so its values go in contents.{field}; got "
            f"{', '.join(held)}"
        )
    values = list(getattr(item.contents, field))
    if all(d >= 0 for d in item.shape) and len(values) != math.prod(item.shape):
        raise BadRequest(
            f"{what}: shape {list(item.shape)} holds {math.prod(item.shape)} values, but "
            f"contents.{field} has {len(values)}"
        )
    return values
