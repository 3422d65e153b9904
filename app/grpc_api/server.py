"""The gRPC server of one worker process: started and stopped in the app's lifespan, on the event
loop uvicorn runs, so it shares the worker's models, batchers, limits and metrics."""

from __future__ import annotations

import logging

import grpc
from tritonclient.grpc import service_pb2_grpc

from app.grpc_api.calls import Gate
from app.grpc_api.servicer import InferenceServicer
from app.http.state import ServiceState

logger = logging.getLogger("app.grpc")


async def start_grpc_server(
    state: ServiceState, gate: Gate, *, port: int, server_version: str
) -> grpc.aio.Server:
    """Listen on VAE_HOST:`port`. With several worker processes each binds the port with
    SO_REUSEPORT and the kernel spreads connections over them; with one, a port already in use
    stops the startup instead of being shared silently."""
    settings = state.settings
    server = grpc.aio.server(
        options=[
            # The same cap as a v2 body over HTTP; gRPC refuses a larger message itself, with
            # RESOURCE_EXHAUSTED, before it is read into a request.
            ("grpc.max_receive_message_length", settings.max_json_bytes),
            ("grpc.so_reuseport", int(settings.worker_count > 1)),
        ]
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(state, gate, server_version), server
    )
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    address = f"{host}:{port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError:
        raise RuntimeError(
            f"VAE_GRPC_PORT: cannot listen on {address} (is the port in use?); pick another port"
        ) from None
    await server.start()
    logger.info("gRPC: the Open Inference Protocol on %s", address)
    return server
