"""`python -m app` / `vae-serve`: validate settings and checkpoints, then run uvicorn."""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import uvicorn
from pydantic import ValidationError

from app.http.request_context import log_config
from app.main import create_app
from app.metrics import MULTIPROC_ENV
from app.service.registry import Registry, resolve_device
from app.settings import Settings, SettingsError
from app.tracing import TracingError, exporter_names, exporters
from models import CheckpointError
from models.checkpoint import recover_checkpoints
from training.presets import PRESETS

logger = logging.getLogger("app")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Serve VAE checkpoints over HTTP. Every option can also be set with "
        "VAE_* environment variables; flags win.",
    )
    parser.add_argument("--checkpoints", help="VAE_CHECKPOINTS: checkpoint folder(s)")
    parser.add_argument("--device", help="VAE_DEVICE: auto, cpu, cuda or cuda:N")
    parser.add_argument("--host", help="VAE_HOST")
    parser.add_argument("--port", help="VAE_PORT")
    parser.add_argument(
        "--workers", help="VAE_WORKERS: server processes (default: one per usable core)"
    )
    parser.add_argument("--log-level", help="VAE_LOG_LEVEL")
    parser.add_argument(
        "--train-if-missing",
        action="store_true",
        help="when the (first) checkpoint folder holds no checkpoint, train a preset into it "
        "first, on VAE_DEVICE; SIGTERM meanwhile stops the training cleanly",
    )
    parser.add_argument(
        "--train-preset",
        default="default",
        choices=sorted(PRESETS),
        help="the preset --train-if-missing trains (default: default; tiny takes seconds)",
    )
    return parser.parse_args(argv)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


class TrainingStopped(BaseException):
    """SIGTERM arrived during first-start training. A BaseException, like KeyboardInterrupt, so
    that no `except Exception` on the way swallows it, while every cleanup (a checkpoint save
    in progress is undone) still runs."""


def _stop_training(signum: int, frame: FrameType | None) -> None:
    # Once: a second SIGTERM must not interrupt the cleanup of the first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise TrainingStopped


def _train_if_missing(settings: Settings, preset: str) -> None:
    """Train `preset` into the first checkpoint folder unless it (or a subfolder) holds a
    checkpoint. SIGTERM meanwhile raises TrainingStopped in the training."""
    target = Path(settings.checkpoints.split(",")[0].strip()).expanduser()
    recover_checkpoints(target)  # a save killed midway may have left the folder missing
    if (target / "config.json").is_file() or (
        target.is_dir()
        and any(
            (child / "config.json").is_file() and not child.name.startswith(".")
            for child in target.iterdir()
        )
    ):
        return
    device = resolve_device(settings.device)  # a device that cannot serve fails before training
    logger.info(
        "no checkpoint in %s: training the %s preset into it first, on %s", target, preset, device
    )
    from training.cli import main as train

    # The first start is what a new user waits for: skip the judge and CAS classifiers (about a
    # minute on 2 CPU cores) and take a 1-sample IWAE; config.json records both, and
    # `python -m training.evaluate DIR --sample-quality --iwae-k 100` measures them afterwards.
    argv = [
        "--preset",
        preset,
        "--out",
        str(target),
        "--device",
        str(device),
        "--no-sample-quality",
        "--iwae-k",
        "1",
    ]
    previous = signal.signal(signal.SIGTERM, _stop_training)
    try:
        code = train([*argv, "--no-progress"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code:
        raise SettingsError(f"training the {preset} model into {target} failed (exit {code})")


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    overrides = {
        key: value
        for key, value in vars(args).items()
        if value is not None and key not in ("train_if_missing", "train_preset")
    }
    # Flags become environment variables so that worker processes see them too.
    for key, value in overrides.items():
        os.environ[f"VAE_{key.upper()}"] = str(value)
    try:
        settings = Settings()
    except ValidationError as exc:
        return _fail(
            "; ".join(
                f"VAE_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
            )
        )
    try:
        exporters()  # each worker builds its own tracer provider: check the OTEL_* ones here
    except TracingError as exc:
        return _fail(str(exc))
    logging_config = log_config(settings.log_level, settings.access_log)
    logging.config.dictConfig(logging_config)
    if exporter_names():
        logger.info(
            "tracing on: spans go to %s (OTEL_TRACES_EXPORTER)", ", ".join(exporter_names())
        )
    try:
        if args.train_if_missing:
            _train_if_missing(settings, args.train_preset)
        registry = Registry.load(settings)
    except (SettingsError, CheckpointError) as exc:
        return _fail(str(exc))
    except TrainingStopped:
        # A requested stop, like SIGTERM while serving: exit 0. Whatever was saved is whole.
        logger.info("SIGTERM: stopped the first-start training; the next start trains again")
        return 0
    # uvicorn stops gracefully on SIGTERM, then re-raises it to the handler it found: make
    # that handler exit 0, the status of a requested stop, instead of dying by the signal.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "log_config": logging_config,
        # VAE_ACCESS_LOG: uvicorn's line (text), the app's JSON line (json) or none.
        "access_log": settings.access_log == "text",
        "timeout_graceful_shutdown": settings.shutdown_drain_s,
        # Named, never uvicorn's "auto" (which picks by what happens to be installed), so one
        # setting runs one server wherever it runs.
        "http": settings.http,
        "loop": "uvloop" if settings.http == "httptools" else "asyncio",
        # No limit_concurrency: the app caps requests in progress itself (VAE_MAX_CONCURRENCY,
        # app.http.middleware.ConcurrencyLimitMiddleware), where its 503s are counted. uvicorn's cap
        # answered before the app, invisibly, and counted idle keep-alive connections too, so
        # enough idle ones made it refuse every request, scrapes and probes included.
    }
    workers = settings.worker_count
    if workers == 1:
        uvicorn.run(create_app(settings, registry), **common)  # type: ignore[arg-type]
        return 0
    # Each worker loads the (already validated) checkpoints itself and writes its metrics where
    # /metrics adds them all up.
    logger.info("serving with %d worker processes", workers)
    del registry  # the workers load their own; this process only supervises them
    with multiprocess_metrics():
        uvicorn.run("app.main:create_app", factory=True, workers=workers, **common)  # type: ignore[arg-type]
    return 0


@contextmanager
def multiprocess_metrics() -> Iterator[None]:
    """PROMETHEUS_MULTIPROC_DIR for the workers: the one given (emptied of a previous run's
    files, as prometheus_client requires), else a temporary folder removed at exit."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink()
        yield
        return
    with tempfile.TemporaryDirectory(prefix="vae-metrics-") as temporary:
        os.environ[MULTIPROC_ENV] = temporary
        try:
            yield
        finally:
            del os.environ[MULTIPROC_ENV]


if __name__ == "__main__":
    sys.exit(main())
