"""VAE models for 28 x 28 digits: pure torch, importing this does no I/O."""

from models.checkpoint import Checkpoint, CheckpointError, load_checkpoint, read_metadata
from models.config import VAEConfig
from models.distributions import DiagonalGaussian
from models.vae import (
    ANOMALY_SCORE_KIND,
    ANOMALY_STATISTICS,
    VAE,
    AnomalyNotCalibratedError,
    AnomalyResult,
    DigitPrediction,
    Samples,
    VAEOutput,
)

__all__ = [
    "ANOMALY_SCORE_KIND",
    "ANOMALY_STATISTICS",
    "VAE",
    "AnomalyNotCalibratedError",
    "AnomalyResult",
    "Checkpoint",
    "CheckpointError",
    "DiagonalGaussian",
    "DigitPrediction",
    "Samples",
    "VAEConfig",
    "VAEOutput",
    "load_checkpoint",
    "read_metadata",
]
