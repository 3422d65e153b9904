"""The Open Inference Protocol (KServe v2) bodies: an inference request, in JSON or with the
binary tensor data extension, to named numpy arrays, and named arrays back to a response."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import orjson
from pydantic import (
    BaseModel,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from app.errors import BadRequest

# The binary tensor data extension (as Triton defines it): the body is this many bytes of
# JSON, then the raw bytes of each tensor whose parameters carry `binary_data_size`, in order.
HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
# Request parameters that belong to the protocol, not to a model.
BINARY_OUTPUTS = "binary_data_output"  # every output in binary unless it says otherwise
BINARY_SIZE = "binary_data_size"
BINARY_OUTPUT = "binary_data"

# The fixed-size datatypes, as binary tensor data stores them: little-endian, row-major.
# BYTES (length-prefixed strings) and BF16 (no numpy type) are taken by no model here.
DATATYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(code)
    for name, code in {
        "BOOL": "?",
        "UINT8": "u1",
        "UINT16": "<u2",
        "UINT32": "<u4",
        "UINT64": "<u8",
        "INT8": "i1",
        "INT16": "<i2",
        "INT32": "<i4",
        "INT64": "<i8",
        "FP16": "<f2",
        "FP32": "<f4",
        "FP64": "<f8",
    }.items()
}
# Which kinds of JSON values (as numpy infers them) each kind of datatype takes: integers go
# into float tensors, but a float never silently truncates into an integer tensor.
_ACCEPTED_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_KIND_NAMES = {"b": "booleans", "i": "integers", "u": "integers", "f": "floats", "U": "strings"}
_BYTE_COUNT = re.compile(r"[0-9]{1,18}")
MAX_RANK = 8
MAX_TENSORS = 64
MAX_REPORTED_ERRORS = 3

# Integers as int64 or uint64 hold them, floats finite: a parameter past either would turn into
# an overflow, or an inf that JSON cannot carry back, deep inside an op.
ParameterInt = Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)]
ParameterFloat = Annotated[StrictFloat, Field(allow_inf_nan=False)]
ParameterValue = StrictBool | ParameterInt | ParameterFloat | StrictStr
Parameters = dict[str, ParameterValue]
Dimension = Annotated[StrictInt, Field(ge=0)]
# Values one tensor's shape may describe, its zero dimensions left out: numpy refuses a shape
# past its address space even when a zero makes it empty, and no op here takes anything near.
MAX_SHAPE_VALUES = 2**32


class RequestInput(BaseModel):
    """One input tensor: its values in `data` (row-major, flat or nested), or in the binary
    part of the body when `parameters.binary_data_size` gives their byte count."""

    name: StrictStr
    shape: list[Dimension] = Field(max_length=MAX_RANK)
    datatype: StrictStr
    parameters: Parameters | None = None
    data: Any = None

    @field_validator("shape")
    @classmethod
    def _describable(cls, shape: list[int]) -> list[int]:
        if math.prod(d for d in shape if d) > MAX_SHAPE_VALUES:
            raise ValueError(
                f"shape {shape} describes more than {MAX_SHAPE_VALUES} values, even leaving "
                "out its zero dimensions"
            )
        return shape


class RequestOutput(BaseModel):
    """An output the client wants; `parameters.binary_data` asks for it in binary."""

    name: StrictStr
    parameters: Parameters | None = None


class InferenceRequest(BaseModel):
    """The JSON of `POST /v2/models/{name}/infer` (the protocol's $inference_request)."""

    id: StrictStr | None = None
    parameters: Parameters | None = None
    # Empty for an op that takes everything it needs as parameters (-sample).
    inputs: list[RequestInput] = Field(max_length=MAX_TENSORS)
    outputs: list[RequestOutput] | None = Field(default=None, max_length=MAX_TENSORS)


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: Parameters | None = Field(
        default=None, description="`binary_data_size` when the values follow the JSON in binary."
    )
    data: list[Any] | None = Field(default=None, description="The values, row-major, flat.")


class InferenceResponse(BaseModel):
    """The protocol's $inference_response (the JSON part, when outputs are in binary)."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


@dataclass(frozen=True)
class DecodedRequest:
    """An inference request's tensors (native byte order), parameters and wanted outputs."""

    id: str | None
    tensors: dict[str, np.ndarray]
    datatypes: dict[str, str]
    parameters: dict[str, ParameterValue]  # the model's: the protocol's own are taken out
    outputs: dict[str, bool] | None  # wanted output -> in binary; None: every output
    binary_outputs: bool  # the default for outputs not asked for by name


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    array: np.ndarray
    binary: bool


def decode_request(body: bytes, header_length: str | None) -> DecodedRequest:
    """Parse a request body; `header_length` is its Inference-Header-Content-Length header."""
    head, tail = _split(body, header_length)
    try:
        request = InferenceRequest.model_validate_json(head)
    except ValidationError as exc:
        raise BadRequest(_invalid_request(exc, binary=header_length is not None)) from None
    return decode_inputs(request, _binary_parts(request, tail, len(head), len(body)))


def validated_request(document: dict[str, Any]) -> InferenceRequest:
    """An inference request built by another protocol's adapter (gRPC's) as the JSON's
    document, checked by the same rules as a JSON body."""
    try:
        return InferenceRequest.model_validate(document)
    except ValidationError as exc:
        raise BadRequest(_invalid_request(exc, binary=False)) from None


def decode_inputs(request: InferenceRequest, binary: Sequence[bytes | None]) -> DecodedRequest:
    """A validated request's tensors, each from its `data` or from its raw bytes (`binary`,
    one entry per input: the binary tensor data extension's, or gRPC's raw_input_contents)."""
    tensors: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for item, data in zip(request.inputs, binary, strict=True):
        if item.name in tensors:
            raise BadRequest(f"input {item.name!r} is given twice; give each input once")
        tensors[item.name] = _from_json(item) if data is None else _from_binary(item, data)
        datatypes[item.name] = item.datatype
    parameters = dict(request.parameters or {})
    binary_outputs = parameters.pop(BINARY_OUTPUTS, False)
    if not isinstance(binary_outputs, bool):
        raise BadRequest(f"parameter {BINARY_OUTPUTS!r} must be true or false")
    return DecodedRequest(
        request.id,
        tensors,
        datatypes,
        parameters,
        None if request.outputs is None else _wanted(request.outputs, binary_outputs),
        binary_outputs,
    )


def _binary_parts(
    request: InferenceRequest, tail: bytes, head_bytes: int, body_bytes: int
) -> list[bytes | None]:
    """Each input's slice of the binary data after the JSON (None: its values are in `data`)."""
    parts: list[bytes | None] = []
    offset = 0
    for item in request.inputs:
        size = (item.parameters or {}).get(BINARY_SIZE)
        if size is None:
            parts.append(None)
            continue
        if item.data is not None:
            raise BadRequest(
                f"input {item.name!r} has both 'data' and {BINARY_SIZE}; give one of them"
            )
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadRequest(
                f"input {item.name!r}: {BINARY_SIZE} must be a byte count, got {size!r}"
            )
        if offset + size > len(tail):
            raise BadRequest(
                f"input {item.name!r} needs bytes {offset}..{offset + size} of the binary "
                f"data, but it has {len(tail)} bytes ({HEADER_LENGTH} says the JSON is "
                f"{head_bytes} of the body's {body_bytes} bytes)"
            )
        parts.append(tail[offset : offset + size])
        offset += size
    if offset != len(tail):
        raise BadRequest(
            f"the body has {len(tail) - offset} bytes after the binary data of the inputs "
            f"({offset} bytes by their {BINARY_SIZE}); {HEADER_LENGTH} must give the JSON's "
            "exact length"
        )
    return parts


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    parameters: dict[str, ParameterValue],
    outputs: list[OutputTensor],
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON alone, or JSON then the binary outputs."""
    described: list[dict[str, Any]] = []
    binary: list[bytes] = []
    for output in outputs:
        array = np.ascontiguousarray(output.array, dtype=DATATYPES[output.datatype])
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(array.shape),
        }
        if output.binary:
            binary.append(array.tobytes())
            entry["parameters"] = {BINARY_SIZE: len(binary[-1])}
        else:
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                # A bare NaN or inf is not JSON: every op checks its inputs so that none comes
                # out, and if one did, it is a server fault.
                raise ValueError(f"output {output.name!r} holds NaN or infinite values")
            entry["data"] = array.ravel().tolist()
        described.append(entry)
    document: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        document["id"] = request_id
    if parameters:
        document["parameters"] = parameters
    document["outputs"] = described
    # orjson: one image's 784 floats took ~3 ms in json.dumps on a busy core, ~0.2 ms here;
    # the same shortest round-trip digits as Python's repr (exponents written e-8, not e-08).
    head = orjson.dumps(document)
    if not binary:
        return head, {"content-type": JSON_TYPE}
    headers = {"content-type": BINARY_TYPE, HEADER_LENGTH.lower(): str(len(head))}
    return head + b"".join(binary), headers


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(the JSON, the binary data) of a body."""
    if header_length is None:
        return body, b""
    if not _BYTE_COUNT.fullmatch(header_length.strip()):
        raise BadRequest(
            f"{HEADER_LENGTH} must be the byte length of the body's JSON, got {header_length!r}"
        )
    length = int(header_length)
    if length > len(body):
        raise BadRequest(
            f"{HEADER_LENGTH} is {length}, longer than the whole body ({len(body)} bytes): "
            "it must give the length of the JSON that starts the body"
        )
    return body[:length], body[length:]


def _invalid_request(exc: ValidationError, *, binary: bool) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    if errors[0]["type"] == "json_invalid":
        hint = (
            f"check that {HEADER_LENGTH} is the JSON's length"
            if binary
            else f"with binary tensor data, send the JSON's length in {HEADER_LENGTH}"
        )
        return f"the body is not JSON ({errors[0]['msg']}); {hint}"
    problems = "; ".join(
        f"{'.'.join(map(str, error['loc'])) or 'body'}: {error['msg']}"
        for error in errors[:MAX_REPORTED_ERRORS]
    )
    more = len(errors) - MAX_REPORTED_ERRORS
    return f"not a v2 inference request: {problems}" + (f" (and {more} more)" if more > 0 else "")


def datatype(name: str, what: str) -> np.dtype[Any]:
    """The numpy type of a protocol datatype, or a 400 that names the ones taken."""
    try:
        return DATATYPES[name]
    except KeyError:
        raise BadRequest(
            f"{what} has datatype {name!r}, which is not taken here; use one of "
            f"{', '.join(DATATYPES)}"
        ) from None


def _from_binary(item: RequestInput, data: bytes) -> np.ndarray:
    dtype = datatype(item.datatype, f"input {item.name!r}")
    expected = math.prod(item.shape) * dtype.itemsize
    if len(data) != expected:
        raise BadRequest(
            f"input {item.name!r}: shape {item.shape} of {item.datatype} is {expected} bytes, "
            f"but its {BINARY_SIZE} is {len(data)}"
        )
    # A copy, in native byte order: frombuffer's view of the body is read-only.
    return np.frombuffer(data, dtype).astype(dtype.newbyteorder("=")).reshape(item.shape)


def _from_json(item: RequestInput) -> np.ndarray:
    what = f"input {item.name!r}"
    dtype = datatype(item.datatype, what)
    if item.data is None:
        raise BadRequest(f"{what} has no 'data' (nor a {BINARY_SIZE} parameter)")
    try:
        values = np.asarray(item.data)
    except (ValueError, RecursionError) as exc:  # ragged lists, or nested past numpy's rank
        raise BadRequest(
            f"{what}: 'data' must be a list of values, flat or nested as the shape ({exc})"
        ) from None
    count = math.prod(item.shape)
    if values.size != count:
        raise BadRequest(
            f"{what}: shape {item.shape} holds {count} values, but 'data' has {values.size}"
        )
    if values.size and values.dtype.kind not in _ACCEPTED_KINDS[dtype.kind]:
        held = _KIND_NAMES.get(values.dtype.kind, "values of mixed or out-of-range types")
        raise BadRequest(f"{what} is {item.datatype}, but its 'data' holds {held}")
    if dtype.kind in "iu" and values.size:
        limits = np.iinfo(dtype)
        if values.min() < limits.min or values.max() > limits.max:
            raise BadRequest(
                f"{what}: values must be in {limits.min}..{limits.max} for {item.datatype}"
            )
    with np.errstate(over="ignore"):  # too large for FP32 becomes inf, refused by the model
        return values.astype(dtype.newbyteorder("=")).reshape(item.shape)


def _wanted(outputs: list[RequestOutput], binary_outputs: bool) -> dict[str, bool]:
    wanted: dict[str, bool] = {}
    for output in outputs:
        if output.name in wanted:
            raise BadRequest(f"output {output.name!r} is asked for twice")
        parameters = output.parameters or {}
        if "classification" in parameters:
            raise BadRequest(
                f"output {output.name!r}: the classification extension is not supported"
            )
        binary = parameters.get(BINARY_OUTPUT, binary_outputs)
        if not isinstance(binary, bool):
            raise BadRequest(f"output {output.name!r}: {BINARY_OUTPUT} must be true or false")
        wanted[output.name] = binary
    return wanted
