"""An HTTP/1.1 load generator on raw asyncio streams: closed loop or constant rate, bounded.

Raw keep-alive sockets instead of an HTTP client library: the generator shares the machine's
cores with the server it measures, so every microsecond it spends per request is taken from
the server. Each result reports the client's own CPU time per request, so that share is shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"  # loopback only: the generator never sends traffic anywhere else
CONNECT_TIMEOUT_S = 5.0
RESPONSE_TIMEOUT_S = 60.0
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
FAILURE_BACKOFF_S = 0.01
# A constant-rate run drains what it sent for at most this long after its last request is due.
DRAIN_TIMEOUT_S = 30.0


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 this parser understands."""


@dataclass(frozen=True)
class Request:
    """One kind of request, encoded once; `images` counts the images in each answer."""

    method: str
    target: str  # path and query string
    body: bytes = b""
    content_type: str | None = None
    images: int = 1
    accept: str | None = None
    headers: tuple[tuple[str, str], ...] = ()  # any others, e.g. the v2 binary header's length

    def encode(self, port: int) -> bytes:
        lines = [
            f"{self.method} {self.target} HTTP/1.1",
            f"Host: {HOST}:{port}",
            "User-Agent: vae-bench",
            f"Content-Length: {len(self.body)}",
        ]
        if self.content_type:
            lines.append(f"Content-Type: {self.content_type}")
        if self.accept:
            lines.append(f"Accept: {self.accept}")
        lines.extend(f"{name}: {value}" for name, value in self.headers)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def multipart(files: list[bytes], field_name: str = "file") -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data upload of `files` as PNGs."""
    boundary = "vae-bench-boundary-7d3f9a"
    parts = []
    for index, data in enumerate(files):
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{field_name}"; filename="{index}.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        parts.append(head + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class Connection:
    """One keep-alive HTTP/1.1 connection to the server on loopback."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, self.port), CONNECT_TIMEOUT_S
        )

    async def send(self, raw: bytes) -> int:
        """Send one encoded request and read its whole answer; returns the status code."""
        if self._writer is None:
            await self._connect()
        assert self._reader is not None and self._writer is not None
        try:
            self._writer.write(raw)
            status, keep_alive = await asyncio.wait_for(
                _read_response(self._reader), RESPONSE_TIMEOUT_S
            )
        except BaseException:
            await self.close()
            raise
        if not keep_alive:
            await self.close()
        return status

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ProtocolError(f"bad status line {status_line!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    keep_alive = headers.get("connection", "").lower() != "close"
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                break
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if length > MAX_RESPONSE_BYTES:
            raise ProtocolError(f"response of {length} bytes is over the generator's limit")
        await reader.readexactly(length)
    elif status not in (204, 304):
        raise ProtocolError("response without Content-Length or chunked encoding")
    return status, keep_alive


@dataclass
class LoadResult:
    """What one load run measured; latencies are per completed request, in seconds."""

    mode: str
    concurrency: int
    rate: float | None
    seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: int = 0  # connection errors and timeouts: no status at all
    images: int = 0
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = None

    @property
    def requests(self) -> int:
        return len(self.latencies)

    def record(self, latency_s: float, status: int | None, images: int) -> None:
        """One answered request (`status` None: the connection failed before an answer)."""
        self.latencies.append(latency_s)
        if status is None:
            self.failures += 1
            return
        self.statuses[status] += 1
        if status < 300:
            self.images += images

    @property
    def errors(self) -> int:
        return self.failures + sum(n for status, n in self.statuses.items() if status >= 300)

    @property
    def server_errors(self) -> int:
        return self.failures + sum(n for status, n in self.statuses.items() if status >= 500)

    def summary(self) -> dict[str, Any]:
        """The numbers a report shows (latencies in milliseconds)."""
        completed = max(self.requests, 1)
        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "seconds": round(self.seconds, 3),
            "requests": self.requests,
            "errors": self.errors,
            "server_errors": self.server_errors,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "req_s": self.requests / self.seconds if self.seconds > 0 else 0.0,
            "images_s": self.images / self.seconds if self.seconds > 0 else 0.0,
            "p50_ms": percentile(self.latencies, 50) * 1e3,
            "p90_ms": percentile(self.latencies, 90) * 1e3,
            "p99_ms": percentile(self.latencies, 99) * 1e3,
            "mean_ms": (sum(self.latencies) / completed) * 1e3,
            "client_cpu_us_per_req": self.client_cpu_s / completed * 1e6,
            "server_cpu_us_per_req": (
                None if self.server_cpu_s is None else self.server_cpu_s / completed * 1e6
            ),
        }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile by linear interpolation (NaN for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def _send(connection: Connection, raw: bytes) -> int | None:
    """The answer's status, or None when the connection failed before a whole answer."""
    try:
        return await connection.send(raw)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ProtocolError):
        return None


