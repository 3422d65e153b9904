"""Shapes, probabilities and determinism of the VAE on seeded inputs (untrained, tiny configs)."""

from __future__ import annotations

import math

import pytest
import torch

from models import VAE, VAEConfig

CONFIGS = {
    "mlp": VAEConfig(architecture="mlp", hidden_dims=(64, 32), latent_dim=4, num_classes=None),
    "mlp-cond": VAEConfig(architecture="mlp", hidden_dims=(64, 32), latent_dim=4, num_classes=10),
    "conv": VAEConfig(architecture="conv", hidden_dims=(8, 16), latent_dim=4, num_classes=None),
    "conv-cond": VAEConfig(architecture="conv", hidden_dims=(8, 16), latent_dim=4, num_classes=10),
    "conv-cond-residual": VAEConfig(
        architecture="conv", hidden_dims=(8, 16), latent_dim=4, num_classes=10, decoder_blocks=2
    ),
    "conv-gauss": VAEConfig(
        architecture="conv", hidden_dims=(8, 16), latent_dim=4, likelihood="gaussian"
    ),
    "mlp-gauss-fixed": VAEConfig(
        architecture="mlp",
        hidden_dims=(32,),
        latent_dim=3,
        num_classes=None,
        likelihood="gaussian",
        gaussian_std=0.2,
    ),
}


def make(name: str) -> VAE:
    torch.manual_seed(0)
    return VAE(CONFIGS[name]).eval()


def batch(config: VAEConfig, n: int = 6) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g) if config.conditional else None
    return x, y


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_and_dtypes(name: str) -> None:
    model = make(name)
    cfg = model.config
    x, y = batch(cfg)
    with torch.no_grad():
        out = model(x, y)
    assert out.reconstruction.shape == (6, 1, 28, 28)
    assert out.reconstruction.dtype == torch.float32
    assert float(out.reconstruction.min()) >= 0 and float(out.reconstruction.max()) <= 1
    assert out.z.shape == (6, cfg.latent_dim)
    assert out.posterior.mean.shape == out.posterior.logvar.shape == (6, cfg.latent_dim)
    assert out.reconstruction_nll.shape == out.kl.shape == (6,)
    assert out.kl_per_dim.shape == (6, cfg.latent_dim)
    assert model.decode(out.z, y).shape == (6, 1, 28, 28)
    assert model.elbo(x, y, k=3).shape == (6,)
    assert model.log_likelihood(x, y, k=4).shape == (6,)
    samples = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert samples.images.shape == (5, 1, 28, 28)
    assert samples.latents.shape == (5, cfg.latent_dim)
    assert (samples.labels is None) == (not cfg.conditional)


@pytest.mark.parametrize("name", CONFIGS)
def test_kl_is_non_negative_and_zero_at_the_prior(name: str) -> None:
    model = make(name)
    x, y = batch(model.config)
    posterior = model.encode(x, y)
    assert bool((posterior.kl() >= 0).all())
    assert bool((posterior.kl_per_dim() >= 0).all())
    prior = type(posterior)(torch.zeros(2, 5), torch.zeros(2, 5))
    assert torch.allclose(prior.kl(), torch.zeros(2))


@pytest.mark.parametrize("name", ["mlp", "conv-cond"])
def test_elbo_is_below_the_iwae_estimate_on_average(name: str) -> None:
    model = make(name)
    x, y = batch(model.config, n=16)
    g = torch.Generator().manual_seed(3)
    elbo = model.elbo(x, y, k=50, generator=g).mean()
    iwae = model.log_likelihood(x, y, k=50, generator=g).mean()
    assert float(elbo) <= float(iwae)


def test_iwae_chunks_estimate_the_same_quantity() -> None:
    model = make("conv")
    x, _ = batch(model.config)
    whole = model.log_likelihood(x, k=400, generator=torch.Generator().manual_seed(0), chunk=400)
    chunked = model.log_likelihood(x, k=400, generator=torch.Generator().manual_seed(1), chunk=7)
    assert torch.allclose(whole, chunked, atol=0.5)


