"""Per-epoch checkpoints in <out>/train_state: last/ and best/ weights plus the resume state."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from models import VAE, CheckpointError, load_checkpoint
from models.checkpoint import PRESERVED_SUBFOLDER
from training.config import MODEL_FIELDS, ConfigError, TrainConfig
from training.trainer import Callback, EpochSummary, Trainer

logger = logging.getLogger(__name__)

TRAIN_STATE_DIR = PRESERVED_SUBFOLDER  # survives save_pretrained of the final checkpoint
STATE_FILE = "state.pt"
# Settings that change the run without changing the model: resuming with them changed is allowed
# but no longer reproduces an uninterrupted run, so it is logged.
_RUN_FIELDS_IGNORED_ON_RESUME = ("resume", "progress", "out", "tensorboard", "device", "preset")


def train_state_dir(out_dir: Path) -> Path:
    return out_dir / TRAIN_STATE_DIR


class SideState(Protocol):
    """Trained state beside the model that last/ must hold for an exact resume, e.g. the
    adversarial objective's discriminator and classifier and their optimisers."""

    def state_dict(self) -> dict[str, Any]:
        """Goes into state.pt under SIDE_STATE_KEY; must load with weights_only=True."""
        ...

    def files(self) -> dict[str, bytes]:
        """Extra files written into last/ (e.g. safetensors weights)."""
        ...


SIDE_STATE_KEY = "side_state"


class CheckpointCallback(Callback):
    """After every epoch: best/ (when validation improved), then last/ with state.pt (and the
    files of the side state, if any, e.g. the adversarial run's discriminator and classifier).

    Each folder is written by save_pretrained, which swaps a complete folder into place, so
    last/'s weights and its state.pt are always from the same epoch. best/ goes first: after a
    crash between the two writes, the resumed run repeats that epoch and rewrites the same best.
    """

    def __init__(
        self, model: VAE, out_dir: Path, config: TrainConfig, side_state: SideState | None = None
    ) -> None:
        self.model = model
        self.folder = train_state_dir(out_dir)
        self.config = config
        self.side_state = side_state

    def on_epoch_end(self, trainer: Trainer, summary: EpochSummary) -> None:
        metadata = {
            "training": {
                "config": self.config.to_dict(),
                "epoch": summary.epoch,
                "val_elbo": summary.val_score,
            }
        }
        if summary.improved:
            self.model.save_pretrained(self.folder / "best", metadata)
        state = trainer.state_dict()
        files: dict[str, bytes] = {}
        if self.side_state is not None:
            state[SIDE_STATE_KEY] = self.side_state.state_dict()
            files = self.side_state.files()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.model.save_pretrained(
            self.folder / "last", metadata, extra_files={**files, STATE_FILE: buffer.getvalue()}
        )


@dataclass
class ResumePoint:
    """What `--resume` continues from: last/'s weights and the trainer's state.pt."""

    weights: dict[str, Tensor]
    trainer_state: dict[str, Any]
    epoch: int
    folder: Path | None = None  # last/ itself, for SideState files

    @property
    def side_state(self) -> dict[str, Any] | None:
        state: dict[str, Any] | None = self.trainer_state.get(SIDE_STATE_KEY)
        return state


def load_resume_point(out_dir: Path, config: TrainConfig) -> ResumePoint:
    """Read <out>/train_state/last, refusing a checkpoint of a different model or dataset."""
    last = train_state_dir(out_dir) / "last"
    state_path = last / STATE_FILE
    if not state_path.is_file():
        raise ConfigError(
            f"--resume: nothing to resume, {state_path} does not exist; run without --resume "
            "to start a new run"
        )
    try:
        checkpoint = load_checkpoint(last, "cpu")
    except CheckpointError as exc:
        raise ConfigError(f"--resume: {exc}; run without --resume to start over") from exc
    saved = checkpoint.metadata.get("training", {}).get("config", {})
    wanted = config.to_dict()
    model_changes = [
        f"{name} {saved.get(name)!r} -> {wanted[name]!r}"
        for name in (*MODEL_FIELDS, "dataset", "adversarial")
        if name in saved and saved[name] != wanted[name]
    ]
    if checkpoint.model.config != config.model_config() or model_changes:
        changes = ", ".join(model_changes) or (
            f"model {checkpoint.model.config.to_dict()} -> {config.model_config().to_dict()}"
        )
        raise ConfigError(
            f"--resume: {last} holds a different model or dataset ({changes}); resume with the "
            "original settings, or start a new run in another --out"
        )
    other_changes = [
        f"{name} {saved[name]!r} -> {wanted[name]!r}"
        for name in wanted
        if name in saved
        and saved[name] != wanted[name]
        and name not in _RUN_FIELDS_IGNORED_ON_RESUME
    ]
    if other_changes:
        logger.warning(
            "resuming with changed settings (%s): the result will differ from an uninterrupted run",
            ", ".join(other_changes),
        )
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or foreign files
        raise ConfigError(
            f"--resume: cannot read {state_path} ({type(exc).__name__}); run without --resume "
            "to start over"
        ) from exc
    return ResumePoint(
        weights=checkpoint.model.state_dict(),
        trainer_state=state,
        epoch=int(state["epoch"]),
        folder=last,
    )
