"""The Open Inference Protocol's GRPCInferenceService: health, metadata and inference of the same
v2 models (`<model>-<op>`) as the HTTP routes, through the same checks and ModelHandle."""

from __future__ import annotations

import asyncio
from typing import TypeAlias

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from app.errors import NotReady
from app.grpc_api.calls import Gate
from app.grpc_api.tensors import decode_infer_request, infer_response
from app.http.routes.v2 import INLINE_BODY_BYTES, INLINE_OUTPUT_VALUES, SERVER_NAME
from app.http.state import ServiceState
from app.http.v2_models import V2Model, find_model, infer

# The binary tensor data extension is HTTP's: over gRPC every tensor may come raw.
EXTENSIONS = ("parameters",)
Context: TypeAlias = grpc.aio.ServicerContext


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The calls a v2 client makes; the others (model repository, shared memory, statistics,
    streaming) answer UNIMPLEMENTED, as the generated base class does."""

    def __init__(self, state: ServiceState, gate: Gate, server_version: str) -> None:
        self.state = state
        self.gate = gate
        self.server_version = server_version

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        async def answer() -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await self.gate.call("ServerLive", context, answer, operations=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        async def answer() -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=self.state.ready)

        return await self.gate.call("ServerReady", context, answer, operations=True)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        async def answer() -> pb.ModelReadyResponse:
            if not self.state.ready:
                return pb.ModelReadyResponse(ready=False)
            self._model(request.name, request.version)  # NOT_FOUND for an unknown one
            return pb.ModelReadyResponse(ready=True)

        return await self.gate.call("ModelReady", context, answer)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        async def answer() -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(
                name=SERVER_NAME, version=self.server_version, extensions=EXTENSIONS
            )

        return await self.gate.call("ServerMetadata", context, answer)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        async def answer() -> pb.ModelMetadataResponse:
            model = self._model(request.name, request.version)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            assert self.state.repository is not None  # ready
            metadata = model.metadata(self.state.repository.versions(model.entry.name))
            return pb.ModelMetadataResponse(
                name=model.name,
                versions=metadata["versions"],
                platform=metadata["platform"],
                inputs=[tensor(**spec.describe()) for spec in model.inputs],
                outputs=[tensor(**spec.describe()) for spec in model.outputs],
            )

        return await self.gate.call("ModelMetadata", context, answer)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        async def answer() -> pb.ModelInferResponse:
            model = self._model(request.model_name, request.model_version)
            # The handle is taken before anything is awaited (as the HTTP route does): a reload
            # meanwhile retires this version only after its requests have had their time.
            handle = self.state.handle(model.entry.name, model.version)
            # Large typed contents become arrays in a worker thread, off the event loop.
            if request.ByteSize() > INLINE_BODY_BYTES:
                decoded = await asyncio.to_thread(decode_infer_request, request)
            else:
                decoded = decode_infer_request(request)
            state = self.state
            outputs, parameters = await infer(model, decoded, handle, state.settings, state.metrics)
            encode = (model.name, model.version, decoded.id, parameters, outputs)
            if sum(output.array.size for output in outputs) > INLINE_OUTPUT_VALUES:
                return await asyncio.to_thread(infer_response, *encode)
            return infer_response(*encode)

        return await self.gate.call("ModelInfer", context, answer)

    def _model(self, name: str, version: str) -> V2Model:
        """The v2 model a call names at the version it pins ("": the newest loaded)."""
        if not self.state.ready:
            raise NotReady("models are still loading; retry when ServerReady answers ready")
        return find_model(self.state.v2_models, name, version or None, self.state.v2_versions)
