"""Safe checkpoints: model.safetensors (weights, never pickle) + config.json, written atomically."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
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

logger = logging.getLogger(__name__)


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
    """Write the checkpoint (plus extra_files, e.g. metrics.json) into a staging folder beside
    it, then swap it into place, carrying an existing `train_state/` subfolder over. A failure
    at any step restores the old checkpoint; a kill at any step leaves folders from which the
    next load or save recovers the old checkpoint or the new one, each complete with its
    `train_state/` (_swap_into_place). One writer per folder at a time (a lock enforces it)."""
    target = Path(directory)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"{target}: cannot write checkpoint here ({exc.strerror})") from exc
    with _locked(target.parent):
        _finish_interrupted_swap(target)
        try:
            staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), dir=target.parent))
        except OSError as exc:
            raise CheckpointError(
                f"{target}: cannot write checkpoint here ({exc.strerror})"
            ) from exc
        try:
            _write_checkpoint(model, staging, metadata, extra_files)
            _swap_into_place(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def _write_checkpoint(
    model: VAE,
    folder: Path,
    metadata: dict[str, Any] | None,
    extra_files: dict[str, bytes] | None,
) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": FORMAT})
    config = {
        "format": FORMAT,
        "model": model.config.to_dict(),
        **(metadata or {}),
        "versions": library_versions(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "weights_sha256": sha256_of(folder / WEIGHTS_NAME),
    }
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, allow_nan=False) + "\n")
    for name, data in (extra_files or {}).items():
        if Path(name).name != name or name in (CONFIG_NAME, WEIGHTS_NAME, PRESERVED_SUBFOLDER):
            raise ValueError(f"extra file name {name!r} must be a plain, unreserved file name")
        (folder / name).write_bytes(data)
    _make_readable(folder)


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; a checkpoint is read by other users too (a
    service in a container, say), so give it the modes the umask allows a normal folder."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o755 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o644 & ~umask)


# The swap's folders beside the target NAME. Staging folders (also used to delete a folder:
# it is renamed to one first, so a half-deleted folder never keeps a meaningful name) are
# garbage whenever no save runs. `.NAME.new` is always a complete new checkpoint (staging is
# renamed to it only once written) and `.NAME.old` the old one moved aside.
def _staging_prefix(target: Path) -> str:
    return f".{target.name}.staging-"


def _new(target: Path) -> Path:
    return target.with_name(f".{target.name}.new")


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _rename(source: Path, destination: Path) -> None:
    """Every step of the swap that changes what is where: atomic, and patched by the tests
    that fail or kill a save at each step."""
    os.rename(source, destination)


def _remove_tree(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def _discard(folder: Path, target: Path) -> None:
    """Delete a folder of target's swap, first moving it under a staging name: a kill
    mid-delete must not leave a partial folder under a name that recovery would trust."""
    if not folder.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), dir=target.parent))
    _rename(folder, trash / folder.name)
    _remove_tree(trash)


def _move_train_state(source: Path, destination: Path) -> None:
    if (source / PRESERVED_SUBFOLDER).is_dir() and not (destination / PRESERVED_SUBFOLDER).exists():
        _rename(source / PRESERVED_SUBFOLDER, destination / PRESERVED_SUBFOLDER)


def _swap_into_place(staging: Path, target: Path) -> None:
    """Staging (complete) becomes the target, which keeps its train_state/.

    Steps, and what a kill after each leaves (recovered by _finish_interrupted_swap):
      1. staging -> .NAME.new                   old at NAME, complete new beside: finish
      2. NAME/train_state -> .NAME.new/          old (no train_state) and new with it: finish
      3. NAME -> .NAME.old                      no NAME; new with train_state: finish
      4. .NAME.new -> NAME                      the new checkpoint in place; discard the old
      5. .NAME.old deleted (renamed to staging first)
    A step that raises undoes the ones before it (_undo_swap) and the error propagates.
    """
    if not target.exists():
        _rename(staging, target)
        return
    new, old = _new(target), _old(target)
    _rename(staging, new)
    try:
        _move_train_state(target, new)
        _rename(target, old)
        _rename(new, target)
    except BaseException:
        _undo_swap(target)
        raise
    # The new checkpoint is in place: a failure to delete the old one only leaves garbage
    # that the next load or save removes.
    with contextlib.suppress(OSError):
        _discard(old, target)


def _undo_swap(target: Path) -> None:
    """Put the old checkpoint and its train_state/ back after a failed step. Stops at the
    first step that fails too, leaving a state that _finish_interrupted_swap completes."""
    new, old = _new(target), _old(target)
    with contextlib.suppress(OSError):
        if not target.exists():
            _rename(old, target)
        _move_train_state(new, target)
        _discard(new, target)


def _finish_interrupted_swap(target: Path) -> None:
    """Complete a swap that a kill interrupted (see _swap_into_place), then delete staging
    leftovers. The caller holds the lock. A complete `.NAME.new` is rolled forward; otherwise
    `.NAME.old` is rolled back when NAME is missing, or discarded."""
    new, old = _new(target), _old(target)
    if new.is_dir():
        if target.exists():
            _move_train_state(target, new)
            _discard(old, target)
            _rename(target, old)
        _rename(new, target)
        logger.warning("%s: completed a save that was interrupted", target)
    if old.exists():
        if target.exists():
            _discard(old, target)
        else:
            _rename(old, target)
            logger.warning("%s: restored the checkpoint an interrupted save had moved", target)
    prefix = _staging_prefix(target)
    for leftover in target.parent.iterdir():
        if leftover.name.startswith(prefix):
            _remove_tree(leftover)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` (flock on the folder itself): one save, or one recovery,
    at a time among the checkpoints in it. Where the file system has no flock, unlocked."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def swap_in_progress(directory: str | Path) -> bool:
    """Whether a save of `directory` is under way (or was killed): its `.NAME.new` or
    `.NAME.old` lies beside it. A reader that waits until this is false sees a whole save."""
    target = Path(directory)
    return _new(target).exists() or _old(target).exists()


def recover_checkpoint(directory: str | Path) -> Path:
    """Finish or undo a save of `directory` that a kill interrupted, if one did, and return
    the folder that holds the checkpoint: `directory`, or, where its parent cannot be written
    (a read-only mount), the complete folder the interrupted save left beside it."""
    target = Path(directory)
    new, old = _new(target), _old(target)
    if not (new.exists() or old.exists()):
        return target
    try:
        with _locked(target.parent):
            _finish_interrupted_swap(target)
    except OSError as exc:
        found = next((p for p in (target, new, old) if (p / CONFIG_NAME).is_file()), target)
        logger.warning(
            "%s: an interrupted save left folders that cannot be tidied here (%s); reading %s",
            target,
            exc.strerror,
            found,
        )
        return found
    return target


def recover_checkpoints(folder: str | Path) -> None:
    """recover_checkpoint for `folder` and for each checkpoint directly inside it whose save
    was interrupted: a kill may have left such a folder missing, so a search for checkpoints
    would not see it."""
    folder = Path(folder)
    recover_checkpoint(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        for marker in (".new", ".old"):
            name = entry.name.removesuffix(marker)
            if entry.name.startswith(".") and name != entry.name and entry.is_dir():
                recover_checkpoint(folder / name[1:])


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint folder, checked for the fields every checkpoint has."""
    path = recover_checkpoint(directory) / CONFIG_NAME
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
    folder = recover_checkpoint(directory)
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
