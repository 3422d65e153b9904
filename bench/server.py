"""`python -m app` as a subprocess on a free loopback port: start, readiness, RSS, CPU, stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from bench.loadgen import HOST, Connection, Request

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
POLL_INTERVAL_S = 0.01
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class ServerError(RuntimeError):
    """The server under test did not start or died; the message holds its log's tail."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


class Server:
    """One `python -m app` process (and its workers), with VAE_* settings from `env`; or, with
    `command` (its argv for a port), another server of the same checkpoint, ready when
    `ready_path` answers 200 (the peers in bench.peers)."""

    def __init__(
        self,
        checkpoint: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        *,
        command: Callable[[int], list[str]] | None = None,
        ready_path: str = "/readyz",
    ) -> None:
        self.checkpoint = checkpoint
        self.env = dict(env or {})
        self.cwd = cwd  # another checkout's root, to measure its `app` side by side
        self.command = command
        self.ready_path = ready_path
        self.port = 0
        self.startup_s = float("nan")
        self._launched = 0.0
        self._process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="vae-bench-server-", suffix=".log")  # noqa: SIM115

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        if self._process is None:
            raise ServerError("the server is not running")
        return self._process.pid

    def start(self) -> float:
        """Start the server and wait until /readyz answers 200; returns the seconds that took."""
        self.launch()
        return self.wait_ready()

    def launch(self) -> None:
        """Start the process without waiting for it (several servers can start at once)."""
        self.port = free_port()
        env = {
            **os.environ,
            "VAE_LOG_LEVEL": "warning",
            **self.env,
            "VAE_HOST": HOST,
            "VAE_PORT": str(self.port),
            "VAE_CHECKPOINTS": str(self.checkpoint.resolve()),
        }
        self._launched = time.perf_counter()
        argv = [sys.executable, "-m", "app"] if self.command is None else self.command(self.port)
        self._process = subprocess.Popen(
            argv,
            env=env,
            cwd=self.cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self) -> float:
        """Block until /readyz answers 200; returns the seconds since launch()."""
        self.startup_s = self._wait_ready(self._launched)
        return self.startup_s

    def _wait_ready(self, started: float) -> float:
        import asyncio

        probe = Request("GET", self.ready_path).encode(self.port)

        async def ready() -> bool:
            connection = Connection(self.port)
            try:
                return await connection.send(probe) == 200
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                return False
            finally:
                await connection.close()

        while time.perf_counter() - started < READY_TIMEOUT_S:
            assert self._process is not None
            if self._process.poll() is not None:
                raise ServerError(
                    f"the server exited with {self._process.returncode} before it was ready:\n"
                    + self.log_tail()
                )
            if asyncio.run(ready()):
                return time.perf_counter() - started
            time.sleep(POLL_INTERVAL_S)
        raise ServerError(f"the server was not ready in {READY_TIMEOUT_S:g} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        text = Path(self._log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _tree(self) -> list[int]:
        """The server's pid and its descendants' (uvicorn's workers)."""
        found, frontier = [self.pid], [self.pid]
        while frontier:
            pid = frontier.pop()
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    children = (task / "children").read_text().split()
                except OSError:
                    continue
                for child in map(int, children):
                    found.append(child)
                    frontier.append(child)
        return found

    def rss_bytes(self) -> int:
        """Resident memory of the server and its workers together."""
        total = 0
        for pid in self._tree():
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_BYTES
            except (OSError, IndexError, ValueError):
                continue
        return total

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by the server and its workers."""
        total = 0
        for pid in self._tree():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
        return total / _CLOCK_TICKS

    def pause(self) -> None:
        """SIGSTOP the server's process group (a peer that busy-polls while idle)."""
        os.killpg(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)

    def terminate(self) -> None:
        """Ask the server to stop (SIGTERM, graceful) without waiting; stop() waits."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)

    def stop(self) -> int | None:
        """SIGTERM (graceful), then SIGKILL after STOP_TIMEOUT_S; returns the exit status."""
        process, self._process = self._process, None
        if process is None:
            self._log.close()  # never started (or already stopped)
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # Whatever it left behind in its process group (LitServe's API and inference
        # processes outlive their parent's SIGTERM) goes with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        self._log.close()
        return process.returncode
