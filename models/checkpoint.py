"""Safe checkpoints: model.safetensors (weights, never pickle) + config.json, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.config import VAEConfig
from models.vae import VAE

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "vae-serve/1"
# A subfolder that survives re-saving a checkpoint: the trainer keeps its resume state there.
PRESERVED_SUBFOLDER = "train_state"


class CheckpointError(Exception):
    """A checkpoint folder that cannot be written or loaded; the message names the file."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode, on its device), config.json, its folder."""

    model: VAE
    metadata: dict[str, Any]
    path: Path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    import safetensors

    return {"torch": torch.__version__, "safetensors": safetensors.__version__}


def save_checkpoint(
    model: VAE,
    directory: str | Path,
    metadata: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write the checkpoint (plus extra_files, e.g. metrics.json) into a temporary sibling folder,
    then swap it into place, so a crash leaves either the old checkpoint or the new one, never
    half of one. An existing `train_state/` subfolder is carried over."""
    target = Path(directory)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise CheckpointError(f"{target}: cannot write checkpoint here ({exc.strerror})") from exc
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_NAME), metadata={"format": FORMAT})
        config = {
            "format": FORMAT,
            "model": model.config.to_dict(),
            **(metadata or {}),
            "versions": library_versions(),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "weights_sha256": sha256_of(staging / WEIGHTS_NAME),
        }
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, allow_nan=False) + "\n")
        for name, data in (extra_files or {}).items():
            if Path(name).name != name or name in (CONFIG_NAME, WEIGHTS_NAME, PRESERVED_SUBFOLDER):
                raise ValueError(f"extra file name {name!r} must be a plain, unreserved file name")
            (staging / name).write_bytes(data)
        _make_readable(staging)
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; a checkpoint is read by other users too (a
    service in a container, say), so give it the modes the umask allows a normal folder."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o755 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o644 & ~umask)


def _swap_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    if (target / PRESERVED_SUBFOLDER).is_dir():
        os.replace(target / PRESERVED_SUBFOLDER, staging / PRESERVED_SUBFOLDER)
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, retired / target.name)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint folder, checked for the fields every checkpoint has."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; a checkpoint folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(train one with `python -m training`)"
        )
    try:
        metadata = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(metadata, dict) or not isinstance(metadata.get("model"), dict):
        raise CheckpointError(f"{path}: has no 'model' section with the VAEConfig")
    return metadata


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from config.json, verify and load the weights, move it to device."""
    folder = Path(directory)
    metadata = read_metadata(folder)
    config_path = folder / CONFIG_NAME
    try:
        config = VAEConfig.from_dict(metadata["model"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: invalid model config ({exc})") from exc
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing")
    expected = metadata.get("weights_sha256")
    if expected is not None and sha256_of(weights_path) != expected:
        raise CheckpointError(
            f"{weights_path}: sha256 does not match config.json (the file is corrupt or was "
            "replaced); retrain or restore the checkpoint"
        )
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({exc})") from exc
    model = VAE(config)
    expected_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found_shapes = {k: tuple(v.shape) for k, v in state.items()}
    if expected_shapes != found_shapes:
        missing = sorted(set(expected_shapes) - set(found_shapes))
        extra = sorted(set(found_shapes) - set(expected_shapes))
        wrong = sorted(
            f"{k}: config expects {expected_shapes[k]}, file has {found_shapes[k]}"
            for k in set(expected_shapes) & set(found_shapes)
            if expected_shapes[k] != found_shapes[k]
        )
        problems = "; ".join(
            [
                *(f"missing {k}" for k in missing[:3]),
                *(f"unexpected {k}" for k in extra[:3]),
                *wrong[:3],
            ]
        )
        raise CheckpointError(f"{weights_path}: weights do not match {config_path} ({problems})")
    model.load_state_dict(state)
    model.to(device).eval()
    return Checkpoint(model=model, metadata=metadata, path=folder)
