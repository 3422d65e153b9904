"""Optional files beside a checkpoint's weights (latent index, fitted prior): read, verified
against the sha256 config.json records, and parsed from safetensors with a format tag."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import Tensor

from models.checkpoint import CheckpointError

T = TypeVar("T")


def read_artifact(path: Path, expected_sha256: str | None, fix: str) -> bytes | None:
    """The file's bytes, None when it does not exist; a CheckpointError that ends with `fix`
    when they do not match the sha256 recorded in config.json."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise CheckpointError(
            f"{path}: sha256 does not match config.json (the file is corrupt or was replaced); "
            + fix
        )
    return data


def load_artifact(
    path: Path, expected_sha256: str | None, fix: str, what: str, parse: Callable[[bytes], T]
) -> T | None:
    """read_artifact, then `parse` of the bytes; None when there is no file, a CheckpointError
    (`<path>: not <what> (...); <fix>`) when it is damaged or `parse` raises ValueError."""
    data = read_artifact(path, expected_sha256, fix)
    if data is None:
        return None
    try:
        return parse(data)
    except ValueError as exc:
        raise CheckpointError(f"{path}: not {what} ({exc}); {fix}") from exc


def parse_artifact(
    data: bytes, expected_format: str, required: set[str]
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the text metadata of safetensors bytes written with `format` =
    expected_format; ValueError says what is wrong."""
    try:
        tensors = load_safetensors(data)
        header_size = int.from_bytes(data[:8], "little")
        if header_size > len(data) - 8:
            raise ValueError("truncated header")
        raw = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
    except (SafetensorError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"not a readable safetensors file ({exc})") from exc
    metadata = {str(k): str(v) for k, v in raw.items()}
    if metadata.get("format") != expected_format:
        raise ValueError(f"format is {metadata.get('format')!r}, expected {expected_format!r}")
    missing = required - set(tensors)
    if missing:
        raise ValueError(f"missing tensor(s) {', '.join(sorted(missing))}")
    return tensors, metadata
