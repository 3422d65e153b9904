"""The model calls behind every endpoint, as batchable ops: (model, stacked inputs) -> outputs.

Every input and output tensor has the batch on its first axis and lives on the CPU; the op
moves inputs to the model's device and results back. This is the only module that calls the
model, so batching, device placement and out-of-memory handling live here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from app.errors import InferenceFailed, PayloadTooLarge
from app.service.faults import FAULT_INPUT, inject_fault
from app.service.registry import LoadedModel
from models import VAE
from models.vae import SAMPLE_ROUNDS

logger = logging.getLogger("app.service.inference")
Inputs = dict[str, Tensor]
NO_DIGIT = -1  # in a "digit" input: let the model predict it


def _resolve_digits(model: VAE, x: Tensor, digit: Tensor) -> tuple[Tensor, Tensor]:
    """Digits given per row, NO_DIGIT rows predicted; returns (digits, their probability)."""
    probability = torch.ones(x.shape[0], device=x.device)
    missing = digit == NO_DIGIT
    if bool(missing.any()):
        prediction = model.predict_digit(x[missing])
        digit = digit.clone()
        digit[missing] = prediction.digit
        probability[missing] = prediction.probabilities.gather(1, prediction.digit[:, None])[:, 0]
    return digit, probability


def decode(model: VAE, inputs: Inputs) -> Inputs:
    """z (N, L) [+ labels (N, C) one-hot or blended weights] -> images (N, 1, 28, 28)."""
    return {"images": model.decode(inputs["z"], inputs.get("labels"))}


def sample(model: VAE, inputs: Inputs) -> Inputs:
    """Candidate latents (N, R, L) from the fitted prior and digits (N,) -> images
    (N, 1, 28, 28) of the first candidate per row the digit head reads as its digit, and that
    latent z (N, L) (VAE.decode_verified)."""
    images, z = model.decode_verified(inputs["candidates"], inputs["digit"])
    return {"images": images, "z": z}


def encode(model: VAE, inputs: Inputs) -> Inputs:
    """x (N, 1, 28, 28) [+ digit (N,), NO_DIGIT = predict] -> mu, logvar (N, L), digit, prob."""
    x = inputs["x"]
    if not model.config.conditional:
        posterior = model.encode(x)
        return {"mu": posterior.mean, "logvar": posterior.logvar}
    digit, probability = _resolve_digits(model, x, inputs["digit"])
    posterior = model.encode(x, digit)
    return {
        "mu": posterior.mean,
        "logvar": posterior.logvar,
        "digit": digit,
        "digit_probability": probability,
    }


def reconstruct(model: VAE, inputs: Inputs) -> Inputs:
    """x (N, 1, 28, 28) [+ digit] -> reconstruction at the posterior mean, per-image MSE."""
    x = inputs["x"]
    digit = None
    if model.config.conditional:
        digit, _ = _resolve_digits(model, x, inputs["digit"])
    reconstruction = model.decode(model.encode(x, digit).mode(), digit)
    return {"images": reconstruction, "error": (x - reconstruction).pow(2).mean((1, 2, 3))}


def anomaly(model: VAE, inputs: Inputs) -> Inputs:
    """x (N, 1, 28, 28) -> score (N,), error_map (N, 1, 28, 28), statistics (N, S) [+ digit,
    digit_probability]."""
    result = model.anomaly_score(inputs["x"])
    outputs = {
        "score": result.score,
        "error_map": result.error_map,
        "statistics": result.statistics,
    }
    if result.digit is not None and result.digit_probability is not None:
        outputs["digit"] = result.digit
        outputs["digit_probability"] = result.digit_probability
    return outputs


def similar(entry: LoadedModel, inputs: Inputs) -> Inputs:
    """x (N, 1, 28, 28), k (N,) [+ digit] -> indices, distances (N, max k) into the entry's
    latent index, nearest first [+ digit, digit_probability]. Conditional models encode with
    the given or predicted digit and search within it (training/index.py says why)."""
    index, model, x = entry.index, entry.model, inputs["x"]
    assert index is not None  # the route refuses models without an index
    digits, extra = None, {}
    if model.config.conditional:
        digits, probability = _resolve_digits(model, x, inputs["digit"])
        extra = {"digit": digits, "digit_probability": probability}
    found = index.search(
        model.encode(x, digits).mean, int(inputs["k"].max()), digits if index.conditional else None
    )
    return {"indices": found.indices, "distances": found.distances, **extra}


OPS: dict[str, Callable[[VAE, Inputs], Inputs]] = {
    "decode": decode,
    "sample": sample,
    "encode": encode,
    "reconstruct": reconstruct,
    "anomaly": anomaly,
}


def run_op(entry: LoadedModel, op: str, inputs: Inputs) -> Inputs:
    """Run one (batched) op on the model's device; called from the model's inference thread."""
    device = entry.device
    fault = inputs.get(FAULT_INPUT)
    with torch.inference_mode():
        try:
            if fault is not None:
                inject_fault(fault)
                inputs = {k: v for k, v in inputs.items() if k != FAULT_INPUT}
            on_device = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
            if op == "similar":  # reads the entry's latent index as well as its model
                outputs = similar(entry, on_device)
            else:
                outputs = OPS[op](entry.model, on_device)
            return {
                k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in outputs.items()
            }
        except torch.OutOfMemoryError:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            raise PayloadTooLarge(
                f"model {entry.name!r} ran out of memory on {device}; send fewer images per request"
            ) from None
        except Exception as exc:
            # A domain error, not a crash: the server answers 500 JSON for the requests of this
            # pass (each is retried alone first) and keeps its connections open.
            logger.error(
                "forward pass %r of model %r failed: %r", op, entry.name, exc, exc_info=exc
            )
            raise InferenceFailed(
                f"model {entry.name!r} failed on this request ({type(exc).__name__}); it was not "
                "processed: retry, and report it if it persists"
            ) from exc


def one_hot(digits: Tensor, num_classes: int) -> Tensor:
    return F.one_hot(digits.long(), num_classes).float()


def warm_up(entry: LoadedModel) -> None:
    """One forward pass of each op, so the first real request pays no lazy initialisation."""
    x = torch.zeros(2, 1, 28, 28)
    z = torch.zeros(2, entry.latent_dim)
    digit = {"digit": torch.tensor([NO_DIGIT, 0])} if entry.conditional else {}
    labels = {"labels": one_hot(torch.tensor([0, 1]), 10)} if entry.conditional else {}
    run_op(entry, "decode", {"z": z, **labels})
    if entry.conditional and entry.prior is not None:
        candidates = z[:, None].expand(2, SAMPLE_ROUNDS, entry.latent_dim).contiguous()
        run_op(entry, "sample", {"candidates": candidates, "digit": torch.tensor([0, 1])})
    run_op(entry, "encode", {"x": x, **digit})
    run_op(entry, "reconstruct", {"x": x, **digit})
    if bool(entry.model.anomaly_fitted):
        run_op(entry, "anomaly", {"x": x})
    if entry.index is not None:
        run_op(entry, "similar", {"x": x, "k": torch.tensor([1, 1]), **digit})
