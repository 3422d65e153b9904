"""Tests for app.http.routes.generate: /sample, /decode, /interpolate, /variations, real model."""

from __future__ import annotations

import base64
from collections import Counter

import numpy as np
import pytest
import torch
from app_testing import (
    JSON_ACCEPT,
    decode_b64_png,
    files,
    grid_size,
    grid_tiles,
    model_card,
    mse,
    open_image,
    padding_mask,
    pixels,
    png_of,
)
from fastapi.testclient import TestClient
from PIL import ImageSequence

MnistTest = tuple[torch.Tensor, torch.Tensor]


def predicted_digits(client: TestClient, images: list[np.ndarray]) -> list[int]:
    """The model's own classifier (POST /encode without a digit) on decoded images."""
    blobs = [png_of(torch.from_numpy(a.astype(np.float32) / 255.0)[None]) for a in images]
    response = client.post("/encode", files=files(*blobs))
    assert response.status_code == 200
    return [item["digit"] for item in response.json()["items"]]


# ---- /sample --------------------------------------------------------------------------------


def test_sample_one_image_is_a_28x28_grayscale_png(client: TestClient) -> None:
    response = client.post("/sample", params={"seed": 1})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    image = open_image(response.content)
    assert (image.mode, image.size) == ("L", (28, 28))
    assert np.asarray(image).std() > 0  # a digit, not a flat image


@pytest.mark.parametrize(("n", "nrow"), [(8, 8), (10, 4), (3, 8), (5, 1)])
def test_sample_grid_layout_holds_the_json_images(client: TestClient, n: int, nrow: int) -> None:
    params = {"n": n, "nrow": nrow, "seed": 11}
    grid_response = client.post("/sample", params=params)
    json_response = client.post("/sample", params=params, headers=JSON_ACCEPT)
    assert grid_response.status_code == json_response.status_code == 200
    grid = pixels(grid_response.content)
    assert (grid.shape[1], grid.shape[0]) == grid_size(n, nrow)
    images = [decode_b64_png(s) for s in json_response.json()["images"]]
    assert len(images) == n
    for tile, image in zip(grid_tiles(grid, n, min(nrow, n)), images, strict=True):
        np.testing.assert_array_equal(tile, image)
    assert not grid[padding_mask(grid, n, min(nrow, n))].any()  # black padding


def test_sample_json_reports_model_seed_and_digits(client: TestClient, model_name: str) -> None:
    response = client.post("/sample", params={"n": 3, "seed": 5}, headers=JSON_ACCEPT)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["model"] == model_name
    assert body["seed"] == 5
    assert response.headers["x-seed"] == "5"
    assert len(body["digits"]) == 3
    assert all(0 <= d <= 9 for d in body["digits"])


def test_sample_same_seed_gives_identical_bytes(client: TestClient) -> None:
    params = {"n": 6, "seed": 1234, "temperature": 0.8}
    first = client.post("/sample", params=params)
    second = client.post("/sample", params=params)
    assert first.content == second.content
    first_json = client.post("/sample", params=params, headers=JSON_ACCEPT)
    second_json = client.post("/sample", params=params, headers=JSON_ACCEPT)
    assert first_json.content == second_json.content


def test_sample_different_seeds_differ(client: TestClient) -> None:
    first = client.post("/sample", params={"n": 4, "seed": 1})
    second = client.post("/sample", params={"n": 4, "seed": 2})
    assert first.content != second.content


def test_x_seed_is_always_sent_and_reproduces_the_response(client: TestClient) -> None:
    drawn = client.post("/sample", params={"n": 4})
    seed = drawn.headers["x-seed"]
    assert int(seed) >= 0
    again = client.post("/sample", params={"n": 4, "seed": seed})
    assert again.headers["x-seed"] == seed
    assert again.content == drawn.content
    other = client.post("/sample", params={"n": 4})
    assert other.headers["x-seed"] != seed  # seeds are drawn per request


def test_sample_temperature_changes_the_images(client: TestClient) -> None:
    cold = client.post("/sample", params={"n": 4, "seed": 9, "temperature": 0.1})
    hot = client.post("/sample", params={"n": 4, "seed": 9, "temperature": 2})
    assert cold.status_code == hot.status_code == 200
    assert cold.content != hot.content


