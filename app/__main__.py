"""`python -m app` / `vae-serve`: validate settings and checkpoints, then run uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

import uvicorn
from pydantic import ValidationError

from app.main import create_app
from app.registry import Registry
from app.settings import Settings, SettingsError
from models import CheckpointError
from models.checkpoint import recover_checkpoints

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
    parser.add_argument("--workers", help="VAE_WORKERS: server processes")
    parser.add_argument("--log-level", help="VAE_LOG_LEVEL")
    parser.add_argument(
        "--train-if-missing",
        action="store_true",
        help="when the (first) checkpoint folder holds no checkpoint, train the default "
        "preset into it on the embedded dataset first",
    )
    return parser.parse_args(argv)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _train_default(settings: Settings) -> None:
    target = Path(settings.checkpoints.split(",")[0].strip()).expanduser()
    recover_checkpoints(target)  # a save killed midway may have left the folder missing
    if (target / "config.json").is_file() or (
        target.is_dir() and any((child / "config.json").is_file() for child in target.iterdir())
    ):
        return
    logger.info("no checkpoint in %s: training the default preset into it first", target)
    from training.cli import main as train

    code = train(["--preset", "default", "--out", str(target), "--no-progress"])
    if code:
        raise SettingsError(f"training the default model into {target} failed (exit {code})")


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    overrides = {
        key: value
        for key, value in vars(args).items()
        if value is not None and key != "train_if_missing"
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
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.train_if_missing:
            _train_default(settings)
        registry = Registry.load(settings)
    except (SettingsError, CheckpointError) as exc:
        return _fail(str(exc))
    # uvicorn stops gracefully on SIGTERM, then re-raises it to the handler it found: make
    # that handler exit 0, the status of a requested stop, instead of dying by the signal.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": int(settings.request_timeout_s) + 1,
        # Past this many open connections plus tasks, uvicorn answers 503 by itself: idle or
        # slow clients cannot make the server hold unbounded uploads and tasks.
        "limit_concurrency": settings.max_concurrency,
    }
    if settings.workers == 1:
        uvicorn.run(create_app(settings, registry), **common)  # type: ignore[arg-type]
    else:
        # Each worker loads the (already validated) checkpoints itself.
        uvicorn.run("app.main:create_app", factory=True, workers=settings.workers, **common)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
