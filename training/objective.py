"""The training loss: the negative ELBO with a linear KL warm-up and optional free bits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import VAE, VAEOutput
from training.data import random_shift
from training.trainer import StepOutput


@dataclass
class ObjectiveTerms:
    """The loss of one batch and its parts, all means over the batch (nats per image)."""

    loss: Tensor  # (): reconstruction + kl_weight * (free-bits) KL, what the optimiser minimises
    reconstruction: Tensor  # (): mean -log p(x | z), detached
    kl: Tensor  # (): mean KL(q(z | x) || p(z)) without free bits, detached
    kl_weight: float  # beta_t used for this batch


def kl_weight(step: int, warmup_steps: int, beta: float) -> float:
    """beta_t: rises linearly from 0 at step 0 to beta at warmup_steps, then stays at beta."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)


def negative_elbo(output: VAEOutput, kl_weight: float, free_bits: float = 0.0) -> ObjectiveTerms:
    """mean_b recon_b + kl_weight * sum_d max(free_bits, mean_b KL_bd).

    With free_bits = 0 the KL term is the plain batch-mean KL, so at kl_weight = 1 the loss is
    the batch-mean negative ELBO. Free bits stop penalising a latent dimension once its average
    KL falls below free_bits nats, which keeps dimensions from collapsing onto the prior.
    """
    reconstruction = output.reconstruction_nll.float().mean()
    kl_per_dim = output.kl_per_dim.float().mean(0)  # (L,)
    kl_term = kl_per_dim.clamp_min(free_bits).sum() if free_bits > 0 else kl_per_dim.sum()
    return ObjectiveTerms(
        loss=reconstruction + kl_weight * kl_term,
        reconstruction=reconstruction.detach(),
        kl=output.kl.float().mean().detach(),
        kl_weight=kl_weight,
    )


# The digit head sees each batch moved by up to this many pixels (the VAE sees it unmoved):
# on 3.6k digits the head otherwise learns the training set by heart.
HEAD_MAX_SHIFT = 2


def digit_head_loss(model: VAE, x: Tensor, y: Tensor) -> Tensor | None:
    """Cross-entropy of the model's digit head q(y | x) on labelled x, randomly shifted, () in
    nats, or None for a model without one. The head shares no weights with the VAE, so with Adam
    its weight in the sum does not matter: 1. The shifts come from torch's global generator,
    which the trainer seeds and restores on resume."""
    if model.digit_head is None:
        return None
    shifted = random_shift(x, HEAD_MAX_SHIFT, torch.default_generator)
    return F.cross_entropy(model.digit_logits(shifted).float(), y)


class VAEObjective:
    """The Trainer's loss function for a VAE: one reparameterised pass, negative ELBO with a KL
    warm-up counted in optimiser steps."""

    def __init__(
        self, beta: float, kl_warmup_epochs: float, steps_per_epoch: int, free_bits: float = 0.0
    ) -> None:
        self.beta = beta
        self.warmup_steps = round(kl_warmup_epochs * steps_per_epoch)
        self.free_bits = free_bits

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, step: int) -> StepOutput:
        if not isinstance(model, VAE):
            raise TypeError(f"VAEObjective trains a models.VAE, got {type(model).__name__}")
        labels = y if model.config.conditional else None
        terms = negative_elbo(
            model(x, labels), kl_weight(step, self.warmup_steps, self.beta), self.free_bits
        )
        logs: dict[str, Tensor | float] = {
            "recon": terms.reconstruction,
            "kl": terms.kl,
            "beta": terms.kl_weight,
        }
        head = digit_head_loss(model, x, y)
        if head is None:
            return StepOutput(loss=terms.loss, logs=logs)
        return StepOutput(loss=terms.loss + head, logs={**logs, "head_ce": head.detach()})
