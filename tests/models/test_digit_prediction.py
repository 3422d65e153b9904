"""The fast digit and anomaly paths against the exact ones they replace, on the trained tiny
checkpoint and real held-out digits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models import VAE, load_checkpoint
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


@torch.no_grad()
def test_the_anomaly_score_is_the_distance_of_the_statistics_at_the_heads_digit(
    model: VAE, digits: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """One pass at the head's digit gives what the per-label path gives at that digit."""
    x, _ = digits
    result = model.anomaly_score(x)
    digit = model.predict_digit(x).digit
    assert torch.equal(result.digit, digit)
    posterior = model.encode(x, digit)
    raw = model.decode_raw(posterior.mode(), digit)
    elbo = -model.reconstruction_nll(x, raw) - posterior.kl()
    reconstruction = torch.sigmoid(raw)
    expected = {
        "log_squared_error": torch.log((x - reconstruction).pow(2).flatten(1).sum(1) + 1e-3),
        "log_kl": torch.log(posterior.kl() + 1e-3),
        "mean_logvar": posterior.logvar.mean(1),
        "negative_elbo": -elbo,
        "reconstruction_ink": reconstruction.flatten(1).mean(1),
        "ink": x.flatten(1).mean(1),
    }
    for i, name in enumerate(model.config.anomaly_statistics):
        if name in expected:
            torch.testing.assert_close(result.statistics[:, i], expected[name].float())
    delta = result.statistics - model.anomaly_center[digit]
    score = torch.einsum("bi,ij,bj->b", delta, model.anomaly_precision, delta).sqrt()
    torch.testing.assert_close(result.score, score)


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