async def closed_loop(
    port: int,
    requests: list[Request],
    *,
    concurrency: int,
    duration_s: float,
    max_requests: int,
    warmup_s: float = 0.0,
) -> LoadResult:
    """`concurrency` connections, each sending its next request as soon as the last is answered,
    until `duration_s` has passed or `max_requests` were sent. `requests` are used in turn (a mix).

    A warm-up of `warmup_s` runs first on the same connections and is not counted.
    """
    encoded = [(r.encode(port), r.images) for r in requests]
    connections = [Connection(port) for _ in range(concurrency)]
    result = LoadResult("closed", concurrency, None, 0.0)
    issued = 0
    recording = False
    deadline = 0.0

    async def worker(connection: Connection, offset: int) -> None:
        nonlocal issued
        turn = offset
        while True:
            now = time.perf_counter()
            if now >= deadline or (recording and issued >= max_requests):
                return
            if recording:
                issued += 1
            raw, images = encoded[turn % len(encoded)]
            turn += 1
            started = time.perf_counter()
            status = await _send(connection, raw)
            if recording:
                result.record(time.perf_counter() - started, status, images)
            if status is None:
                await asyncio.sleep(FAILURE_BACKOFF_S)  # a dead server must not spin the loop

    try:
        if warmup_s > 0:
            deadline = time.perf_counter() + warmup_s
            await asyncio.gather(*(worker(c, i) for i, c in enumerate(connections)))
        recording = True
        cpu_start, started = time.process_time(), time.perf_counter()
        deadline = started + duration_s
        await asyncio.gather(*(worker(c, i) for i, c in enumerate(connections)))
        result.seconds = time.perf_counter() - started
        result.client_cpu_s = time.process_time() - cpu_start
    finally:
        for connection in connections:
            await connection.close()
    return result


async def constant_rate(
    port: int,
    requests: list[Request],
    *,
    rate: float,
    duration_s: float,
    max_requests: int,
    max_connections: int = 64,
) -> LoadResult:
    """Open loop: request i is due at start + i / rate whatever the answers do, on up to
    `max_connections` connections. Latency counts from the due time, so time spent waiting for
    a free connection is included (no coordinated omission)."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    encoded = [(r.encode(port), r.images) for r in requests]
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(max_connections):
        idle.put_nowait(Connection(port))
    result = LoadResult("rate", max_connections, rate, 0.0)
    total = min(max_requests, max(1, int(rate * duration_s)))

    async def one(due: float, raw: bytes, images: int) -> None:
        connection = await idle.get()
        try:
            status = await _send(connection, raw)
        finally:
            idle.put_nowait(connection)
        result.record(time.perf_counter() - due, status, images)

    cpu_start, started = time.process_time(), time.perf_counter()
    tasks = []
    try:
        for index in range(total):
            due = started + index / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            raw, images = encoded[index % len(encoded)]
            tasks.append(asyncio.ensure_future(one(due, raw, images)))
        await asyncio.wait_for(asyncio.gather(*tasks), DRAIN_TIMEOUT_S)
        result.seconds = time.perf_counter() - started
        result.client_cpu_s = time.process_time() - cpu_start
    finally:
        for task in tasks:
            task.cancel()
        while not idle.empty():
            await idle.get_nowait().close()
    return result
