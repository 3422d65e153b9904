"""The Open Inference Protocol (KServe v2, as Triton speaks it): health, metadata, inference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from app.errors import NotReady
from app.http.state import ServiceState, StateDep, service
from app.http.v2_models import V2Model, find_model, infer
from app.http.v2_protocol import (
    BINARY_TYPE,
    HEADER_LENGTH,
    InferenceRequest,
    InferenceResponse,
    decode_request,
    encode_response,
)
from app.tracing import span

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])
SERVER_NAME = "vae-serve"
EXTENSIONS = ["binary_tensor_data", "parameters", "statistics", "model_configuration"]
# Bodies and outputs past these sizes are parsed or encoded in a worker thread, so that a
# large JSON tensor never stalls the event loop; small ones are cheaper inline.
INLINE_BODY_BYTES = 64 * 1024
INLINE_OUTPUT_VALUES = 4096


class V2Error(BaseModel):
    error: str = Field(description="What was wrong and how to fix it.")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Liveness(BaseModel):
    live: bool


class Readiness(BaseModel):
    ready: bool


class ModelReadiness(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size.")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


_ERRORS = {
    400: "A malformed request, or a tensor of the wrong name, datatype, shape or size.",
    403: "Model management is off (VAE_MODEL_CONTROL), or the key lacks the admin role.",
    404: "No such v2 model (`<model>-<op>`) or version.",
    408: "The request body stalled past VAE_BODY_TIMEOUT_S.",
    413: "Over a configured limit: body bytes or images.",
    503: "Not ready or overloaded; see Retry-After.",
    504: "The request waited past its deadline.",
    422: "The body does not fit the request's schema.",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": V2Error, "description": _ERRORS[code]} for code in codes}


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its $defs put in place, to stand alone in openapi_extra."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    result: dict[str, Any] = resolve(schema)
    return result


INFER_OPENAPI = {
    "parameters": [
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "required": False,
            "description": "Binary tensor data extension: the byte length of the JSON that "
            "starts the body; the inputs' raw bytes follow it.",
            "schema": {"type": "integer", "minimum": 0},
        }
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inlined(InferenceRequest.model_json_schema())},
            BINARY_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    },
}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": InferenceResponse,
        "description": "JSON, or with binary outputs the JSON (its length in the "
        f"{HEADER_LENGTH} header) followed by their bytes.",
        "content": {BINARY_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    },
    **_errors(400, 404, 408, 413, 503, 504),
}
ModelName = Annotated[str, Path(description="`<model>-<op>`, e.g. default-decode.")]
VERSION_PARAMETER = {
    "name": "model_version",
    "in": "path",
    "required": True,
    "schema": {
        "type": "string",
        "description": "A loaded version (GET /v2/models/{model_name} lists them).",
    },
}
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def model_route(
    method: str, path: str, *, on: APIRouter = router, **options: Any
) -> Callable[[Endpoint], Endpoint]:
    """Register an endpoint at /v2/models/{model_name}<path> and at its twin with the optional
    /versions/{model_version} segment (which the v2_model dependency reads from the path)."""
    extra = options.pop("openapi_extra", {})
    versioned = {**extra, "parameters": [*extra.get("parameters", []), VERSION_PARAMETER]}

    def register(endpoint: Endpoint) -> Endpoint:
        for template, openapi_extra in (
            ("/models/{model_name}", extra),
            ("/models/{model_name}/versions/{model_version}", versioned),
        ):
            on.add_api_route(
                template + path,
                endpoint,
                methods=[method],
                openapi_extra=openapi_extra or None,
                **options,
            )
        return endpoint

    return register


def _models(state: ServiceState) -> dict[str, V2Model]:
    if not state.ready or state.registry is None:
        raise NotReady("models are still loading; retry when GET /v2/health/ready answers 200")
    return state.v2_models


def _find(state: ServiceState, name: str, version: str | None) -> V2Model:
    return find_model(_models(state), name, version, state.v2_versions)


async def v2_model(request: Request, state: StateDep, model_name: ModelName) -> V2Model:
    """The v2 model a route names, at the version its path gives, if it gives one."""
    return _find(state, model_name, request.path_params.get("model_version"))


V2ModelDep = Annotated[V2Model, Depends(v2_model)]


@router.get("", response_model=ServerMetadata)
async def server_metadata(request: Request) -> ServerMetadata:
    """The server's name, version and protocol extensions."""
    return ServerMetadata(name=SERVER_NAME, version=request.app.version, extensions=EXTENSIONS)


@router.get("/health/live", response_model=Liveness)
async def live() -> Liveness:
    """200 while the process lives (as /healthz)."""
    return Liveness(live=True)


@router.get("/health/ready", response_model=Readiness, responses=_errors(503))
async def ready(state: StateDep) -> Readiness:
    """200 once every model is loaded and warmed up (as /readyz); 503 before."""
    _models(state)
    return Readiness(ready=True)


@model_route("GET", "", response_model=ModelMetadata, responses=_errors(404, 503))
async def model_metadata(model: V2ModelDep, state: StateDep) -> ModelMetadata:
    """A v2 model's versions loaded, platform, and input and output tensors."""
    assert state.repository is not None
    versions = state.repository.versions(model.entry.name)
    return ModelMetadata.model_validate(model.metadata(versions))


@model_route("GET", "/ready", response_model=ModelReadiness, responses=_errors(404, 503))
async def model_ready(model: V2ModelDep) -> ModelReadiness:
    """200 when the v2 model is loaded and warmed up."""
    return ModelReadiness(name=model.name, ready=True)


@model_route("POST", "/infer", responses=INFER_RESPONSES, openapi_extra=INFER_OPENAPI)
async def model_infer(request: Request, model_name: ModelName) -> Response:
    """Run a v2 model on tensors in JSON or binary (the binary tensor data extension)."""
    # The hot route takes its state and model without dependency solving (app.state.service).
    state = service(request)
    model = _find(state, model_name, request.path_params.get("model_version"))
    # Taken before the body is awaited: a reload meanwhile retires the version found only
    # after its requests have had their time (ModelRepository), so this one is answered by it.
    handle = state.handle(model.entry.name, model.version)
    with span(state.tracer, "decode request"):
        body = await request.body()
        header_length = request.headers.get(HEADER_LENGTH)
        if len(body) > INLINE_BODY_BYTES:
            decoded = await run_in_threadpool(decode_request, body, header_length)
        else:
            decoded = decode_request(body, header_length)
    outputs, parameters = await infer(model, decoded, handle, state.settings, state.metrics)
    encode = (model.name, model.version, decoded.id, parameters, outputs)
    with span(state.tracer, "encode response"):
        if sum(output.array.size for output in outputs) > INLINE_OUTPUT_VALUES:
            content, headers = await run_in_threadpool(encode_response, *encode)
        else:
            content, headers = encode_response(*encode)
    return Response(content, headers=headers)
