"""Tests for app.http.routes.analyze: /encode, /reconstruct, /anomaly-score on real digits."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from app_testing import (
    JSON_ACCEPT,
    decode_b64_png,
    files,
    grid_size,
    grid_tiles,
    metric,
    model_card,
    mse,
    pixels,
    png_of,
    unit,
)
from fastapi.testclient import TestClient
from PIL import Image

from models import load_checkpoint

MnistTest = tuple[torch.Tensor, torch.Tensor]


def first_of_each_digit(mnist_test: MnistTest, per_digit: int = 2) -> tuple[list[bytes], list[int]]:
    """per_digit real test images of each digit 0..9, as uploaded PNGs, and their labels."""
    images, labels = mnist_test
    uploads, truth = [], []
    for digit in range(10):
        for index in (labels == digit).nonzero()[:per_digit, 0].tolist():
            uploads.append(png_of(images[index]))
            truth.append(digit)
    return uploads, truth


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def score(client: TestClient, *uploads: bytes, **params: Any) -> dict[str, Any]:
    response = client.post("/anomaly-score", files=files(*uploads), params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# ---- /encode --------------------------------------------------------------------------------


def test_encode_returns_a_posterior_per_image(
    client: TestClient, mnist_test: MnistTest, model_name: str, latent_dim: int
) -> None:
    uploads, _ = first_of_each_digit(mnist_test, per_digit=1)
    response = client.post("/encode", files=files(*uploads[:3]))
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == model_name
    assert body["latent_dim"] == latent_dim
    assert len(body["items"]) == 3
    for item in body["items"]:
        assert len(item["mu"]) == len(item["logvar"]) == latent_dim
        assert all(np.isfinite(item["mu"])) and all(np.isfinite(item["logvar"]))
        assert 0.0 < item["digit_probability"] <= 1.0
    # Different digits have different posteriors.
    assert body["items"][0]["mu"] != body["items"][1]["mu"]


def test_encode_predicts_the_digit_of_real_images(
    client: TestClient, mnist_test: MnistTest
) -> None:
    uploads, truth = first_of_each_digit(mnist_test, per_digit=3)
    items = client.post("/encode", files=files(*uploads)).json()["items"]
    correct = sum(item["digit"] == label for item, label in zip(items, truth, strict=True))
    assert correct >= 0.8 * len(truth), [item["digit"] for item in items]


def test_encode_with_a_given_digit(client: TestClient, mnist_test: MnistTest) -> None:
    uploads, _ = first_of_each_digit(mnist_test, per_digit=1)
    given = client.post("/encode", files=files(uploads[4]), params={"digit": 4}).json()
    other = client.post("/encode", files=files(uploads[4]), params={"digit": 9}).json()
    assert given["items"][0]["digit"] == 4
    assert given["items"][0]["digit_probability"] == 1.0
    assert other["items"][0]["digit"] == 9
    assert given["items"][0]["mu"] != other["items"][0]["mu"]


def test_encode_is_deterministic(client: TestClient, mnist_test: MnistTest) -> None:
    uploads, _ = first_of_each_digit(mnist_test, per_digit=1)
    first = client.post("/encode", files=files(uploads[2]))
    second = client.post("/encode", files=files(uploads[2]))
    assert first.json() == second.json()


def test_encode_invert_flips_black_on_white(client: TestClient, mnist_test: MnistTest) -> None:
    images, _ = mnist_test
    plain = client.post("/encode", files=files(png_of(images[5]))).json()["items"][0]
    on_paper = png_of(1.0 - images[5])
    flipped = client.post("/encode", files=files(on_paper), params={"invert": "true"}).json()
    np.testing.assert_allclose(flipped["items"][0]["mu"], plain["mu"], atol=1e-5)


def test_encode_on_the_unconditional_model(multi_client: TestClient, mnist_test: MnistTest) -> None:
    images, _ = mnist_test
    card = model_card(multi_client, "unconditional")
    response = multi_client.post(
        "/encode", files=files(png_of(images[0])), params={"model": card["name"]}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["latent_dim"] == card["latent_dim"]
    (item,) = body["items"]
    assert len(item["mu"]) == card["latent_dim"]
    assert item["digit"] is None and item["digit_probability"] is None


@pytest.mark.parametrize("mode", ["RGBA", "RGB", "I;16", "P", "LA", "1"])
def test_encode_accepts_any_pillow_mode(
    client: TestClient, mnist_test: MnistTest, mode: str
) -> None:
    images, _ = mnist_test
    gray = (images[21, 0].numpy() * 255).round().astype(np.uint8)
    if mode == "1":
        gray = np.where(gray > 127, 255, 0).astype(np.uint8)
    reference = client.post("/encode", files=files(png_bytes(Image.fromarray(gray)))).json()
    if mode == "I;16":
        image = Image.fromarray(gray.astype(np.uint16) * 257)  # same levels at 16 bits
    elif mode == "RGBA":
        image = Image.fromarray(np.dstack([gray, gray, gray, np.full_like(gray, 255)]), "RGBA")
    elif mode == "LA":
        image = Image.fromarray(np.dstack([gray, np.full_like(gray, 255)]), "LA")
    else:
        image = Image.fromarray(gray).convert(mode)
    assert image.mode == mode
    response = client.post("/encode", files=files(png_bytes(image)))
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(
        response.json()["items"][0]["mu"], reference["items"][0]["mu"], atol=1e-4
    )


def test_transparent_pixels_count_as_black_background(
    client: TestClient, mnist_test: MnistTest
) -> None:
    images, _ = mnist_test
    gray = (images[33, 0].numpy() * 255).round().astype(np.uint8)
    # White everywhere, but only the digit's strokes are opaque: the same digit after flattening.
    rgba = np.dstack([np.full_like(gray, 255)] * 3 + [gray])
    reference = client.post("/encode", files=files(png_bytes(Image.fromarray(gray)))).json()
    response = client.post("/encode", files=files(png_bytes(Image.fromarray(rgba, "RGBA"))))
    assert response.status_code == 200
    np.testing.assert_allclose(
        response.json()["items"][0]["mu"], reference["items"][0]["mu"], atol=1e-4
    )


@pytest.mark.parametrize("fmt", ["JPEG", "BMP", "GIF", "WEBP", "TIFF"])
def test_encode_accepts_other_formats(client: TestClient, mnist_test: MnistTest, fmt: str) -> None:
    images, labels = mnist_test
    index = int((labels == 3).nonzero()[0])
    big = Image.fromarray((images[index, 0].numpy() * 255).astype(np.uint8)).resize((112, 112))
    buffer = io.BytesIO()
    big.save(buffer, format=fmt)
    response = client.post("/encode", files=files(buffer.getvalue()))
    assert response.status_code == 200, response.text
    assert response.json()["items"][0]["digit"] == 3


# ---- /reconstruct ---------------------------------------------------------------------------


def test_reconstruct_png_has_one_row_per_input(client: TestClient, mnist_test: MnistTest) -> None:
    uploads, _ = first_of_each_digit(mnist_test, per_digit=1)
    response = client.post("/reconstruct", files=files(*uploads[:3]))
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    grid = pixels(response.content)
    assert (grid.shape[1], grid.shape[0]) == grid_size(6, 2)
    as_json = client.post("/reconstruct", files=files(*uploads[:3]), headers=JSON_ACCEPT).json()
    tiles = grid_tiles(grid, 6, 2)
    for row, upload in enumerate(uploads[:3]):
        np.testing.assert_array_equal(tiles[2 * row], pixels(upload))  # the input, left
        reconstruction = decode_b64_png(as_json["items"][row]["image"])
        np.testing.assert_array_equal(tiles[2 * row + 1], reconstruction)  # its reconstruction


def test_reconstruct_error_is_small_for_real_digits(
    client: TestClient, mnist_test: MnistTest, model_name: str, checkpoint_config: dict[str, Any]
) -> None:
    uploads, _ = first_of_each_digit(mnist_test, per_digit=2)
    noise = png_of(torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(0)))
    body = client.post("/reconstruct", files=files(*uploads, noise), headers=JSON_ACCEPT).json()
    assert body["model"] == model_name
    errors = [item["error"] for item in body["items"]]
    digit_errors, noise_error = errors[:-1], errors[-1]
    assert max(digit_errors) < 0.1
    assert noise_error > 3 * max(digit_errors)
    # In line with the test-set reconstruction error the trainer measured.
    measured_by_trainer = checkpoint_config["metrics"]["reconstruction_mse"]
    assert float(np.median(digit_errors)) < 2 * measured_by_trainer
    # The reported error is the mean squared pixel error of the returned reconstruction.
    for upload, item in zip([*uploads, noise], body["items"], strict=True):
        measured = mse(decode_b64_png(item["image"]), pixels(upload))
        assert item["error"] == pytest.approx(measured, abs=2e-3)


# ---- /anomaly-score -------------------------------------------------------------------------


def test_real_test_digits_are_not_anomalous(
    client: TestClient, mnist_test: MnistTest, checkpoint_config: dict[str, Any], model_name: str
) -> None:
    uploads, truth = first_of_each_digit(mnist_test, per_digit=2)
    body = score(client, *uploads)
    calibration = checkpoint_config["anomaly"]
    assert body["model"] == model_name
    assert body["threshold"] == pytest.approx(calibration["threshold"])
    assert body["score_kind"] == calibration.get("score_kind", "unknown")
    items = body["items"]
    assert len(items) == len(uploads)
    assert sum(not item["is_anomaly"] for item in items) >= len(items) - 2
    assert sum(item["digit"] == label for item, label in zip(items, truth, strict=True)) >= 16
    for item in items:
        assert item["is_anomaly"] == (item["score"] > body["threshold"])
        assert 0.0 < item["digit_probability"] <= 1.0
        assert item["heatmap"] is None


def test_blank_noise_and_inverted_digits_are_anomalous(
    client: TestClient, mnist_test: MnistTest
) -> None:
    images, _ = mnist_test
    generator = torch.Generator().manual_seed(1)
    outliers = {
        "blank": torch.zeros(1, 28, 28),
        "white": torch.ones(1, 28, 28),
        "noise": torch.rand(1, 28, 28, generator=generator),
        "inverted 0": 1.0 - images[0],
        "inverted 7": 1.0 - images[750],
    }
    body = score(client, *(png_of(image) for image in outliers.values()))
    for name, item in zip(outliers, body["items"], strict=True):
        assert item["is_anomaly"], (name, item["score"], body["threshold"])
        assert item["score"] > body["threshold"]
    normal = score(client, png_of(images[0]))["items"][0]
    assert all(item["score"] > normal["score"] for item in body["items"])


def test_components_are_the_statistics_behind_each_score(
    client: TestClient,
    mnist_test: MnistTest,
    trained_checkpoint: Path,
    checkpoint_config: dict[str, Any],
) -> None:
    """items[].components names the checkpoint's statistics in order, with the values the model
    computes for the upload, and the score is their distance from the fitted reference."""
    images, _ = mnist_test
    uploads = [png_of(image) for image in (images[0], images[130], 1.0 - images[0])]
    items = score(client, *uploads)["items"]
    model = load_checkpoint(trained_checkpoint).model
    x = torch.stack([torch.from_numpy(unit(pixels(upload))).float()[None] for upload in uploads])
    expected = model.anomaly_statistics(x)
    names = checkpoint_config["model"]["anomaly_statistics"]
    assert expected.digit is not None
    for i, item in enumerate(items):
        assert list(item["components"]) == names
        values = torch.tensor(list(item["components"].values()), dtype=torch.float64)
        torch.testing.assert_close(values, expected.statistics[i].double(), atol=1e-3, rtol=1e-3)
        delta = values - model.anomaly_center[expected.digit[i]].double()
        distance = float(delta @ model.anomaly_precision.double() @ delta) ** 0.5
        assert item["score"] == pytest.approx(distance, rel=1e-3)


def test_percentile_follows_the_calibration_quantiles(
    client: TestClient, mnist_test: MnistTest, checkpoint_config: dict[str, Any]
) -> None:
    images, _ = mnist_test
    uploads = [png_of(images[i]) for i in (0, 130, 260, 390, 520)] + [png_of(1.0 - images[0])]
    items = score(client, *uploads)["items"]
    quantiles = np.array(checkpoint_config["anomaly"]["quantiles"], dtype=np.float64)
    levels = np.linspace(0.0, 100.0, len(quantiles))
    for item in items:
        assert 0.0 <= item["percentile"] <= 100.0
        assert item["percentile"] == pytest.approx(np.interp(item["score"], quantiles, levels))
    assert items[-1]["percentile"] > 99.0  # the inverted digit is off the scale


def test_heatmap_only_when_asked(client: TestClient, mnist_test: MnistTest) -> None:
    images, _ = mnist_test
    uploads = [png_of(images[40]), png_of(torch.zeros(1, 28, 28))]
    without = score(client, *uploads)
    with_maps = score(client, *uploads, heatmap="true")
    assert all(item["heatmap"] is None for item in without["items"])
    heatmaps = [decode_b64_png(item["heatmap"]) for item in with_maps["items"]]
    # Brightest = largest error, scaled per image; a blank input misses the whole digit.
    assert all(h.max() == 255 for h in heatmaps)
    assert [i["score"] for i in without["items"]] == [i["score"] for i in with_maps["items"]]


def test_threshold_override_flips_is_anomaly(client: TestClient, mnist_test: MnistTest) -> None:
    images, _ = mnist_test
    upload = png_of(images[222])
    item = score(client, upload)["items"][0]
    low = score(client, upload, threshold=item["score"] - 0.01)
    high = score(client, upload, threshold=item["score"] + 0.01)
    assert low["threshold"] == pytest.approx(item["score"] - 0.01)
    assert low["items"][0]["is_anomaly"] is True
    assert high["items"][0]["is_anomaly"] is False
    assert low["items"][0]["score"] == high["items"][0]["score"] == item["score"]


def test_anomaly_score_on_the_unconditional_model(
    multi_client: TestClient, mnist_test: MnistTest
) -> None:
    images, _ = mnist_test
    card = model_card(multi_client, "unconditional")
    body = score(multi_client, png_of(images[10]), png_of(1 - images[10]), model=card["name"])
    assert body["model"] == card["name"]
    normal, inverted = body["items"]
    assert normal["digit"] is None and normal["digit_probability"] is None
    assert not normal["is_anomaly"] and inverted["is_anomaly"]


def test_anomaly_histogram_counts_every_scored_image(
    client: TestClient, mnist_test: MnistTest, model_name: str
) -> None:
    images, _ = mnist_test
    labels = {"model": model_name}
    before = metric(client, "vae_anomaly_score_count", labels)
    total_before = metric(client, "vae_anomaly_score_sum", labels)
    body = score(client, png_of(images[1]), png_of(images[2]), png_of(images[3]))
    assert metric(client, "vae_anomaly_score_count", labels) == before + 3
    observed = metric(client, "vae_anomaly_score_sum", labels) - total_before
    assert observed == pytest.approx(sum(item["score"] for item in body["items"]), rel=1e-6)


def test_each_heatmap_is_the_squared_error_of_its_own_reconstruction(
    client: TestClient, mnist_test: MnistTest, trained_checkpoint: Path
) -> None:
    # The heatmap of upload i is (x_i - reconstruction_i)^2 scaled to its maximum, with the
    # reconstruction the score is computed from (the likelihood's mean at the predicted digit,
    # not the crisper image /reconstruct shows): not another image's, nor another quantity.
    from models import load_checkpoint

    images, _ = mnist_test
    uploads = [png_of(images[i]) for i in (40, 400, 800)]
    items = score(client, *uploads, heatmap="true")["items"]
    maps = [decode_b64_png(item["heatmap"]).astype(np.float64) for item in items]
    model = load_checkpoint(trained_checkpoint).model
    x = torch.stack([torch.from_numpy(unit(pixels(upload))).float()[None] for upload in uploads])
    digits = torch.tensor([item["digit"] for item in items])
    with torch.no_grad():
        mean = model.decode_mean(model.encode(x, digits).mode(), digits)
    expected = []
    for upload, reconstruction in zip(uploads, mean, strict=True):
        error = (unit(pixels(upload)) - reconstruction[0].numpy()) ** 2
        expected.append(255 * error / error.max())
    for i, heatmap in enumerate(maps):
        differences = [float(np.abs(heatmap - e).mean()) for e in expected]
        # The upload and the heatmap PNG are rounded to 8 bits: a grey level or two on average.
        assert differences[i] < 2, differences
        assert all(d > 5 * differences[i] for j, d in enumerate(differences) if j != i)


def test_an_uncalibrated_checkpoint_answers_400_with_the_fix(
    trained_checkpoint: Path, mnist_test: MnistTest
) -> None:
    # The per-epoch checkpoints in train_state/ are saved before the anomaly calibration.
    from app.main import create_app
    from app.settings import Settings

    uncalibrated = trained_checkpoint / "train_state" / "best"
    with TestClient(create_app(Settings(checkpoints=str(uncalibrated), device="cpu"))) as client:
        images, _ = mnist_test
        response = client.post("/anomaly-score", files=files(png_of(images[0])))
        assert response.status_code == 400
        detail = response.json()["detail"]
        assert "has no anomaly calibration" in detail and "retrain it with vae-train" in detail
        assert metric(client, "vae_requests_rejected_total", {"reason": "bad_request"}) == 1
        # The rest of the model is served.
        assert client.post("/encode", files=files(png_of(images[0]))).status_code == 200


def photo_patches(count_per_photo: int = 8, side: int = 112) -> list[torch.Tensor]:
    """Grayscale patches of the two natural photos scikit-learn ships (a temple, a flower),
    side x side pixels at seeded places, scaled to 28x28 like any upload: (1, 28, 28) each."""
    from sklearn.datasets import load_sample_images

    generator = np.random.default_rng(0)
    patches = []
    for photo in load_sample_images().images:
        gray = Image.fromarray(photo).convert("L")
        for _ in range(count_per_photo):
            top = int(generator.integers(0, gray.height - side))
            left = int(generator.integers(0, gray.width - side))
            patch = gray.crop((left, top, left + side, top + side)).resize((28, 28))
            patches.append(torch.from_numpy(np.asarray(patch, dtype=np.float32) / 255)[None])
    return patches


def test_photo_patches_and_constant_images_score_above_real_digits(
    client: TestClient, mnist_test: MnistTest
) -> None:
    # What the README says of the typicality score, on the small test model: every photo
    # patch and constant grey image scores above the typical real digit, and most of each
    # kind above the calibrated threshold (the default model separates them further).
    images, _ = mnist_test
    digits = score(client, *(png_of(images[i]) for i in range(0, 1000, 20)))
    typical_digit = float(np.median([item["score"] for item in digits["items"]]))
    kinds = {
        "photo patch": photo_patches(),
        "constant": [torch.full((1, 28, 28), level) for level in (0.1, 0.25, 0.5, 0.75, 0.9)],
    }
    for kind, uploads in kinds.items():
        body = score(client, *(png_of(upload) for upload in uploads))
        scores = [item["score"] for item in body["items"]]
        assert min(scores) > typical_digit, (kind, scores, typical_digit)
        assert float(np.median(scores)) > body["threshold"], (kind, scores, body["threshold"])
        assert sum(item["is_anomaly"] for item in body["items"]) >= 0.6 * len(uploads), kind
