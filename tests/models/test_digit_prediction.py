"""The fast digit and anomaly paths against the exact ones they replace, on the trained tiny
checkpoint and real held-out digits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models import VAE, load_checkpoint
from models.config import ANOMALY_STATISTIC_NAMES
from training.data import load_dataset, to_float


@pytest.fixture(scope="module")
def model(trained_checkpoint: Path) -> VAE:
    return load_checkpoint(trained_checkpoint).model


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    test = load_dataset("mnist-5k").test
    return to_float(test.images[:300]), test.labels[:300]


def per_label_elbo(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """ELBO at the posterior mean under each label, one label at a time: (C, B)."""
    rows = []
    for digit in range(10):
        y = torch.full((len(x),), digit)
        posterior = model.encode(x, y)
        raw = model.decode_raw(posterior.mode(), y)
        rows.append(-model.reconstruction_nll(x, raw) - posterior.kl())
    return torch.stack(rows)


@torch.no_grad()
def test_the_batched_elbo_prediction_equals_the_label_by_label_one(
    model: VAE, digits: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, _ = digits
    expected = torch.softmax(per_label_elbo(model, x).T, dim=1)
    batched = model.predict_digit_elbo(x)
    assert torch.equal(batched.digit, expected.argmax(1))
    torch.testing.assert_close(batched.probabilities, expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_the_digit_head_agrees_with_the_elbo_and_reads_digits(
    model: VAE, digits: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, labels = digits
    head, exact = model.predict_digit(x).digit, model.predict_digit_elbo(x).digit
    assert float((head == exact).double().mean()) > 0.88
    assert float((head == labels).double().mean()) > 0.88


def box_mean(image: torch.Tensor, side: int) -> torch.Tensor:
    """The mean of each side x side window of image (B, 1, 28, 28), zeros outside the frame,
    as a sum of shifted copies (no pooling op)."""
    pad = side // 2
    padded = torch.nn.functional.pad(image.double(), (pad, pad, pad, pad))
    total = torch.zeros_like(image, dtype=torch.float64)
    for dy in range(side):
        for dx in range(side):
            total += padded[:, :, dy : dy + 28, dx : dx + 28]
    return total / side**2


def doubt(logits: torch.Tensor, digit: torch.Tensor) -> torch.Tensor:
    """log(1 - softmax(logits)[digit]) in float64."""
    probability = torch.softmax(logits.double(), 1).gather(1, digit[:, None])[:, 0]
    return torch.log1p(-probability)


@torch.no_grad()
def recomputed_statistics(
    model: VAE, x: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The head's digit (B,) and every statistic a config may name (B,) each, in float64,
    computed here from the encoder, decoder and head as models/config.py describes them."""
    head = model.digit_head
    assert head is not None
    logits = head(x)
    digit = logits.argmax(1)
    posterior = model.encode(x, digit)
    raw = model.decode_raw(posterior.mode(), digit)
    reconstruction = torch.sigmoid(raw)
    error = (x - reconstruction).double()
    statistics = {
        "log_squared_error": torch.log(error.pow(2).flatten(1).sum(1) + 1e-3),
        "log_local_error": torch.log(box_mean(error, 3).pow(2).flatten(1).sum(1) + 1e-3),
        "log_kl": torch.log(posterior.kl() + 1e-3),
        "mean_logvar": posterior.logvar.mean(1),
        "negative_elbo": model.reconstruction_nll(x, raw) + posterior.kl(),
        "reconstruction_ink": reconstruction.flatten(1).mean(1),
        "ink": x.flatten(1).mean(1),
        "log_peak_local_error": torch.log(
            box_mean(error.pow(2), 5).flatten(1).max(1).values + 1e-3
        ),
        "head_doubt": doubt(logits, digit),
        "head_feature_error": torch.log(
            (head.features(x) - head.features(reconstruction)).pow(2).sum(1) + 1e-3
        ),
        "reconstruction_head_doubt": doubt(head(reconstruction), digit),
    }
    return digit, {name: value.double() for name, value in statistics.items()}


@torch.no_grad()
def test_every_anomaly_statistic_is_what_its_name_says_at_the_heads_digit(
    model: VAE, digits: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """One pass at the head's digit gives each statistic as recomputed step by step."""
    x, _ = digits
    every = VAE(replace(model.config, anomaly_statistics=ANOMALY_STATISTIC_NAMES)).eval()
    every.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith("anomaly_")},
        strict=False,
    )
    result = every.anomaly_statistics(x)
    digit, expected = recomputed_statistics(model, x)
    assert torch.equal(result.digit, digit)
    assert set(expected) == set(ANOMALY_STATISTIC_NAMES)
    for i, name in enumerate(ANOMALY_STATISTIC_NAMES):
        want = expected[name].float()
        # log(1 - p) is only as exact as 1 - p in float64 where the head is sure.
        rows = want > -25 if name.endswith("doubt") else torch.ones_like(want).bool()
        torch.testing.assert_close(result.statistics[rows, i], want[rows], atol=2e-4, rtol=1e-4)


@torch.no_grad()
def test_the_anomaly_score_is_the_mahalanobis_distance_of_the_recomputed_statistics(
    model: VAE, digits: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """The score from statistics recomputed here (not read back from the result it checks)
    and the fitted centre and precision."""
    x, _ = digits
    digit, recomputed = recomputed_statistics(model, x)
    statistics = torch.stack([recomputed[n] for n in model.config.anomaly_statistics], 1)
    delta = statistics - model.anomaly_center[digit].double()
    expected = (delta @ model.anomaly_precision.double() * delta).sum(1).sqrt()
    result = model.anomaly_score(x)
    torch.testing.assert_close(result.score.double(), expected, atol=1e-3, rtol=1e-3)


@torch.no_grad()
def test_a_model_without_a_head_predicts_by_the_elbo(
    model: VAE, digits: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Checkpoints saved before the head existed load without one and keep the exact rule."""
    plain = VAE(replace(model.config, digit_head=False))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("digit_head.")}
    plain.load_state_dict(state)
    plain.eval()
    x, _ = digits
    assert torch.equal(plain.predict_digit(x).digit, model.predict_digit_elbo(x).digit)
    with pytest.raises(ValueError, match="no digit head"):
        plain.digit_logits(x)
