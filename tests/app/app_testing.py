"""Helpers shared by the tests of the HTTP service: uploads, PNG checks, metric lookups, and
`python -m app` as a live subprocess."""

from __future__ import annotations

import base64
import io
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app.service.imaging import encode_png

SIDE = 28
PADDING = 2  # the contract's grid padding (torchvision make_grid layout)
JSON_ACCEPT = {"accept": "application/json"}


def png_of(image: torch.Tensor) -> bytes:
    """A (1, 28, 28) float image in [0, 1] as the 8-bit PNG a client would upload."""
    return encode_png(image)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk (length, type, payload, CRC), for hand-built and deliberately odd PNGs."""
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def files(*blobs: bytes, content_type: str = "image/png") -> list[tuple[str, Any]]:
    """Multipart `file` fields, one per blob, for TestClient's `files=`."""
    return [("file", (f"image{i}.png", blob, content_type)) for i, blob in enumerate(blobs)]


def open_image(data: bytes, fmt: str = "PNG") -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == fmt
    return image


def pixels(data: bytes) -> np.ndarray:
    """An 8-bit grayscale PNG as a (H, W) uint8 array; fails on any other kind of PNG."""
    image = open_image(data)
    assert image.mode == "L"
    return np.asarray(image)


def decode_b64_png(encoded: str) -> np.ndarray:
    """One base64 PNG from a JSON response, checked to be a 28x28 8-bit grayscale image."""
    array = pixels(base64.b64decode(encoded, validate=True))
    assert array.shape == (SIDE, SIDE)
    return array


def post_uploads_together(
    base: str, uploads: Sequence[Sequence[bytes]], headers: Sequence[Mapping[str, str]]
) -> list[int]:
    """POST each set of PNGs to /anomaly-score from its own thread, with its own headers, all
    released at once by a barrier so the server can batch them; the status codes, in order."""
    together = threading.Barrier(len(uploads))

    def send(index: int) -> int:
        fields = [
            ("file", (f"{i}.png", blob, "image/png")) for i, blob in enumerate(uploads[index])
        ]
        together.wait()
        return httpx2.post(
            f"{base}/anomaly-score", files=fields, headers=dict(headers[index]), timeout=30
        ).status_code

    with ThreadPoolExecutor(len(uploads)) as pool:
        return list(pool.map(send, range(len(uploads))))


def grid_size(n: int, nrow: int) -> tuple[int, int]:
    """(width, height) of n tiles in rows of nrow with PADDING px around each tile."""
    columns = min(nrow, n)
    rows = math.ceil(n / columns)
    step = SIDE + PADDING
    return columns * step + PADDING, rows * step + PADDING


def grid_tiles(grid: np.ndarray, n: int, nrow: int) -> list[np.ndarray]:
    """The n 28x28 tiles of a grid, row by row."""
    step = SIDE + PADDING
    tiles = []
    for index in range(n):
        top = PADDING + (index // nrow) * step
        left = PADDING + (index % nrow) * step
        tiles.append(grid[top : top + SIDE, left : left + SIDE])
    return tiles


def padding_mask(grid: np.ndarray, n: int, nrow: int) -> np.ndarray:
    """True where a grid pixel belongs to no tile."""
    mask = np.ones_like(grid, dtype=bool)
    step = SIDE + PADDING
    for index in range(n):
        top = PADDING + (index // nrow) * step
        left = PADDING + (index % nrow) * step
        mask[top : top + SIDE, left : left + SIDE] = False
    return mask


def unit(array: np.ndarray) -> np.ndarray:
    """uint8 pixels -> floats in [0, 1]."""
    return array.astype(np.float64) / 255.0


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((unit(a) - unit(b)) ** 2))


def metrics_text(client: TestClient) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200
    return response.text


def metric(
    client: TestClient, sample_name: str, labels: dict[str, str] | None = None, text: str = ""
) -> float:
    """The value of one sample of /metrics (0.0 when absent: counters start unexported)."""
    wanted = labels or {}
    for family in text_string_to_metric_families(text or metrics_text(client)):
        for sample in family.samples:
            if sample.name == sample_name and all(
                sample.labels.get(k) == v for k, v in wanted.items()
            ):
                return float(sample.value)
    return 0.0


def label_values(text: str, sample_name: str, label: str) -> set[str]:
    """Every value `label` takes among the samples named sample_name."""
    return {
        sample.labels[label]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == sample_name and label in sample.labels
    }


def model_card(client: TestClient, name: str | None = None) -> dict[str, Any]:
    """GET /models' entry for `name` (default: the default model)."""
    body = client.get("/models").json()
    wanted = body["default"] if name is None else name
    (card,) = [m for m in body["models"] if m["name"] == wanted]
    return card


def as_tensors(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (28, 28) arrays -> a (N, 1, 28, 28) float tensor in [0, 1]."""
    return torch.stack([torch.from_numpy(unit(a)).float()[None] for a in images])


# ---- `python -m app` in a subprocess -------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def clean_environment() -> dict[str, str]:
    """This process's environment without VAE_* settings, which would change the server, but
    with one worker process (the default is one per core): these tests stop the server with a
    SIGKILL, which would leave a supervisor's workers behind. The workers have their own test
    (test_server.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAE_")}
    return {**env, "VAE_WORKERS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class LiveApp:
    """A running `python -m app` on a loopback port; its output goes to `log` (a full pipe
    would block it)."""

    base: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path


def start_app(
    log: Path,
    *args: str,
    ready_within_s: float,
    settings: Mapping[str, str] | None = None,
    environment: Mapping[str, str] | None = None,
) -> LiveApp:
    """`python -m app ARGS` on a free loopback port, with VAE_<KEY> from `settings` and no other
    VAE_* variable (plus `environment`, e.g. OTEL_*), once /readyz answers 200; killed again if
    it is not ready in time."""
    port = free_port()
    env = clean_environment()
    env.update({f"VAE_{key.upper()}": value for key, value in (settings or {}).items()})
    env.update(environment or {})
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", *args, "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop_app's SIGKILL takes workers too
        )
    app = LiveApp(f"http://127.0.0.1:{port}", port, process, log)
    deadline = time.monotonic() + ready_within_s
    try:
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "not ready in time: " + log.read_text()
            try:
                if httpx2.get(f"{app.base}/readyz", timeout=2).status_code == 200:
                    return app
            except httpx2.TransportError:
                pass
            time.sleep(0.2)
    except BaseException:
        stop_app(app)
        raise


def stop_app(app: LiveApp, *, graceful: bool = False) -> None:
    """SIGKILL, or with `graceful` SIGTERM first (SIGKILL after 30 s), if still running."""
    if app.process.poll() is not None:
        return
    if graceful:
        app.process.terminate()
        try:
            app.process.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            pass
    os.killpg(app.process.pid, signal.SIGKILL)
    app.process.wait(timeout=30)


def readme_blocks(heading: str) -> dict[str, list[str]]:
    """The fenced blocks of the README's section under `heading` (up to the next ### heading),
    by language, in order."""
    text = (REPO / "README.md").read_text()
    start = text.index(heading)
    section = text[start : text.index("\n### ", start + 1)]
    blocks: dict[str, list[str]] = {}
    for language, block in re.findall(r"```(\w+)\n(.*?)```", section, re.S):
        blocks.setdefault(language, []).append(block)
    return blocks
