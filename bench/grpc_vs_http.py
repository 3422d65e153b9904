"""`python -m bench.grpc_vs_http CHECKPOINT`: the same v2 `-decode` request over gRPC and over
HTTP with binary tensors, against one server process, closed loop, bounded by a request count.

Both clients send pre-encoded requests and read the answers without decoding them (the HTTP one
on raw keep-alive sockets, bench.loadgen; the gRPC one as bytes over one grpc.aio channel, as
tritonclient uses one), so what differs is the server's side of each protocol. The protocols
alternate over the rounds, so a change in the machine's load hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from bench.loadgen import HOST, LoadResult, Request, closed_loop
from bench.server import Server, free_port

INFER = "/inference.GRPCInferenceService/ModelInfer"


def decode_inputs(checkpoint: Path) -> dict[str, np.ndarray]:
    """One latent (and a digit, for a conditional model): a one-image `-decode` request."""
    model = json.loads((checkpoint / "config.json").read_text())["model"]
    rng = np.random.default_rng(0)
    tensors = {"z": rng.standard_normal((1, model["latent_dim"]), dtype=np.float32)}
    if model["num_classes"]:
        tensors["digit"] = np.array([7], dtype=np.int64)
    return tensors


def http_request(model: str, tensors: dict[str, np.ndarray]) -> Request:
    """The binary tensor data extension: the JSON, then the inputs' bytes; the output in binary."""
    inputs = [
        {
            "name": name,
            "shape": list(array.shape),
            "datatype": "FP32" if array.dtype == np.float32 else "INT64",
            "parameters": {"binary_data_size": array.nbytes},
        }
        for name, array in tensors.items()
    ]
    outputs = [{"name": "images", "parameters": {"binary_data": True}}]
    head = json.dumps({"inputs": inputs, "outputs": outputs}).encode()
    return Request(
        "POST",
        f"/v2/models/{model}/infer",
        body=head + b"".join(array.tobytes() for array in tensors.values()),
        content_type="application/octet-stream",
        headers=(("Inference-Header-Content-Length", str(len(head))),),
    )


def grpc_request(model: str, tensors: dict[str, np.ndarray]) -> bytes:
    """A serialized ModelInferRequest, its inputs in raw_input_contents, as tritonclient sends."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    for name, array in tensors.items():
        datatype = "FP32" if array.dtype == np.float32 else "INT64"
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    request.outputs.add(name="images")
    serialized: bytes = request.SerializeToString()
    return serialized


async def grpc_closed_loop(
    port: int, body: bytes, *, concurrency: int, max_requests: int, warmup: int
) -> LoadResult:
    """`concurrency` calls in flight on one channel, each sending its next when answered."""
    result = LoadResult("closed", concurrency, None, 0.0)
    async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
        call = channel.unary_unary(INFER)  # no serializers: bytes in, bytes out
        for _ in range(warmup):
            await call(body)
        issued = 0

        async def worker() -> None:
            nonlocal issued
            while issued < max_requests:
                issued += 1
                started = time.perf_counter()
                try:
                    await call(body, timeout=60)
                    status: int | None = 200
                except grpc.aio.AioRpcError as exc:
                    status = 500 if exc.code() != grpc.StatusCode.INVALID_ARGUMENT else 400
                result.record(time.perf_counter() - started, status, 1)

        cpu_start, started = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - started
        result.client_cpu_s = time.process_time() - cpu_start
    return result


def run(checkpoint: Path, requests: int, concurrency: int, rounds: int) -> list[dict[str, object]]:
    grpc_port = free_port()
    model = f"{checkpoint.name}-decode"
    tensors = decode_inputs(checkpoint)
    over_http, over_grpc = http_request(model, tensors), grpc_request(model, tensors)
    rows: list[dict[str, object]] = []
    env = {"VAE_GRPC_PORT": str(grpc_port), "VAE_WORKERS": "1", "VAE_DEVICE": "cpu"}
    with Server(checkpoint, env=env) as server:
        for round_number in range(rounds):
            for protocol in ("http", "grpc"):
                cpu = server.cpu_seconds()
                if protocol == "http":
                    result = asyncio.run(
                        closed_loop(
                            server.port,
                            [over_http],
                            concurrency=concurrency,
                            duration_s=3600,
                            max_requests=requests,
                            warmup_s=1.0,
                        )
                    )
                else:
                    result = asyncio.run(
                        grpc_closed_loop(
                            grpc_port,
                            over_grpc,
                            concurrency=concurrency,
                            max_requests=requests,
                            warmup=100,
                        )
                    )
                result.server_cpu_s = server.cpu_seconds() - cpu
                rows.append({"round": round_number + 1, "protocol": protocol, **result.summary()})
    return rows


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| round | protocol | requests | errors | req/s | p50 ms | p99 ms | server CPU us/req "
        "| client CPU us/req |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['round']} | {row['protocol']} | {row['requests']} | {row['errors']} "
            f"| {row['req_s']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} "
            f"| {row['server_cpu_us_per_req']:.0f} | {row['client_cpu_us_per_req']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_vs_http", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint folder; served by its name")
    parser.add_argument("--requests", type=int, default=2000, help="per protocol and round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = run(args.checkpoint, args.requests, args.concurrency, args.rounds)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    sys.stdout.write(table(rows) + "\n")
    return 0 if all(row["errors"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