def test_label_marginal_is_a_log_mean_exp_over_digits() -> None:
    model = make("mlp-cond")
    x, _ = batch(model.config)
    # The marginal walks the digits in order, drawing from one generator: replay that by hand.
    g = torch.Generator().manual_seed(0)
    per_digit = torch.stack([model.elbo(x, torch.full((6,), d), generator=g) for d in range(10)])
    marginal = model.elbo(x, generator=torch.Generator().manual_seed(0))
    expected = torch.logsumexp(per_digit, dim=0) - math.log(10)
    assert torch.allclose(marginal, expected, atol=1e-4)


def test_predict_digit_is_a_distribution_and_deterministic() -> None:
    model = make("conv-cond")
    x, _ = batch(model.config)
    a, b = model.predict_digit(x), model.predict_digit(x)
    assert a.probabilities.shape == (6, 10)
    assert torch.allclose(a.probabilities.sum(1), torch.ones(6))
    assert torch.equal(a.digit, b.digit) and torch.equal(a.probabilities, b.probabilities)
    with pytest.raises(ValueError, match="conditional"):
        make("conv").predict_digit(x)


@pytest.mark.parametrize("name", CONFIGS)
def test_seeded_sampling_is_bit_identical(name: str) -> None:
    model = make(name)
    a = model.sample(8, temperature=0.7, generator=torch.Generator().manual_seed(42))
    b = model.sample(8, temperature=0.7, generator=torch.Generator().manual_seed(42))
    c = model.sample(8, temperature=0.7, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
    if model.config.conditional:
        assert a.labels is not None and b.labels is not None
        assert torch.equal(a.labels, b.labels)


def test_conditional_sampling_honours_the_label() -> None:
    model = make("conv-cond")
    sevens = model.sample(4, y=torch.full((4,), 7), generator=torch.Generator().manual_seed(0))
    assert sevens.labels is not None and sevens.labels.tolist() == [7, 7, 7, 7]
    # The images are the decoder's for label 7 at those latents, not merely labelled 7.
    with torch.no_grad():
        as_seven = model.decode(sevens.latents, torch.full((4,), 7))
        as_three = model.decode(sevens.latents, torch.full((4,), 3))
    assert torch.allclose(sevens.images, as_seven)
    assert not torch.allclose(sevens.images, as_three, atol=1e-3)


def test_temperature_scales_the_prior() -> None:
    model = make("mlp")
    hot = model.sample(256, temperature=2.0, generator=torch.Generator().manual_seed(0))
    cold = model.sample(256, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hot.latents, 4 * cold.latents)


def test_label_errors_are_clear() -> None:
    cond, uncond = make("mlp-cond"), make("mlp")
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match="conditional"):
        cond.encode(x)
    with pytest.raises(ValueError, match="unconditional"):
        uncond.encode(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"0\.\.9"):
        cond.encode(x, torch.tensor([1, 10]))


def test_soft_labels_blend_between_digits() -> None:
    model = make("conv-cond")
    z = torch.randn(1, 4, generator=torch.Generator().manual_seed(0))
    three = model.decode(z, torch.tensor([3]))
    eight = model.decode(z, torch.tensor([8]))
    pure = torch.zeros(1, 10)
    pure[0, 3] = 1.0
    assert torch.allclose(model.decode(z, pure), three)
    half = torch.zeros(1, 10)
    half[0, 3] = half[0, 8] = 0.5
    mixed = model.decode(z, half)
    assert not torch.allclose(mixed, three) and not torch.allclose(mixed, eight)


@pytest.mark.parametrize("method", ["slerp", "linear"])
def test_interpolation_starts_and_ends_at_its_endpoints(method: str) -> None:
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(8, generator=g), torch.randn(8, generator=g)
    path = VAE.interpolate(z0, z1, 7, method)  # type: ignore[arg-type]
    assert path.shape == (7, 8)
    assert torch.allclose(path[0], z0, atol=1e-5) and torch.allclose(path[-1], z1, atol=1e-5)


def test_slerp_keeps_the_norm_between_equal_norm_endpoints() -> None:
    z0 = torch.tensor([3.0, 0.0])
    z1 = torch.tensor([0.0, 3.0])
    norms = VAE.interpolate(z0, z1, 5, "slerp").norm(dim=1)
    assert torch.allclose(norms, torch.full((5,), 3.0), atol=1e-5)
    # Linear interpolation cuts through the low-norm centre instead.
    assert float(VAE.interpolate(z0, z1, 5, "linear").norm(dim=1)[2]) == pytest.approx(
        3 / math.sqrt(2), rel=1e-5
    )


