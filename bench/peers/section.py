"""The `peers` section of `python -m bench`: the project beside LitServe and Triton on the same
checkpoint, the same work and the same cores, rounds interleaved.

The peers run from their own venv (`make peers`: `.venv-peers`, made by the system Python,
whose libpython PyTriton's backend stub links); without it the section says how to make it and
is skipped. LitServe with `batch_timeout=0` busy-polls a core while idle, so it is paused
(SIGSTOP) whenever another server is measured, and resumed (SIGCONT) for its own rounds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadgen import LoadResult, Request
from bench.server import Server, free_port
from bench.serving import Case, Scale, _probe, merge, run_closed

REPO_DIR = Path(__file__).resolve().parents[2]
PEERS_VENV = Path(os.environ.get("VAE_BENCH_PEERS_VENV", REPO_DIR / ".venv-peers"))
BINARY_HEADER = "Inference-Header-Content-Length"
# Each peer's model runs with the torch threads each of the project's workers gets by default
# (one per worker, a worker per core): with more, OpenMP's spinning threads would fight the
# HTTP processes for the same cores.
PEER_TORCH_THREADS = "1"
LITSERVE_BATCH_TIMEOUT_S = 0.0  # as a new user would leave it; the idle server is paused
JSON_TYPE = "application/json"
# The goals of issue 18: the project's throughput over the peer's, per case.
GOALS = {
    "sample_c32": ("litserve", 2.0),
    "anomaly_json_c8": ("triton", 1.5),
    "anomaly_binary_c8": ("triton", 1.5),
    "decode_json_c32": ("triton", 1.5),
    "decode_binary_c32": ("triton", 1.5),
}


@dataclass(frozen=True)
class PeerCase:
    """One piece of work as the project and as its peer are asked for it."""

    name: str
    what: str
    peer: str  # litserve or triton
    concurrency: int
    project: Request
    peer_request: Request


def peers_python() -> Path | None:
    python = PEERS_VENV / "bin" / "python"
    return python if python.is_file() else None


def _v2_request(
    path: str, tensors: list[tuple[str, str, list[int], np.ndarray]], binary: bool
) -> Request:
    """A v2 inference request of `tensors` (name, datatype, shape, values), all outputs in
    JSON, or inputs and outputs in binary (the binary tensor data extension)."""
    inputs: list[dict[str, Any]] = []
    for name, datatype, shape, values in tensors:
        item: dict[str, Any] = {"name": name, "shape": shape, "datatype": datatype}
        if binary:
            item["parameters"] = {"binary_data_size": values.nbytes}
        else:
            item["data"] = values.reshape(-1).tolist()
        inputs.append(item)
    document: dict[str, Any] = {"inputs": inputs}
    if binary:
        document["parameters"] = {"binary_data_output": True}
    head = json.dumps(document, separators=(",", ":")).encode()
    if not binary:
        return Request("POST", path, head, JSON_TYPE)
    body = head + b"".join(values.tobytes() for *_, values in tensors)
    return Request(
        "POST",
        path,
        body,
        "application/octet-stream",
        headers=((BINARY_HEADER, str(len(head))),),
    )


def build_cases(model: str, image: np.ndarray, latent: np.ndarray) -> list[PeerCase]:
    """The goals' cases: one 28x28 image (floats in [0, 1]) to -anomaly, one latent (L,) of a 7
    to -decode, and /sample?n=1&digit=7 (LitServe: POST /predict {"digit": 7})."""
    image = image.astype(np.float32).reshape(1, 28, 28)
    z = latent.astype(np.float32).reshape(1, -1)
    seven = np.array([7], dtype=np.int64)
    cases = [
        PeerCase(
            "sample_c32",
            "/sample?n=1&digit=7, one PNG",
            "litserve",
            32,
            Request("POST", "/sample?n=1&digit=7"),
            Request("POST", "/predict", b'{"digit": 7}', JSON_TYPE),
        )
    ]
    for binary in (False, True):
        encoding = "binary" if binary else "json"
        anomaly = [("images", "FP32", [1, 28, 28], image)]
        path = f"/v2/models/{model}-anomaly/infer"
        cases.append(
            PeerCase(
                f"anomaly_{encoding}_c8",
                f"v2 -anomaly, one image, {encoding.upper()}",
                "triton",
                8,
                _v2_request(path, anomaly, binary),
                _v2_request(path, anomaly, binary),
            )
        )
        path = f"/v2/models/{model}-decode/infer"
        latent_tensor = ("z", "FP32", [1, z.shape[1]], z)
        cases.append(
            PeerCase(
                f"decode_{encoding}_c32",
                f"v2 -decode, one latent, {encoding.upper()}",
                "triton",
                32,
                _v2_request(path, [latent_tensor, ("digit", "INT64", [1], seven)], binary),
                # Triton's batched shapes: one digit per row is [rows, 1].
                _v2_request(path, [latent_tensor, ("digit", "INT64", [1, 1], seven)], binary),
            )
        )
    return cases


def _litserve(python: Path, checkpoint: Path) -> Server:
    def command(port: int) -> list[str]:
        return [
            *(str(python), "-m", "bench.peers.litserve_server", str(checkpoint), str(port)),
            *(str(LITSERVE_BATCH_TIMEOUT_S), PEER_TORCH_THREADS),
        ]

    return Server(checkpoint, cwd=REPO_DIR, command=command, ready_path="/health")


def _triton(python: Path, checkpoint: Path) -> Server:
    def command(port: int) -> list[str]:
        ports = [str(port), str(free_port()), str(free_port())]
        return [
            *(str(python), "-m", "bench.peers.triton_server", str(checkpoint)),
            *(*ports, PEER_TORCH_THREADS),
        ]

    model = checkpoint.resolve().name
    return Server(
        checkpoint, cwd=REPO_DIR, command=command, ready_path=f"/v2/models/{model}-decode/ready"
    )


def peers(
    project: Server,
    checkpoint: Path,
    inputs: tuple[np.ndarray, np.ndarray],
    scale: Scale,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Each case on the project and on its peer, rounds interleaved; ratios project / peer."""
    python = peers_python()
    if python is None:
        reason = (
            f"no peers venv at {PEERS_VENV}: make peers (or pip install litserve nvidia-pytriton)"
        )
        log(f"peers skipped: {reason}")
        return {"skipped": reason}
    cases = build_cases(checkpoint.resolve().name, *inputs)
    servers = {"litserve": _litserve(python, checkpoint), "triton": _triton(python, checkpoint)}
    try:
        for server in servers.values():
            server.launch()
        for name, server in servers.items():
            server.wait_ready()
            log(f"peers: {name} ready in {server.startup_s:.1f} s")
        litserve = servers["litserve"]
        litserve.pause()
        for case in cases:
            for side, server in (("project", project), (case.peer, servers[case.peer])):
                request = case.project if side == "project" else case.peer_request
                if server is litserve:
                    litserve.resume()
                problem = _probe(server, Case(case.name, case.what, [request], 1))
                if server is litserve:
                    litserve.pause()
                if problem is not None:
                    raise RuntimeError(f"{side} cannot serve {case.name}: {problem}")
        rounds: dict[str, list[LoadResult]] = {}
        for index in range(scale.rounds):
            for case in cases:
                for side, server in (("project", project), (case.peer, servers[case.peer])):
                    request = case.project if side == "project" else case.peer_request
                    if server is litserve:
                        litserve.resume()
                    try:
                        result = run_closed(
                            server,
                            Case(case.name, case.what, [request], case.concurrency),
                            duration_s=scale.duration_s,
                            max_requests=scale.max_requests,
                            warmup_s=scale.warmup_s,
                        )
                    finally:
                        if server is litserve:
                            litserve.pause()
                    rounds.setdefault(f"{case.name}/{side}", []).append(result)
                    summary = result.summary()
                    log(
                        f"  round {index + 1}/{scale.rounds} {case.name:<20} {side:<9} "
                        f"{summary['req_s']:8.1f} req/s  p50 {summary['p50_ms']:6.2f} ms  "
                        f"p99 {summary['p99_ms']:6.2f} ms  errors {summary['errors']}"
                    )
        litserve.resume()
    finally:
        for server in servers.values():
            if server._process is not None:
                server.resume()
                server.terminate()
        for server in servers.values():
            server.stop()
    out: dict[str, Any] = {
        "litserve_batch_timeout_s": LITSERVE_BATCH_TIMEOUT_S,
        "peer_torch_threads": int(PEER_TORCH_THREADS),
        "idle_litserve": "paused (SIGSTOP) while the others are measured",
        "cases": {},
    }
    for case in cases:
        mine = merge(rounds[f"{case.name}/project"]).summary()
        theirs = merge(rounds[f"{case.name}/{case.peer}"]).summary()
        out["cases"][case.name] = {
            "what": case.what,
            "peer": case.peer,
            "concurrency": case.concurrency,
            "project": mine,
            "peer_result": theirs,
            "ratio": mine["req_s"] / theirs["req_s"] if theirs["req_s"] else None,
            "goal": GOALS[case.name][1],
        }
    return out