def test_sample_of_a_digit_is_that_digit(client: TestClient) -> None:
    response = client.post(
        "/sample", params={"n": 16, "digit": 7, "seed": 0, "temperature": 0.7}, headers=JSON_ACCEPT
    )
    body = response.json()
    assert body["digits"] == [7] * 16
    predictions = predicted_digits(client, [decode_b64_png(s) for s in body["images"]])
    assert Counter(predictions)[7] >= 12, predictions


def test_sample_without_digit_draws_digits_uniformly(client: TestClient) -> None:
    response = client.post("/sample", params={"n": 256, "seed": 3}, headers=JSON_ACCEPT)
    body = response.json()
    counts = Counter(body["digits"])
    assert sorted(counts) == list(range(10))
    assert max(counts.values()) < 50  # 25.6 expected per digit
    # The reported digits are what was drawn: the model's classifier agrees on most of them.
    predictions = predicted_digits(client, [decode_b64_png(s) for s in body["images"][:64]])
    agree = sum(p == d for p, d in zip(predictions, body["digits"][:64], strict=True))
    assert agree >= 48, (agree, predictions)


def test_sample_unconditional_model_reports_no_digits(multi_client: TestClient) -> None:
    response = multi_client.post(
        "/sample", params={"n": 3, "seed": 2, "model": "unconditional"}, headers=JSON_ACCEPT
    )
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "unconditional"
    assert body["digits"] is None
    assert len(body["images"]) == 3


@pytest.mark.parametrize("accept", ["image/png", "*/*", "image/*", "image/gif", ""])
def test_sample_answers_png_unless_json_is_preferred(client: TestClient, accept: str) -> None:
    response = client.post("/sample", params={"seed": 1}, headers={"accept": accept})
    assert response.headers["content-type"] == "image/png"
    open_image(response.content)


def test_accept_q_values_pick_the_preferred_type(client: TestClient) -> None:
    prefers_json = {"accept": "image/png;q=0.4, application/json;q=0.9"}
    prefers_png = {"accept": "image/png;q=0.9, application/json;q=0.4"}
    json_response = client.post("/sample", params={"seed": 1}, headers=prefers_json)
    png_response = client.post("/sample", params={"seed": 1}, headers=prefers_png)
    assert json_response.headers["content-type"] == "application/json"
    assert png_response.headers["content-type"] == "image/png"
    # Both carry the same image.
    image = decode_b64_png(json_response.json()["images"][0])
    np.testing.assert_array_equal(image, pixels(png_response.content))


# ---- /decode --------------------------------------------------------------------------------


def test_decode_grid_and_json(client: TestClient, latent_dim: int) -> None:
    z = torch.randn(3, latent_dim, generator=torch.Generator().manual_seed(0)).tolist()
    body = {"z": z, "digit": [1, 4, 9]}
    grid = pixels(client.post("/decode", json=body, params={"nrow": 2}).content)
    assert (grid.shape[1], grid.shape[0]) == grid_size(3, 2)
    response = client.post("/decode", json=body, headers=JSON_ACCEPT)
    assert response.status_code == 200
    payload = response.json()
    assert payload["digits"] == [1, 4, 9]
    images = [decode_b64_png(s) for s in payload["images"]]
    for tile, image in zip(grid_tiles(grid, 3, 2), images, strict=True):
        np.testing.assert_array_equal(tile, image)


def test_decode_one_digit_applies_to_every_row(client: TestClient, latent_dim: int) -> None:
    z = [[0.0] * latent_dim] * 2
    response = client.post("/decode", json={"z": z, "digit": 3}, headers=JSON_ACCEPT)
    assert response.json()["digits"] == [3, 3]
    listed = client.post("/decode", json={"z": z, "digit": [3, 3]}, headers=JSON_ACCEPT)
    assert response.json()["images"] == listed.json()["images"]


def test_decode_inverts_encode_on_a_real_digit(client: TestClient, mnist_test: MnistTest) -> None:
    images, labels = mnist_test
    index = int((labels == 2).nonzero()[0])
    upload = png_of(images[index])
    encoded = client.post("/encode", files=files(upload), params={"digit": 2}).json()
    mu = encoded["items"][0]["mu"]
    decoded = client.post("/decode", json={"z": [mu], "digit": 2})
    assert decoded.status_code == 200
    image = pixels(decoded.content)
    # Decoding the posterior mean is the reconstruction, and it looks like the input digit.
    reconstructed = client.post(
        "/reconstruct", files=files(upload), params={"digit": 2}, headers=JSON_ACCEPT
    ).json()["items"][0]["image"]
    assert np.abs(image.astype(int) - decode_b64_png(reconstructed)).max() <= 2
    others = [png_of(images[int((labels == d).nonzero()[0])]) for d in (0, 1, 6, 7)]
    assert mse(image, pixels(upload)) < min(mse(image, pixels(other)) for other in others)


