"""The fitted latent prior: sampling, density, persistence and the checks on a damaged file."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from models import VAE, CheckpointError, VAEConfig
from models.prior import PRIOR_FILE, GaussianMixturePrior, load_prior


def make_prior(groups: int = 3, components: int = 2, dim: int = 4) -> GaussianMixturePrior:
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(groups, components, generator=g) + 0.1
    weights[0, 1:] = 0.0  # group 0 uses one component only, as a BIC fit may choose
    weights /= weights.sum(1, keepdim=True)
    means = 5 * torch.randn(groups, components, dim, generator=g)
    raw = torch.randn(groups, components, dim, dim, generator=g)
    covariance = raw @ raw.transpose(-1, -2) + 0.5 * torch.eye(dim)
    return GaussianMixturePrior(weights, means, torch.linalg.cholesky(covariance), {"note": "t"})


def test_samples_follow_the_group_mixture() -> None:
    prior = make_prior()
    groups = torch.tensor([0] * 4000 + [2] * 4000)
    z = prior.sample(groups, generator=torch.Generator().manual_seed(1))
    assert z.shape == (8000, 4)
    # Group 0 has one component: its draws have that component's mean and covariance.
    first = z[:4000]
    assert torch.allclose(first.mean(0), prior.means[0, 0], atol=0.2)
    covariance = prior.scale_tril[0, 0] @ prior.scale_tril[0, 0].T
    assert torch.allclose(torch.cov(first.T), covariance, atol=0.25 * float(covariance.max()))
    # Group 2 has two: the mixture mean is their weighted mean.
    expected = (prior.weights[2, :, None] * prior.means[2]).sum(0)
    assert torch.allclose(z[4000:].mean(0), expected, atol=0.3)


def test_temperature_scales_the_spread_around_the_component_mean() -> None:
    prior = make_prior()
    groups = torch.zeros(4000, dtype=torch.long)
    hot = prior.sample(groups, 1.0, torch.Generator().manual_seed(3))
    cool = prior.sample(groups, 0.5, torch.Generator().manual_seed(3))
    centre = prior.means[0, 0]
    # Same seed, same noise: every cool draw is exactly halfway between the mean and the hot one.
    assert torch.allclose(cool - centre, 0.5 * (hot - centre), atol=1e-5)


def test_a_seed_reproduces_the_draws_and_another_does_not() -> None:
    prior = make_prior()
    groups = torch.tensor([0, 1, 2, 1])
    a = prior.sample(groups, 0.8, torch.Generator().manual_seed(7))
    b = prior.sample(groups, 0.8, torch.Generator().manual_seed(7))
    c = prior.sample(groups, 0.8, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_given_noise_replaces_the_normal_draw() -> None:
    prior = make_prior(groups=2, components=1)
    noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    z = prior.sample(torch.tensor([0, 1]), 1.0, torch.Generator().manual_seed(0), noise)
    expected = prior.means[:, 0] + (prior.scale_tril[:, 0] @ noise[:, :, None])[:, :, 0]
    assert torch.allclose(z, expected, atol=1e-5)


def test_log_prob_is_the_mixture_density() -> None:
    prior = make_prior()
    z = torch.randn(10, 4, generator=torch.Generator().manual_seed(2)) * 4
    groups = torch.tensor([0, 1, 2] * 3 + [1])
    ours = prior.log_prob(z, groups)
    for i, g in enumerate(groups.tolist()):
        used = prior.weights[g] > 0
        reference = MixtureSameFamily(
            Categorical(probs=prior.weights[g][used]),
            MultivariateNormal(prior.means[g][used], scale_tril=prior.scale_tril[g][used]),
        ).log_prob(z[i])
        assert math.isclose(float(ours[i]), float(reference), rel_tol=1e-4, abs_tol=1e-4)


def test_bad_arguments_are_refused() -> None:
    prior = make_prior()
    with pytest.raises(ValueError, match="temperature"):
        prior.sample(torch.tensor([0]), 0.0)
    with pytest.raises(ValueError, match=r"groups must be in 0\.\.2"):
        prior.sample(torch.tensor([3]))
    with pytest.raises(ValueError, match="noise must be"):
        prior.sample(torch.tensor([0]), noise=torch.zeros(1, 3))
    bad = make_prior()
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixturePrior(bad.weights * 2, bad.means, bad.scale_tril, {})
    with pytest.raises(ValueError, match="positive diagonal"):
        GaussianMixturePrior(bad.weights, bad.means, -bad.scale_tril, {})
    with pytest.raises(ValueError, match="non-finite"):
        GaussianMixturePrior(bad.weights, bad.means * float("nan"), bad.scale_tril, {})


def test_export_round_trip_and_summary(tmp_path: Path) -> None:
    prior = make_prior()
    data, card = prior.export()
    assert card["sha256"] == hashlib.sha256(data).hexdigest()
    assert card["components"] == [1, 2, 2] and card["groups"] == 3 and card["note"] == "t"
    (tmp_path / PRIOR_FILE).write_bytes(data)
    loaded = load_prior(tmp_path, latent_dim=4, groups=3, expected_sha256=card["sha256"])
    assert loaded is not None
    for name in ("weights", "means", "scale_tril"):
        assert torch.equal(getattr(loaded, name), getattr(prior, name))
    assert loaded.info == prior.info


def test_a_checkpoint_without_a_prior_has_none(tmp_path: Path) -> None:
    assert load_prior(tmp_path, latent_dim=4, groups=3) is None


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "not a fitted prior"),
        ("sha", "sha256 does not match"),
        ("dims", "fitted for 3 group"),
    ],
)
def test_a_damaged_prior_is_a_checkpoint_error(tmp_path: Path, damage: str, message: str) -> None:
    data, card = make_prior().export()
    sha = card["sha256"]
    if damage == "truncate":
        data, sha = data[: len(data) // 2], hashlib.sha256(data[: len(data) // 2]).hexdigest()
    elif damage == "sha":
        sha = "0" * 64
    (tmp_path / PRIOR_FILE).write_bytes(data)
    groups = 10 if damage == "dims" else 3
    with pytest.raises(CheckpointError, match=message) as caught:
        load_prior(tmp_path, latent_dim=4, groups=groups, expected_sha256=sha)
    assert "retrain, or delete the file" in str(caught.value)


def test_vae_sample_with_a_fitted_prior_decodes_its_latents() -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig(hidden_dims=(8, 16), latent_dim=4)).eval()
    prior = make_prior(groups=10, components=2)
    labels = torch.tensor([3, 3, 7])
    samples = model.sample(3, labels, 1.0, torch.Generator().manual_seed(5), prior)
    expected = prior.sample(labels, 1.0, torch.Generator().manual_seed(5))
    assert torch.allclose(samples.latents, expected)
    assert torch.allclose(samples.images, model.decode(expected, labels))
    assert torch.equal(samples.labels, labels)


def test_candidates_scale_each_draw_around_its_own_component() -> None:
    """The served draws (candidates) of a two-component group at temperature 0.5 are, with the
    same seed, exactly halfway between their component's mean and the draws at 1.0."""
    prior = make_prior(groups=3, components=2)
    groups = torch.full((2000,), 2)
    hot = prior.candidates(groups, 1.0, torch.Generator().manual_seed(4), rounds=3)
    cool = prior.candidates(groups, 0.5, torch.Generator().manual_seed(4), rounds=3)
    # cool = mean + (hot - mean) / 2, so 2 * cool - hot is the mean of the component drawn.
    centres = (2 * cool - hot).reshape(-1, 4)
    distance = torch.cdist(centres, prior.means[2])  # (N * R, 2)
    assert float(distance.min(1).values.max()) < 0.02  # float32 rounding of |z| ~ 10
    # Both components are drawn, each about as often as its weight says.
    share = float((distance.argmin(1) == 1).double().mean())
    assert abs(share - float(prior.weights[2, 1])) < 0.03
    # And the spread around the component is halved.
    spread_hot = (hot.reshape(-1, 4) - centres).std()
    assert float((cool.reshape(-1, 4) - centres).std()) == pytest.approx(0.5 * float(spread_hot))