def test_interpolation_rejects_bad_arguments() -> None:
    z = torch.zeros(4)
    with pytest.raises(ValueError, match="steps"):
        VAE.interpolate(z, z, 1)
    with pytest.raises(ValueError, match="method"):
        VAE.interpolate(z, z, 3, "cubic")  # type: ignore[arg-type]


def test_anomaly_score_needs_a_reference_then_is_deterministic() -> None:
    from models import AnomalyNotCalibratedError

    model = make("conv-cond")
    x, _ = batch(model.config, n=40)
    with pytest.raises(AnomalyNotCalibratedError, match="fit_anomaly_reference"):
        model.anomaly_score(x)
    model.fit_anomaly_reference(x)
    a, b = model.anomaly_score(x), model.anomaly_score(x)
    assert a.score.shape == (40,) and bool((a.score >= 0).all())
    assert torch.equal(a.score, b.score)
    assert a.digit is not None and a.digit_probability is not None
    assert a.error_map.shape == a.reconstruction.shape == (40, 1, 28, 28)


def test_gradients_flow_through_the_reparameterisation() -> None:
    model = make("conv-gauss")
    x, y = batch(model.config)
    out = model(x, y)
    (out.reconstruction_nll + out.kl).mean().backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    assert model.log_std.grad is not None


def test_fixed_gaussian_std_is_not_learned() -> None:
    model = make("mlp-gauss-fixed")
    assert not model.log_std.requires_grad
    assert float(model.log_std.exp()) == pytest.approx(0.2)


def test_drawn_labels_are_the_ones_the_images_were_decoded_with() -> None:
    # Without y a conditional model draws labels: each image must be decoded with its own.
    model = make("conv-cond")
    drawn = model.sample(64, generator=torch.Generator().manual_seed(3))
    assert drawn.labels is not None and len(set(drawn.labels.tolist())) > 5
    with torch.no_grad():
        assert torch.allclose(drawn.images, model.decode(drawn.latents, drawn.labels))
        shifted = (drawn.labels + 1) % 10
        assert not torch.allclose(drawn.images, model.decode(drawn.latents, shifted), atol=1e-3)


def test_anomaly_score_is_a_mahalanobis_distance_from_the_reference() -> None:
    model = make("conv")
    reference = torch.rand(200, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    model.fit_anomaly_reference(reference)
    scores = model.anomaly_score(reference).score
    # Under a covariance fitted to these very points, the mean squared distance is at most
    # the number of statistics (3; less by the ridge): not a square, not a raw difference.
    assert 1.0 < float(scores.pow(2).mean()) <= 3.0
    assert float(scores.std()) > 0.1
    # Images unlike the reference (constant ones, for a reference of uniform noise) are far.
    far = model.anomaly_score(torch.ones(4, 1, 28, 28)).score
    assert float(far.min()) > 3 * float(scores.max())


def test_decoder_blocks_add_residual_depth_and_zero_keeps_the_plain_decoder() -> None:
    plain = VAE(CONFIGS["conv-cond"])
    deeper = VAE(CONFIGS["conv-cond-residual"])
    # 0 blocks: exactly the weight names (and so the checkpoints) of the decoder before the option.
    assert [n for n in plain.state_dict() if n.startswith("decoder.")] == [
        "decoder.project.weight",
        "decoder.project.bias",
        "decoder.upsample.1.weight",
        "decoder.upsample.1.bias",
        "decoder.upsample.3.weight",
        "decoder.upsample.3.bias",
    ]
    blocks = [m for m in deeper.decoder.modules() if type(m).__name__ == "ResidualBlock"]
    assert len(blocks) == 4  # two before each upsampling step
    # A block is a residual: with its last convolution zeroed it passes its input through.
    block = blocks[0]
    torch.nn.init.zeros_(block.body[-1].weight)
    torch.nn.init.zeros_(block.body[-1].bias)
    x = torch.randn(2, 16, 7, 7)
    assert torch.equal(block(x), x)