def test_decode_digit_changes_the_image(client: TestClient, latent_dim: int) -> None:
    z = [[0.0] * latent_dim]
    one = client.post("/decode", json={"z": z, "digit": 1}).content
    eight = client.post("/decode", json={"z": z, "digit": 8}).content
    assert mse(pixels(one), pixels(eight)) > 0.01


def test_decode_on_the_unconditional_model(multi_client: TestClient) -> None:
    card = model_card(multi_client, "unconditional")
    z = [[0.5] * card["latent_dim"]]
    response = multi_client.post(
        "/decode", json={"z": z}, params={"model": card["name"]}, headers=JSON_ACCEPT
    )
    assert response.status_code == 200
    assert response.json()["digits"] is None
    decode_b64_png(response.json()["images"][0])


# ---- /interpolate ---------------------------------------------------------------------------


def test_interpolate_png_is_one_row_of_steps(client: TestClient) -> None:
    body = {"start": {"digit": 1}, "end": {"digit": 7}, "steps": 6, "seed": 4}
    response = client.post("/interpolate", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    strip = pixels(response.content)
    assert (strip.shape[1], strip.shape[0]) == grid_size(6, 6)


def test_interpolate_default_steps(client: TestClient) -> None:
    response = client.post(
        "/interpolate", json={"start": {"digit": 0}, "end": {"digit": 5}}, headers=JSON_ACCEPT
    )
    assert len(response.json()["images"]) == 10


@pytest.mark.parametrize("steps", [2, 7, 64])
def test_interpolate_gif_has_exactly_steps_frames(client: TestClient, steps: int) -> None:
    body = {"start": {"digit": 3}, "end": {"digit": 8}, "steps": steps, "seed": 1}
    response = client.post("/interpolate", json=body, headers={"accept": "image/gif"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/gif"
    gif = open_image(response.content, "GIF")
    assert getattr(gif, "n_frames", 1) == steps
    assert gif.size == (28, 28)
    frames = [np.asarray(f.convert("L")) for f in ImageSequence.Iterator(gif)]
    as_json = client.post("/interpolate", json=body, headers=JSON_ACCEPT).json()["images"]
    for frame, encoded in zip(frames, as_json, strict=True):
        np.testing.assert_array_equal(frame, decode_b64_png(encoded))


def test_interpolate_between_digits_blends_labels(client: TestClient) -> None:
    body = {"start": {"digit": 1}, "end": {"digit": 7}, "steps": 5, "seed": 8}
    response = client.post("/interpolate", json=body, headers=JSON_ACCEPT)
    payload = response.json()
    assert payload["seed"] == 8 and response.headers["x-seed"] == "8"
    assert payload["prior"] == "fitted" and response.headers["x-prior"] == "fitted"
    assert payload["digits"][0] == 1 and payload["digits"][-1] == 7
    # Digit-only ends share one noise vector, placed by each digit's fitted mixture.
    prior = client.app.state.service.registry.get(None).prior  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(8)
    noise = torch.randn(1, len(payload["latents"][0]), generator=generator)
    one = prior.sample(torch.tensor([1]), 1.0, generator, noise)[0]
    seven = prior.sample(torch.tensor([7]), 1.0, generator, noise)[0]
    latents = torch.tensor(payload["latents"])
    assert latents.shape == (5, len(one))
    torch.testing.assert_close(latents[0], one, atol=1e-5, rtol=0)
    torch.testing.assert_close(latents[-1], seven, atol=1e-5, rtol=0)
    images = [decode_b64_png(s) for s in payload["images"]]
    predictions = predicted_digits(client, [images[0], images[-1]])
    assert predictions == [1, 7]


def test_interpolate_between_digits_from_the_standard_prior_moves_the_label_alone(
    client: TestClient,
) -> None:
    body = {"start": {"digit": 1}, "end": {"digit": 7}, "steps": 5, "seed": 8}
    payload = client.post(
        "/interpolate", json={**body, "prior": "standard"}, headers=JSON_ACCEPT
    ).json()
    assert payload["prior"] == "standard"
    # Both ends are the one N(0, I) draw of the seed, as before fitted priors existed.
    shared = torch.randn(len(payload["latents"][0]), generator=torch.Generator().manual_seed(8))
    latents = np.array(payload["latents"])
    np.testing.assert_allclose(latents, np.broadcast_to(shared.numpy(), latents.shape), atol=1e-6)


def test_interpolate_frames_start_and_end_at_the_given_latents(
    client: TestClient, latent_dim: int
) -> None:
    generator = torch.Generator().manual_seed(5)
    z0, z1 = torch.randn(2, latent_dim, generator=generator).tolist()
    body = {
        "start": {"z": z0, "digit": 2},
        "end": {"z": z1, "digit": 5},
        "steps": 5,
        "method": "linear",
    }
    payload = client.post("/interpolate", json=body, headers=JSON_ACCEPT).json()
    latents = np.array(payload["latents"])
    np.testing.assert_allclose(latents[0], z0, atol=1e-5)
    np.testing.assert_allclose(latents[-1], z1, atol=1e-5)
    np.testing.assert_allclose(latents[2], (np.array(z0) + np.array(z1)) / 2, atol=1e-5)
    first = decode_b64_png(payload["images"][0])
    last = decode_b64_png(payload["images"][-1])
    decoded = client.post("/decode", json={"z": [z0, z1], "digit": [2, 5]}, headers=JSON_ACCEPT)
    start_image, end_image = (decode_b64_png(s) for s in decoded.json()["images"])
    assert np.abs(first.astype(int) - start_image).max() <= 2
    assert np.abs(last.astype(int) - end_image).max() <= 2


def test_interpolate_slerp_differs_from_linear(client: TestClient, latent_dim: int) -> None:
    generator = torch.Generator().manual_seed(6)
    z0, z1 = torch.randn(2, latent_dim, generator=generator).tolist()
    ends = {"start": {"z": z0, "digit": 4}, "end": {"z": z1, "digit": 4}, "steps": 5}
    linear = client.post("/interpolate", json={**ends, "method": "linear"}, headers=JSON_ACCEPT)
    slerp = client.post("/interpolate", json={**ends, "method": "slerp"}, headers=JSON_ACCEPT)
    linear_mid = np.array(linear.json()["latents"][2])
    slerp_mid = np.array(slerp.json()["latents"][2])
    # slerp keeps the norm of the ends; the straight line cuts inside the sphere.
    assert np.linalg.norm(slerp_mid) > np.linalg.norm(linear_mid)
    np.testing.assert_allclose(slerp.json()["latents"][0], z0, atol=1e-4)


def test_interpolate_between_real_images(client: TestClient, mnist_test: MnistTest) -> None:
    images, labels = mnist_test
    a = png_of(images[int((labels == 0).nonzero()[0])])
    b = png_of(images[int((labels == 6).nonzero()[0])])
    body = {
        "start": {"image": base64.b64encode(a).decode()},
        "end": {"image": "data:image/png;base64," + base64.b64encode(b).decode()},
        "steps": 4,
    }
    payload = client.post("/interpolate", json=body, headers=JSON_ACCEPT).json()
    frames = [decode_b64_png(s) for s in payload["images"]]
    # The ends are the images' reconstructions: near their own image, far from the other.
    reconstructions = client.post("/reconstruct", files=files(a, b), headers=JSON_ACCEPT).json()
    first, last = (decode_b64_png(item["image"]) for item in reconstructions["items"])
    assert np.abs(frames[0].astype(int) - first).max() <= 2
    assert np.abs(frames[-1].astype(int) - last).max() <= 2
    assert mse(frames[0], pixels(a)) < mse(frames[0], pixels(b)) / 2
    assert mse(frames[-1], pixels(b)) < mse(frames[-1], pixels(a)) / 2


def test_interpolate_seed_reproduces_digit_endpoints(client: TestClient) -> None:
    body = {"start": {"digit": 2}, "end": {"digit": 3}, "steps": 3}
    drawn = client.post("/interpolate", json=body)
    seed = int(drawn.headers["x-seed"])
    again = client.post("/interpolate", json={**body, "seed": seed})
    assert again.content == drawn.content
    other = client.post("/interpolate", json={**body, "seed": seed + 1})
    assert other.content != drawn.content


# ---- /variations ----------------------------------------------------------------------------


def test_variations_default_grid(client: TestClient, mnist_test: MnistTest) -> None:
    images, _ = mnist_test
    response = client.post("/variations", files=files(png_of(images[0])), params={"seed": 1})
    assert response.status_code == 200
    grid = pixels(response.content)
    assert (grid.shape[1], grid.shape[0]) == grid_size(8, 8)
    assert response.headers["x-seed"] == "1"


def test_variations_scale_zero_is_the_reconstruction(
    client: TestClient, mnist_test: MnistTest
) -> None:
    images, _ = mnist_test
    upload = png_of(images[7])
    response = client.post(
        "/variations", files=files(upload), params={"n": 3, "scale": 0}, headers=JSON_ACCEPT
    )
    variations = [decode_b64_png(s) for s in response.json()["images"]]
    reconstruction = client.post("/reconstruct", files=files(upload), headers=JSON_ACCEPT)
    expected = decode_b64_png(reconstruction.json()["items"][0]["image"])
    for image in variations:
        assert np.abs(image.astype(int) - expected).max() <= 2


def test_variations_scale_spreads_the_draws(client: TestClient, mnist_test: MnistTest) -> None:
    images, _ = mnist_test
    upload = files(png_of(images[300]))
    payload = client.post(
        "/variations", files=upload, params={"n": 4, "scale": 3, "seed": 2}, headers=JSON_ACCEPT
    ).json()
    variations = [decode_b64_png(s) for s in payload["images"]]
    assert len({v.tobytes() for v in variations}) == 4
    # The conditional model keeps the predicted digit for every draw.
    assert len(set(payload["digits"])) == 1


def test_variations_seed_is_reproducible(client: TestClient, mnist_test: MnistTest) -> None:
    images, _ = mnist_test
    upload = files(png_of(images[500]))
    drawn = client.post("/variations", files=upload, params={"n": 4})
    seed = drawn.headers["x-seed"]
    again = client.post("/variations", files=upload, params={"n": 4, "seed": seed})
    assert again.content == drawn.content
    other = client.post("/variations", files=upload, params={"n": 4, "seed": int(seed) + 1})
    assert other.content != drawn.content


# ---- the noise behind /sample and /variations, reproduced through /decode ------------------


def decoded(client: TestClient, z: torch.Tensor, digit: int) -> list[np.ndarray]:
    """POST /decode of the latents `z` (N, L) as digit `digit`: the N images."""
    response = client.post("/decode", json={"z": z.tolist(), "digit": digit}, headers=JSON_ACCEPT)
    assert response.status_code == 200
    return [decode_b64_png(s) for s in response.json()["images"]]


def assert_same_images(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert np.abs(a.astype(int) - b).max() <= 1


def test_sample_temperature_multiplies_the_prior_draw(client: TestClient, latent_dim: int) -> None:
    # z = temperature * N(0, I) from the request's seed: the images are those latents decoded
    # (the fitted prior's temperature is tested with the prior, tests/models/test_prior.py).
    for temperature in (0.1, 1.0, 2.0):
        params = {"n": 4, "seed": 9, "digit": 3, "temperature": temperature, "prior": "standard"}
        body = client.post("/sample", params=params, headers=JSON_ACCEPT).json()
        z = temperature * torch.randn(4, latent_dim, generator=torch.Generator().manual_seed(9))
        assert_same_images([decode_b64_png(s) for s in body["images"]], decoded(client, z, 3))


def test_variations_draw_around_the_posterior_mean_with_its_std_times_scale(
    client: TestClient, mnist_test: MnistTest, latent_dim: int
) -> None:
    # z = mu + scale * exp(logvar / 2) * N(0, I) from the seed, mu and logvar as /encode
    # reports them: the std, not the variance exp(logvar).
    images, _ = mnist_test
    upload = png_of(images[300])
    (item,) = client.post("/encode", files=files(upload)).json()["items"]
    mu, logvar = torch.tensor(item["mu"]), torch.tensor(item["logvar"])
    for scale in (0.5, 3.0):
        params = {"n": 4, "scale": scale, "seed": 2}
        body = client.post(
            "/variations", files=files(upload), params=params, headers=JSON_ACCEPT
        ).json()
        assert body["digits"] == [item["digit"]] * 4
        noise = torch.randn(4, latent_dim, generator=torch.Generator().manual_seed(2))
        z = mu + scale * torch.exp(0.5 * logvar) * noise
        got = [decode_b64_png(s) for s in body["images"]]
        assert_same_images(got, decoded(client, z, item["digit"]))
