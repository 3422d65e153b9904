"""NVIDIA Triton Inference Server (the `tritonserver` inside the nvidia-pytriton wheel) serving
the project's v2 `-anomaly` and `-decode` work through PyTriton's Python backend.

Models `default-anomaly` (images FP32 [-1, 28, 28] -> score, is_anomaly, digit,
digit_probability, percentile, each [-1, 1]) and `default-decode` (z FP32 [-1, L], digit
INT64 [-1, 1] -> images), each with Triton's dynamic batcher, max batch 64, no queue delay,
the model's own `anomaly_score` and `decode` per batch. Run with the peers' venv (made by the
system Python, whose libpython the backend stub links):
`.venv-peers/bin/python -m bench.peers.triton_server CHECKPOINT HTTP_PORT GRPC_PORT METRICS_PORT
[TORCH_THREADS]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from bench.peers.work import PeerModel

MAX_BATCH_SIZE = 64


def main(argv: list[str]) -> None:
    checkpoint = Path(argv[0])
    http_port, grpc_port, metrics_port = (int(port) for port in argv[1:4])
    if len(argv) > 4:  # torch threads of the model (PyTriton runs it in this process)
        torch.set_num_threads(int(argv[4]))
    torch.set_grad_enabled(False)
    peer = PeerModel.load(checkpoint)
    latent_dim = peer.model.config.latent_dim
    name = checkpoint.resolve().name

    @batch
    def anomaly(images: np.ndarray) -> dict[str, np.ndarray]:
        # Per row, each output is one value: [B, 1], as Triton's batched shapes have it.
        return {key: value[:, None] for key, value in peer.anomaly(images).items()}

    @batch
    def decode(z: np.ndarray, digit: np.ndarray) -> dict[str, np.ndarray]:
        return {"images": peer.decode(z, digit[:, 0])}

    config = ModelConfig(
        max_batch_size=MAX_BATCH_SIZE, batcher=DynamicBatcher(max_queue_delay_microseconds=0)
    )
    triton_config = TritonConfig(
        http_address="127.0.0.1",
        http_port=http_port,
        grpc_address="127.0.0.1",
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        allow_metrics=False,
        log_verbose=0,
    )
    with Triton(config=triton_config) as triton:
        triton.bind(
            model_name=f"{name}-anomaly",
            infer_func=anomaly,
            inputs=[Tensor(name="images", dtype=np.float32, shape=(28, 28))],
            outputs=[
                Tensor(name="score", dtype=np.float32, shape=(1,)),
                Tensor(name="is_anomaly", dtype=np.bool_, shape=(1,)),
                Tensor(name="digit", dtype=np.int64, shape=(1,)),
                Tensor(name="digit_probability", dtype=np.float32, shape=(1,)),
                Tensor(name="percentile", dtype=np.float32, shape=(1,)),
            ],
            config=config,
            strict=False,
        )
        triton.bind(
            model_name=f"{name}-decode",
            infer_func=decode,
            inputs=[
                Tensor(name="z", dtype=np.float32, shape=(latent_dim,)),
                Tensor(name="digit", dtype=np.int64, shape=(1,)),
            ],
            outputs=[Tensor(name="images", dtype=np.float32, shape=(28, 28))],
            config=config,
            strict=False,
        )
        triton.serve()


if __name__ == "__main__":
    main(sys.argv[1:])
