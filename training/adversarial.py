"""CVAE-GAN training (Bao et al. 2017): a loss that trains D and C beside a conditional VAE.

The Trainer stays model-agnostic: AdversarialObjective is its loss function. Each call first
gives the discriminator D and the classifier C one optimiser step of their own on the batch
(real digits against detached reconstructions and prior samples), then returns the VAE's loss

    negative ELBO + w_t * (lambda_adv * L_adv + lambda_cls * L_cls)

- L_adv, the generator loss: feature matching on D's penultimate layer, the squared distance
  between the batch means of D's features on real digits and on reconstructions, plus the same
  for prior samples (Salimans et al. 2016). CVAE-GAN uses it instead of the minimax loss to
  keep the generator from chasing a discriminator that changes every step. In a short trial,
  adding the non-saturating loss on D's logit drew broken strokes and fewer recognisable
  digits, so it is left out.
- L_cls: C's cross-entropy on generated digits against the digit they were drawn for, so a
  conditional sample looks like its digit to a classifier trained on real digits only.
- w_t: 0 for the first `adversarial_start_epochs` (the decoder must draw digits and D and C
  must have learnt something before their verdicts mean anything), then a linear ramp to 1 over
  `adversarial_ramp_epochs`, so the switch-on does not jolt the decoder.

D and C live beside the VAE, never in its checkpoint: model.safetensors stays the plain VAE the
service loads. A run keeps them in train_state/last/adversary.safetensors and their optimisers
in state.pt, so --resume continues exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from models import VAE
from models.adversarial import Classifier, CriticConfig, Discriminator
from training.config import ConfigError, TrainConfig
from training.data import NUM_CLASSES
from training.objective import VAEObjective, digit_head_loss, kl_weight, negative_elbo
from training.trainer import StepOutput

ADVERSARY_FILE = "adversary.safetensors"
ADVERSARY_FORMAT = "vae-serve-adversary/1"
# Target of D for real digits: one-sided label smoothing keeps D from growing overconfident on a
# small training set, which would saturate its logits and starve the generator of gradient.
_REAL_TARGET = 0.9
# Adam's beta1 for D: 0.5, the usual GAN setting; momentum 0.9 lags behind a moving generator.
_DISCRIMINATOR_BETAS = (0.5, 0.999)


@dataclass(frozen=True)
class AdversarialSettings:
    """The adversarial knobs of a TrainConfig, with epochs turned into optimiser steps."""

    lambda_adv: float
    lambda_cls: float
    discriminator_lr: float
    classifier_lr: float
    start_steps: int
    ramp_steps: int

    @classmethod
    def from_config(cls, config: TrainConfig, steps_per_epoch: int) -> AdversarialSettings:
        return cls(
            lambda_adv=config.lambda_adv,
            lambda_cls=config.lambda_cls,
            discriminator_lr=config.discriminator_lr,
            classifier_lr=config.classifier_lr,
            start_steps=round(config.adversarial_start_epochs * steps_per_epoch),
            ramp_steps=round(config.adversarial_ramp_epochs * steps_per_epoch),
        )


def adversarial_weight(step: int, start_steps: int, ramp_steps: int) -> float:
    """w_t: 0 before start_steps, then rising linearly to 1 over ramp_steps."""
    if step < start_steps:
        return 0.0
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - start_steps + 1) / ramp_steps)


def feature_matching(real: Tensor, fake: Tensor) -> Tensor:
    """Squared distance between the batch means of features (B, F) and (B', F): ()."""
    return (real.mean(0) - fake.mean(0)).pow(2).sum()


class AdversarialObjective:
    """The Trainer's loss function for a CVAE-GAN: trains D and C, returns the VAE's loss."""

    def __init__(
        self,
        elbo: VAEObjective,
        discriminator: Discriminator,
        classifier: Classifier,
        settings: AdversarialSettings,
    ) -> None:
        self.elbo = elbo
        self.discriminator = discriminator
        self.classifier = classifier
        self.settings = settings
        self.discriminator_optimizer = torch.optim.Adam(
            discriminator.parameters(), lr=settings.discriminator_lr, betas=_DISCRIMINATOR_BETAS
        )
        self.classifier_optimizer = torch.optim.Adam(
            classifier.parameters(), lr=settings.classifier_lr
        )

    @classmethod
    def for_run(
        cls, config: TrainConfig, steps_per_epoch: int, device: torch.device
    ) -> AdversarialObjective:
        """D and C for `config`'s run, freshly initialised from the global RNG (after the VAE)."""
        critic_config = CriticConfig(num_classes=NUM_CLASSES)
        return cls(
            VAEObjective(config.beta, config.kl_warmup_epochs, steps_per_epoch, config.free_bits),
            Discriminator(critic_config).to(device),
            Classifier(critic_config).to(device),
            AdversarialSettings.from_config(config, steps_per_epoch),
        )

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, step: int) -> StepOutput:
        if not isinstance(model, VAE) or not model.config.conditional:
            raise TypeError("AdversarialObjective trains a conditional models.VAE")
        output = model(x, y)
        terms = negative_elbo(
            output, kl_weight(step, self.elbo.warmup_steps, self.elbo.beta), self.elbo.free_bits
        )
        # Prior samples for the digits of this batch, drawn like the service draws them.
        z = torch.randn_like(output.z)
        generated = torch.cat([output.reconstruction, model.decode(z, y)])  # (2B, 1, 28, 28)
        critic_logs, real_features = self._train_critics(x, y, generated.detach())

        weight = adversarial_weight(step, self.settings.start_steps, self.settings.ramp_steps)
        logs: dict[str, Tensor | float] = {
            "recon": terms.reconstruction,
            "kl": terms.kl,
            "beta": terms.kl_weight,
            **critic_logs,
            "adv_weight": weight,
        }
        loss = terms.loss
        head = digit_head_loss(model, x, y)
        if head is not None:
            loss = loss + head
            logs["head_ce"] = head.detach()
        if weight == 0.0:
            return StepOutput(loss=loss, logs=logs)
        adversarial, classification = self.generator_terms(real_features, generated, y)
        loss = loss + weight * (
            self.settings.lambda_adv * adversarial + self.settings.lambda_cls * classification
        )
        logs |= {"g_adv": adversarial.detach(), "g_cls": classification.detach()}
        return StepOutput(loss=loss, logs=logs)

    def generator_terms(
        self, real_features: Tensor, generated: Tensor, y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(L_adv, L_cls) of generated = reconstructions and prior samples (2B, 1, 28, 28) of the
        digits y (B,), given D's features of the real batch (B, F). D and C are frozen here
        (requires_grad off), so only the VAE gets gradients."""
        reconstructed, sampled = self.discriminator(generated).features.chunk(2)  # (B, F) each
        adversarial = feature_matching(real_features, reconstructed) + feature_matching(
            real_features, sampled
        )
        classification = F.cross_entropy(self.classifier(generated).logits, torch.cat([y, y]))
        return adversarial, classification

    def _train_critics(
        self, x: Tensor, y: Tensor, generated: Tensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        """One Adam step of D (real x against `generated`) and of C (the digits of real x).
        Returns their logs and D's features of x (B, F), detached, for feature matching: taken
        before D's step, which saves a pass and lags D by one step only."""
        self.discriminator.requires_grad_(True)
        self.classifier.requires_grad_(True)
        real = self.discriminator(x)
        real_logits = real.logits  # (B,)
        fake_logits = self.discriminator(generated).logits  # (2B,)
        discriminator_loss = F.binary_cross_entropy_with_logits(
            real_logits, torch.full_like(real_logits, _REAL_TARGET)
        ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        # C learns from real digits only: trained on the generator's output too, it would learn
        # to recognise the generator's mistakes instead of judging them.
        classifier_logits = self.classifier(x).logits
        classifier_loss = F.cross_entropy(classifier_logits, y)
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        self.classifier_optimizer.zero_grad(set_to_none=True)
        # The Trainer calls this loss under bf16 autocast when --amp is on; a backward pass is
        # meant to run outside of it.
        with torch.autocast(x.device.type, enabled=False):
            (discriminator_loss + classifier_loss).backward()
        self.discriminator_optimizer.step()
        self.classifier_optimizer.step()
        self.discriminator.requires_grad_(False)
        self.classifier.requires_grad_(False)
        logs = {
            "d_loss": discriminator_loss.detach(),
            "d_real": torch.sigmoid(real_logits.detach()).mean(),
            "d_fake": torch.sigmoid(fake_logits.detach()).mean(),
            "c_loss": classifier_loss.detach(),
        }
        return logs, real.features.detach()

    # ---- resumable state ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The optimisers of D and C (their weights go to adversary.safetensors): for state.pt,
        readable with torch.load(..., weights_only=True)."""
        return {
            "discriminator_optimizer": self.discriminator_optimizer.state_dict(),
            "classifier_optimizer": self.classifier_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        self.classifier_optimizer.load_state_dict(state["classifier_optimizer"])

    def files(self) -> dict[str, bytes]:
        """adversary.safetensors: the weights of D and C, with their CriticConfig."""
        return {ADVERSARY_FILE: adversary_bytes(self.discriminator, self.classifier)}

    def load_files(self, folder: Path) -> None:
        """Load D's and C's weights from folder/adversary.safetensors into the networks in
        place: building new ones would draw their initial weights from the global RNG, which
        a resume has just restored."""
        path = folder / ADVERSARY_FILE
        config, weights = read_adversary(path)
        if config != self.discriminator.config:
            raise ConfigError(
                f"--resume: {path} holds critics of another shape "
                f"({config} != {self.discriminator.config}); start a new run"
            )
        _load_weights(path, self.discriminator, self.classifier, weights)


def adversary_bytes(discriminator: Discriminator, classifier: Classifier) -> bytes:
    """D's and C's weights as one safetensors file, prefixed `discriminator.` / `classifier.`."""
    tensors = {
        f"{prefix}.{name}": value.detach().contiguous().cpu()
        for prefix, network in (("discriminator", discriminator), ("classifier", classifier))
        for name, value in network.state_dict().items()
    }
    metadata = {
        "format": ADVERSARY_FORMAT,
        "critic_config": json.dumps(discriminator.config.to_dict()),
    }
    return save_safetensors(tensors, metadata=metadata)


def read_adversary(path: Path) -> tuple[CriticConfig, dict[str, Tensor]]:
    """The CriticConfig and the tensors of an adversary.safetensors; ConfigError names the file
    when it is unusable."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        config = CriticConfig.from_dict(json.loads(metadata["critic_config"]))
    except (OSError, SafetensorError, KeyError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"cannot read {path} ({type(exc).__name__}: {exc}); start a new run without --resume"
        ) from exc
    return config, tensors


def load_adversary(
    path: Path, device: str | torch.device = "cpu"
) -> tuple[Discriminator, Classifier]:
    """D and C rebuilt from an adversary.safetensors alone."""
    config, weights = read_adversary(path)
    discriminator, classifier = Discriminator(config), Classifier(config)
    _load_weights(path, discriminator, classifier, weights)
    return discriminator.to(device), classifier.to(device)


def _load_weights(
    path: Path, discriminator: Discriminator, classifier: Classifier, weights: dict[str, Tensor]
) -> None:
    for prefix, network in (("discriminator", discriminator), ("classifier", classifier)):
        state = {
            name.removeprefix(f"{prefix}."): value
            for name, value in weights.items()
            if name.startswith(f"{prefix}.")
        }
        try:
            network.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(
                f"{path}: the {prefix} weights do not match its config ({exc}); "
                "start a new run without --resume"
            ) from exc
