"""Tests for training/objective.py: the KL warm-up ramp, free bits and the loss of a real VAE."""

from __future__ import annotations

import pytest
import torch

from models import VAE, DiagonalGaussian, VAEConfig, VAEOutput
from training.objective import VAEObjective, kl_weight, negative_elbo


def fake_output(reconstruction_nll: list[float], kl_per_dim: list[list[float]]) -> VAEOutput:
    kl = torch.tensor(kl_per_dim)
    batch, latent = kl.shape
    zeros = torch.zeros(batch, latent)
    return VAEOutput(
        posterior=DiagonalGaussian(zeros, zeros),
        z=zeros,
        reconstruction=torch.zeros(batch, 1, 28, 28),
        reconstruction_nll=torch.tensor(reconstruction_nll),
        kl=kl.sum(1),
        kl_per_dim=kl,
    )


def test_kl_weight_ramps_linearly_per_step_then_holds() -> None:
    assert [kl_weight(step, 4, beta=2.0) for step in range(7)] == [
        0.0,
        0.5,
        1.0,
        1.5,
        2.0,
        2.0,
        2.0,
    ]


def test_kl_weight_without_warmup_is_beta_from_the_first_step() -> None:
    assert kl_weight(0, 0, beta=0.7) == 0.7


def test_objective_counts_warmup_in_steps_of_the_given_epoch_length() -> None:
    objective = VAEObjective(beta=1.0, kl_warmup_epochs=2.5, steps_per_epoch=10)
    assert objective.warmup_steps == 25
    assert kl_weight(12, objective.warmup_steps, 1.0) == pytest.approx(0.48)


def test_negative_elbo_is_mean_reconstruction_plus_weighted_mean_kl() -> None:
    output = fake_output([10.0, 20.0], [[1.0, 2.0], [3.0, 4.0]])
    terms = negative_elbo(output, kl_weight=0.5)
    assert float(terms.reconstruction) == 15.0
    assert float(terms.kl) == 5.0
    assert float(terms.loss) == 15.0 + 0.5 * 5.0
    assert terms.kl_weight == 0.5


def test_free_bits_floor_each_dimensions_batch_mean_kl() -> None:
    # Batch-mean KL per dimension: [0.2, 3.0]; the first is below the 1-nat floor.
    output = fake_output([0.0, 0.0], [[0.1, 2.0], [0.3, 4.0]])
    terms = negative_elbo(output, kl_weight=1.0, free_bits=1.0)
    assert float(terms.loss) == pytest.approx(1.0 + 3.0)
    # The logged KL is the true KL, not the floored one.
    assert float(terms.kl) == pytest.approx(3.2)


def test_free_bits_stop_the_gradient_of_dimensions_below_the_floor() -> None:
    kl = torch.tensor([[0.1, 2.0], [0.3, 4.0]], requires_grad=True)
    output = fake_output([0.0, 0.0], [[0.0, 0.0], [0.0, 0.0]])
    output.kl_per_dim, output.kl = kl, kl.sum(1)
    negative_elbo(output, kl_weight=1.0, free_bits=1.0).loss.backward()
    assert kl.grad is not None
    assert kl.grad[:, 0].tolist() == [0.0, 0.0]
    assert kl.grad[:, 1].tolist() == [0.5, 0.5]


def test_vae_objective_equals_negative_elbo_after_warmup() -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig(architecture="mlp", hidden_dims=(32,), latent_dim=4))
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 10
    objective = VAEObjective(beta=1.0, kl_warmup_epochs=1, steps_per_epoch=5)

    torch.manual_seed(2)
    step = objective(model, x, y, step=5)
    torch.manual_seed(2)
    output = model(x, y)

    expected = (output.reconstruction_nll + output.kl).mean()
    assert step.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert step.logs["beta"] == 1.0
    assert step.loss.requires_grad
    assert set(step.logs) == {"recon", "kl", "beta"}


def seeded_loss(model: VAE, x: torch.Tensor, y: torch.Tensor) -> float:
    """The objective's loss on (x, y) with the reparameterisation noise of seed 2."""
    objective = VAEObjective(beta=1.0, kl_warmup_epochs=0, steps_per_epoch=1)
    torch.manual_seed(2)
    return objective(model, x, y, step=0).loss.item()


def test_vae_objective_ignores_labels_for_an_unconditional_model() -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig(architecture="mlp", hidden_dims=(16,), latent_dim=2, num_classes=None))
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    loss = seeded_loss(model, x, torch.tensor([1, 2, 3]))
    # The same as with any other labels, and as the model's own negative ELBO without them.
    assert loss == seeded_loss(model, x, torch.tensor([9, 9, 0]))
    torch.manual_seed(2)
    output = model(x)
    assert loss == pytest.approx((output.reconstruction_nll + output.kl).mean().item(), rel=1e-6)


def test_vae_objective_uses_the_labels_of_a_conditional_model() -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig(architecture="mlp", hidden_dims=(16,), latent_dim=2, num_classes=10))
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    loss = seeded_loss(model, x, torch.tensor([1, 2, 3]))
    assert loss != seeded_loss(model, x, torch.tensor([9, 9, 0]))
    torch.manual_seed(2)
    output = model(x, torch.tensor([1, 2, 3]))
    assert loss == pytest.approx((output.reconstruction_nll + output.kl).mean().item(), rel=1e-6)
