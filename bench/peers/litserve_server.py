"""LitServe serving the project's /sample?n=1&digit=D work: `POST /predict {"digit": 7}`.

One API process and one inference worker (LitServe's split: HTTP in one process, the model in
another), batches of up to 64 requests, each drawing its fitted-prior candidates from its own
seed and the batch decoded with the model's digit check, one 28x28 PNG per response. Run with
the peers' venv:
`.venv-peers/bin/python -m bench.peers.litserve_server CHECKPOINT PORT [TIMEOUT_S [THREADS]]`.
"""

# No `from __future__ import annotations`: LitServe builds its FastAPI route from these
# methods' annotations, which must be real objects, not strings.
import secrets
import sys
from pathlib import Path

import litserve as ls
import torch
from fastapi import Response

from bench.peers.work import PeerModel, png

MAX_BATCH_SIZE = 64
MAX_SEED = 2**53 - 1


class SampleAPI(ls.LitAPI):
    def __init__(self, checkpoint: Path, batch_timeout: float, threads: int | None) -> None:
        super().__init__(max_batch_size=MAX_BATCH_SIZE, batch_timeout=batch_timeout)
        self.checkpoint = checkpoint
        self.threads = threads

    def setup(self, device: str) -> None:
        """In the inference worker process: the model, and its torch threads."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        torch.set_grad_enabled(False)
        self.peer = PeerModel.load(self.checkpoint)

    # Unannotated `request`: LitServe then hands over the JSON body as parsed.
    def decode_request(self, request) -> tuple[torch.Tensor, int]:
        digit = int(request.get("digit", 7))
        seed = int(request.get("seed", secrets.randbelow(MAX_SEED + 1)))
        return self.peer.candidates(digit, seed)[0], digit

    def batch(self, inputs: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.stack([candidates for candidates, _ in inputs]),
            torch.tensor([digit for _, digit in inputs]),
        )

    def predict(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.peer.sample(*batch)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, output: torch.Tensor) -> Response:
        return Response(png(output), media_type="image/png")


def main(argv: list[str]) -> None:
    checkpoint, port = Path(argv[0]), int(argv[1])
    batch_timeout = float(argv[2]) if len(argv) > 2 else 0.0
    # Torch threads in the inference worker (default: torch's, one per core).
    threads = int(argv[3]) if len(argv) > 3 else None
    server = ls.LitServer(
        SampleAPI(checkpoint, batch_timeout, threads),
        accelerator="cpu",
        devices=1,
        workers_per_device=1,
    )
    server.run(host="127.0.0.1", port=port, num_api_servers=1, generate_client_file=False)


if __name__ == "__main__":
    main(sys.argv[1:])
