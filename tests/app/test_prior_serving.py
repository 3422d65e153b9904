"""The fitted latent prior in the service: the default for /sample, prior=standard as before,
and a checkpoint without one served from N(0, I) with a note."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from app_testing import JSON_ACCEPT, decode_b64_png, model_card
from conftest import serve
from fastapi.testclient import TestClient

from models import VAE, load_checkpoint
from models.prior import PRIOR_FILE, GaussianMixturePrior, load_prior
from models.vae import SAMPLE_ROUNDS


def expected_png_pixels(images: torch.Tensor) -> list[np.ndarray]:
    """What the service's 8-bit PNGs hold for images (N, 1, 28, 28) in [0, 1]."""
    return [(image[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy() for image in images]


def sampled(client: TestClient, **params: object) -> tuple[dict[str, object], list[np.ndarray]]:
    response = client.post("/sample", params=params, headers=JSON_ACCEPT)
    assert response.status_code == 200, response.text
    payload = response.json()
    return payload, [decode_b64_png(image) for image in payload["images"]]


def test_the_model_card_describes_the_fitted_prior(client: TestClient) -> None:
    prior = model_card(client)["prior"]
    assert prior["default"] == "fitted"
    fitted = prior["fitted"]
    assert fitted["kind"] == "gaussian-mixture" and fitted["groups"] == 10
    assert all(1 <= k <= 4 for k in fitted["components"])
    assert 0.2 <= prior["decoder_temperature"] < 1.0


@torch.no_grad()
def fitted_prior_draws(
    model: VAE, prior: GaussianMixturePrior, digit: int, n: int, temperature: float, seed: int
) -> torch.Tensor:
    """The README's recipe, computed here step by step rather than through model.sample: from
    one CPU generator, SAMPLE_ROUNDS components of the digit's mixture per image (by weight),
    then as many standard normal draws; each candidate is the component's mean plus
    temperature x its Cholesky factor times the draw; an image keeps the first candidate the
    digit head reads as the digit, else its last. Returns the images (n, 1, 28, 28)."""
    rounds = SAMPLE_ROUNDS
    generator = torch.Generator().manual_seed(seed)
    weights = prior.weights[digit].double().expand(n, -1)
    components = torch.multinomial(weights.float(), rounds, True, generator=generator)
    noise = torch.randn(n, rounds, model.config.latent_dim, generator=generator)
    images = []
    label = torch.tensor([digit])
    for row in range(n):
        for round_ in range(rounds):
            k = int(components[row, round_])
            z = (
                prior.means[digit, k]
                + temperature * prior.scale_tril[digit, k] @ noise[row, round_]
            )
            image = torch.sigmoid(
                model.decode_raw(z[None], label) / model.config.decoder_temperature
            )
            if int(model.digit_head(image).argmax(1)) == digit:  # type: ignore[misc]
                break
        images.append(image[0])
    return torch.stack(images)


def test_sample_draws_from_the_fitted_prior_at_its_temperature(
    client: TestClient, trained_checkpoint: Path
) -> None:
    payload, images = sampled(client, n=6, digit=4, seed=11, temperature=0.9)
    assert payload["prior"] == "fitted" and payload["digits"] == [4] * 6
    checkpoint = load_checkpoint(trained_checkpoint)
    prior = load_prior(trained_checkpoint, checkpoint.model.config.latent_dim, 10)
    assert prior is not None and max(prior.summary()["components"]) > 1
    expected = fitted_prior_draws(checkpoint.model.eval(), prior, 4, 6, 0.9, seed=11)
    for got, want in zip(images, expected_png_pixels(expected), strict=True):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_prior_standard_draws_the_same_z_as_before(
    client: TestClient, trained_checkpoint: Path
) -> None:
    """Seeds from before fitted priors keep their images: z = t * N(0, I) from the seed, then
    the random digits, from one CPU generator."""
    payload, images = sampled(client, n=5, seed=3, temperature=0.7, prior="standard")
    assert payload["prior"] == "standard"
    model = load_checkpoint(trained_checkpoint).model
    generator = torch.Generator().manual_seed(3)
    z = 0.7 * torch.randn(5, model.config.latent_dim, generator=generator)
    digits = torch.randint(0, 10, (5,), generator=generator)
    assert payload["digits"] == digits.tolist()
    with torch.no_grad():
        expected = model.decode(z, digits)
    for got, want in zip(images, expected_png_pixels(expected), strict=True):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_the_prior_header_names_the_prior_used(client: TestClient) -> None:
    assert client.post("/sample", params={"digit": 2}).headers["x-prior"] == "fitted"
    standard = client.post("/sample", params={"digit": 2, "prior": "standard"})
    assert standard.headers["x-prior"] == "standard"
    bad = client.post("/sample", params={"prior": "uniform"})
    assert bad.status_code == 422 and "prior" in bad.text


@pytest.fixture(scope="module")
def priorless_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, trained_checkpoint: Path
) -> Path:
    """The trained checkpoint as one saved before fitted priors: no prior.safetensors."""
    folder = Path(shutil.copytree(trained_checkpoint, tmp_path_factory.mktemp("old") / "old"))
    (folder / PRIOR_FILE).unlink()
    return folder


@pytest.fixture(scope="module")
def priorless_client(priorless_checkpoint: Path) -> Iterator[TestClient]:
    yield from serve(checkpoints=str(priorless_checkpoint), device="cpu")


def test_a_checkpoint_without_a_prior_samples_from_the_standard_normal(
    priorless_client: TestClient,
) -> None:
    card = model_card(priorless_client)["prior"]
    assert card["default"] == "standard" and card["fitted"] is None
    assert "no fitted prior" in card["note"]
    payload, _ = sampled(priorless_client, n=2, digit=3, seed=1)
    assert payload["prior"] == "standard"
    refused = priorless_client.post("/sample", params={"prior": "fitted"})
    assert refused.status_code == 400
    assert "has no fitted prior" in refused.json()["detail"]
    assert "prior=standard" in refused.json()["detail"]


def test_loading_a_checkpoint_without_a_prior_says_so_in_the_log(
    priorless_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="app.service.registry"):
        for _ in serve(checkpoints=str(priorless_checkpoint), device="cpu"):
            pass
    assert any("no fitted prior" in record.getMessage() for record in caplog.records)
