"""The VAE: encode, decode, sample, interpolate, likelihoods, digit prediction, anomaly score."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import VAEConfig
from models.distributions import DiagonalGaussian, standard_normal_log_prob
from models.networks import DigitHead, build_decoder, build_encoder

if TYPE_CHECKING:
    from models.prior import GaussianMixturePrior

LOG_2PI = math.log(2 * math.pi)
# The statistics of the anomaly score of checkpoints saved before VAEConfig.anomaly_statistics
# (models.config.ANOMALY_STATISTIC_NAMES lists every one a config may name).
ANOMALY_STATISTICS = ("log_squared_error", "log_kl", "mean_logvar")
ANOMALY_SCORE_KIND = "typicality-mahalanobis"
_STAT_EPS = 1e-3  # keeps log() finite for a perfect reconstruction or a zero KL
# Candidate latents per image when sampling the fitted prior with a digit check: a draw the
# digit head reads as another digit (~2% on mnist-5k) is replaced by the next candidate.
SAMPLE_ROUNDS = 4


class AnomalyNotCalibratedError(RuntimeError):
    """anomaly_score was called on a model whose reference statistics were never fitted."""


@dataclass
class VAEOutput:
    """One forward pass. B = batch, L = latent_dim; images are (B, 1, 28, 28)."""

    posterior: DiagonalGaussian
    z: Tensor  # (B, L): the reparameterised sample that was decoded
    reconstruction: Tensor  # (B, 1, 28, 28): pixel probabilities (bernoulli) or means (gaussian)
    reconstruction_nll: Tensor  # (B,): -log p(x | z) in nats
    kl: Tensor  # (B,): KL(q(z | x) || p(z)) in nats
    kl_per_dim: Tensor  # (B, L): the same KL per latent dimension (for free bits)


@dataclass
class Samples:
    """Prior draws: images (N, 1, 28, 28) in [0, 1], labels (N,) or None, latents z (N, L)."""

    images: Tensor
    labels: Tensor | None
    latents: Tensor


@dataclass
class DigitPrediction:
    """p(y | x) of a conditional VAE: digit (B,) is the argmax of probabilities (B, C)."""

    digit: Tensor
    probabilities: Tensor


@dataclass
class AnomalyResult:
    """Per-image anomaly evidence; higher score = more anomalous. Images are (B, 1, 28, 28)."""

    score: Tensor  # (B,)
    reconstruction: Tensor  # (B, 1, 28, 28): decoded posterior mean (at the predicted digit)
    error_map: Tensor  # (B, 1, 28, 28): squared pixel error, for heatmaps
    statistics: Tensor  # (B, S): the model's config.anomaly_statistics, in that order
    digit: Tensor | None  # (B,) predicted digit (conditional models)
    digit_probability: Tensor | None  # (B,) its probability p(y | x)


class VAE(nn.Module):
    """A (conditional) variational autoencoder for 28 x 28 grayscale digits in [0, 1]."""

    anomaly_center: Tensor  # (G, S): G = num_classes or 1 groups, S statistics
    anomaly_precision: Tensor  # (S, S): inverse of the pooled covariance
    anomaly_fitted: Tensor  # () bool

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config)
        self.decoder = build_decoder(config)
        self.digit_head = DigitHead(config) if config.digit_head else None
        if config.likelihood == "gaussian":
            log_std = math.log(config.gaussian_std) if config.gaussian_std else math.log(0.1)
            self.log_std = nn.Parameter(
                torch.tensor(log_std), requires_grad=config.gaussian_std is None
            )
        groups = config.num_classes or 1
        stats = len(config.anomaly_statistics)
        # Reference statistics of normal data, fitted after training (fit_anomaly_reference).
        self.register_buffer("anomaly_center", torch.zeros(groups, stats))
        self.register_buffer("anomaly_precision", torch.eye(stats))
        self.register_buffer("anomaly_fitted", torch.zeros((), dtype=torch.bool))

    # ---- building blocks -------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _label(self, y: Tensor | None, batch: int) -> Tensor | None:
        """Int labels (B,) or soft labels (B, C) -> float (B, C); None when unconditional."""
        c = self.config.num_classes
        if c is None:
            if y is not None:
                raise ValueError("this VAE is unconditional: pass y=None")
            return None
        if y is None:
            raise ValueError("this VAE is conditional: pass a digit label y")
        if y.dim() == 1:
            if y.dtype.is_floating_point:
                raise ValueError("integer labels must have an integer dtype")
            if int(y.min()) < 0 or int(y.max()) >= c:
                raise ValueError(f"labels must be in 0..{c - 1}")
            y = F.one_hot(y.long(), c)
        if y.shape != (batch, c):
            raise ValueError(f"labels must be (B,) ints or (B, {c}) weights, got {tuple(y.shape)}")
        return y.to(device=self.device, dtype=self._dtype)

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode(self, x: Tensor, y: Tensor | None = None) -> DiagonalGaussian:
        """x (B, 1, 28, 28) in [0, 1] -> q(z | x, y) with mean and logvar (B, L)."""
        mean, logvar = self.encoder(x, self._label(y, x.shape[0]))
        return DiagonalGaussian(mean, logvar)

    def decode_raw(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """z (B, L) -> logits (bernoulli) or pre-sigmoid means (gaussian), (B, 1, 28, 28)."""
        out: Tensor = self.decoder(z, self._label(y, z.shape[0]))
        return out

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """z (B, L) -> the images the model shows, in [0, 1], (B, 1, 28, 28): its pixel
        probabilities (bernoulli) or means (gaussian) at config.decoder_temperature."""
        return torch.sigmoid(self.decode_raw(z, y) / self.config.decoder_temperature)

    def decode_mean(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """z (B, L) -> the likelihood's mean p(x | z) itself (decoder temperature 1)."""
        return torch.sigmoid(self.decode_raw(z, y))

    @torch.no_grad()
    def decode_verified(self, candidates: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Decode the first of R candidate latents per row, candidates (B, R, L), that the
        model's own digit head reads as the row's digit y (B,); a row none of whose candidates
        passes keeps its last. Returns images (B, 1, 28, 28) and the latents used (B, L).
        Without a digit head the first candidate is decoded."""
        z = candidates[:, 0].clone()
        images = self.decode(z, y)
        if self.digit_head is None:
            return images, z
        pending = self.digit_logits(images).argmax(1) != y
        for round_ in range(1, candidates.shape[1]):
            rows = pending.nonzero()[:, 0]
            if len(rows) == 0:
                break
            z[rows] = candidates[rows, round_]
            images[rows] = redrawn = self.decode(z[rows], y[rows])
            accepted = self.digit_logits(redrawn).argmax(1) == y[rows]
            pending[rows[accepted]] = False
        return images, z

    def reconstruction_nll(self, x: Tensor, raw: Tensor) -> Tensor:
        """-log p(x | z) per image in nats; x (..., 1, 28, 28), raw from decode_raw -> (...)."""
        if self.config.likelihood == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(raw, x.expand_as(raw), reduction="none")
        else:
            log_std = self.log_std
            nll = 0.5 * ((x - torch.sigmoid(raw)) / log_std.exp()) ** 2 + log_std + 0.5 * LOG_2PI
        return nll.flatten(-3).sum(-1)

    def forward(
        self, x: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> VAEOutput:
        """One reparameterised pass: the terms of the ELBO for each image of x (B, 1, 28, 28)."""
        posterior = self.encode(x, y)
        z = posterior.sample(generator)
        raw = self.decode_raw(z, y)
        kl_per_dim = posterior.kl_per_dim()
        return VAEOutput(
            posterior=posterior,
            z=z,
            reconstruction=torch.sigmoid(raw),
            reconstruction_nll=self.reconstruction_nll(x, raw),
            kl=kl_per_dim.sum(-1),
            kl_per_dim=kl_per_dim,
        )

    # ---- generation ------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        n: int,
        y: Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        prior: GaussianMixturePrior | None = None,
        rounds: int = SAMPLE_ROUNDS,
    ) -> Samples:
        """n draws from the prior (std scaled by temperature), decoded. A conditional model with
        y=None draws its labels uniformly from the same generator.

        prior=None: z ~ N(0, I). With a fitted `prior`, z comes from its mixture of digit y, the
        noise drawn on the CPU (the generator must be a CPU one) so a seed gives the same z on
        every device; and a conditional model with a digit head draws `rounds` candidates per
        image and keeps the first its head reads as digit y (decode_verified)."""
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if prior is not None:
            y, candidates = self.draw_from_prior(n, y, temperature, generator, prior, rounds)
            candidates = candidates.to(self.device, self._dtype)
            if y is None:
                z = candidates[:, 0]
                return Samples(images=self.decode(z), labels=None, latents=z)
            y = y.to(self.device)
            images, z = self.decode_verified(candidates, y)
            return Samples(images=images, labels=y, latents=z)
        z = temperature * torch.randn(
            n, self.config.latent_dim, generator=generator, device=self.device, dtype=self._dtype
        )
        if self.config.num_classes is not None and y is None:
            y = torch.randint(
                0, self.config.num_classes, (n,), generator=generator, device=self.device
            )
        return Samples(images=self.decode(z, y), labels=y, latents=z)

    def draw_from_prior(
        self,
        n: int,
        y: Tensor | None,
        temperature: float,
        generator: torch.Generator | None,
        prior: GaussianMixturePrior,
        rounds: int = SAMPLE_ROUNDS,
    ) -> tuple[Tensor | None, Tensor]:
        """What sample() decodes from a fitted prior, drawn on the CPU in a fixed order: the
        labels (n,) (y, or uniform draws for a conditional model given none; None when
        unconditional), then the candidate latents (n, R, L), R = `rounds` when the digit head
        checks them and 1 otherwise. The service draws through this too, so a seed gives the
        same images from the service and from training.generate."""
        if y is None and self.config.num_classes is not None:
            y = torch.randint(0, self.config.num_classes, (n,), generator=generator)
        groups = torch.zeros(n, dtype=torch.long) if y is None else y.cpu()
        checked = y is not None and self.digit_head is not None
        return y, prior.candidates(groups, temperature, generator, rounds if checked else 1)

    @staticmethod
    def interpolate(
        z0: Tensor, z1: Tensor, steps: int, method: Literal["slerp", "linear"] = "slerp"
    ) -> Tensor:
        """Latents from z0 to z1 (L,) inclusive, (steps, L). slerp keeps the norm typical of the
        prior, so midpoints do not fall into the low-density centre of the Gaussian."""
        if steps < 2:
            raise ValueError(f"steps must be at least 2, got {steps}")
        t = torch.linspace(0.0, 1.0, steps, device=z0.device, dtype=z0.dtype)[:, None]
        if method == "linear":
            return (1 - t) * z0 + t * z1
        if method != "slerp":
            raise ValueError(f"method must be 'slerp' or 'linear', got {method!r}")
        cos = F.cosine_similarity(z0, z1, dim=0).clamp(-1.0, 1.0)
        omega = torch.arccos(cos)
        if float(omega.sin().abs()) < 1e-4:  # (anti)parallel: slerp is undefined, linear is exact
            return (1 - t) * z0 + t * z1
        return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / omega.sin()

    # ---- likelihoods -----------------------------------------------------------------------

    def _per_label(self, x: Tensor, fn: Any) -> Tensor:
        """fn(x, y) for every label y -> (C, B): the building block of label marginalisation."""
        c = self.config.num_classes
        assert c is not None
        return torch.stack(
            [
                fn(x, torch.full((x.shape[0],), d, device=x.device, dtype=torch.long))
                for d in range(c)
            ]
        )

    def _log_prior_y(self) -> float:
        return -math.log(self.config.num_classes or 1)

    @torch.no_grad()
    def elbo(
        self,
        x: Tensor,
        y: Tensor | None = None,
        k: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """ELBO per image in nats, (B,), averaged over k posterior samples. A conditional model
        with y=None gives the label-marginalised bound log sum_y p(y) exp(ELBO(x, y))."""
        if self.config.conditional and y is None:
            per_label = self._per_label(x, lambda xx, yy: self.elbo(xx, yy, k, generator))
            return torch.logsumexp(per_label + self._log_prior_y(), dim=0)
        posterior = self.encode(x, y)
        z = posterior.expand(k).sample(generator)  # (k, B, L)
        y_rep = None if y is None else y.repeat(k, *([1] * (y.dim() - 1)))
        raw = self.decode_raw(z.reshape(-1, z.shape[-1]), y_rep).view(k, *x.shape)
        return -self.reconstruction_nll(x, raw).mean(0) - posterior.kl()

    @torch.no_grad()
    def log_likelihood(
        self,
        x: Tensor,
        y: Tensor | None = None,
        k: int = 100,
        generator: torch.Generator | None = None,
        chunk: int = 50,
    ) -> Tensor:
        """Importance-weighted (IWAE) estimate of log p(x) per image in nats, (B,), with k samples
        drawn `chunk` at a time. A conditional model with y=None marginalises the label."""
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        if self.config.conditional and y is None:
            per_label = self._per_label(
                x, lambda xx, yy: self.log_likelihood(xx, yy, k, generator, chunk)
            )
            return torch.logsumexp(per_label + self._log_prior_y(), dim=0)
        posterior = self.encode(x, y)
        log_weights = []
        for start in range(0, k, chunk):
            kc = min(chunk, k - start)
            z = posterior.expand(kc).sample(generator)  # (kc, B, L)
            y_rep = None if y is None else y.repeat(kc, *([1] * (y.dim() - 1)))
            raw = self.decode_raw(z.reshape(-1, z.shape[-1]), y_rep).view(kc, *x.shape)
            log_px_z = -self.reconstruction_nll(x, raw)
            log_weights.append(log_px_z + standard_normal_log_prob(z) - posterior.log_prob(z))
        return torch.logsumexp(torch.cat(log_weights), dim=0) - math.log(k)

    def _mode_terms(self, x: Tensor, y: Tensor | None) -> tuple[DiagonalGaussian, Tensor, Tensor]:
        """Deterministic ELBO terms at z = posterior mean: (posterior, raw decoder output, ELBO)."""
        posterior = self.encode(x, y)
        raw = self.decode_raw(posterior.mode(), y)
        return posterior, raw, -self.reconstruction_nll(x, raw) - posterior.kl()

    def digit_logits(self, x: Tensor) -> Tensor:
        """log q(y | x) up to a constant, (B, C), from the digit head (models with one)."""
        if self.digit_head is None:
            raise ValueError("this VAE has no digit head (config.digit_head is off)")
        logits: Tensor = self.digit_head(x)
        return logits

    @torch.no_grad()
    def predict_digit(self, x: Tensor) -> DigitPrediction:
        """The digit of each image with its probability: q(y | x) of the digit head in one pass
        when the model has one, else predict_digit_elbo."""
        if not self.config.conditional:
            raise ValueError("predict_digit needs a conditional VAE (num_classes set)")
        if self.digit_head is None:
            return self.predict_digit_elbo(x)
        probabilities = torch.softmax(self.digit_logits(x).float(), dim=1)
        return DigitPrediction(digit=probabilities.argmax(1), probabilities=probabilities)

    @torch.no_grad()
    def predict_digit_elbo(self, x: Tensor) -> DigitPrediction:
        """p(y | x) proportional to p(y) exp(ELBO(x, y)) at the posterior mean: deterministic.
        Every label is scored in one batched pass over C copies of x."""
        if not self.config.conditional:
            raise ValueError("predict_digit needs a conditional VAE (num_classes set)")
        c, b = self.config.num_classes or 0, x.shape[0]
        labels = torch.arange(c, device=x.device).repeat_interleave(b)  # (C * B,): label-major
        per_label = self._mode_terms(x.repeat(c, 1, 1, 1), labels)[2].view(c, b)
        probabilities = torch.softmax(per_label.T.float(), dim=1)  # (B, C)
        return DigitPrediction(digit=probabilities.argmax(1), probabilities=probabilities)

    # ---- anomaly score ---------------------------------------------------------------------

    @torch.no_grad()
    def anomaly_statistics(self, x: Tensor) -> AnomalyResult:
        """The statistics behind the anomaly score (config.anomaly_statistics), at the predicted
        digit for conditional models; `score` is left at zero (see anomaly_score)."""
        head = self.digit_head
        # Only the head statistics read these; VAEConfig refuses them for a model without a head.
        features = logits = x.new_empty(0)
        if head is not None:
            features = head.features(x)  # (B, 64), kept for head_feature_error
            logits = head.logits(features).float()  # (B, C)
            probabilities = torch.softmax(logits, dim=1)
            prediction: DigitPrediction | None = DigitPrediction(
                digit=probabilities.argmax(1), probabilities=probabilities
            )
        else:
            prediction = self.predict_digit(x) if self.config.conditional else None
        y = None if prediction is None else prediction.digit
        posterior, raw, elbo = self._mode_terms(x, y)
        reconstruction = torch.sigmoid(raw)
        error = x - reconstruction
        error_map = error**2
        redrawn: list[tuple[Tensor, Tensor]] = []  # the head on the reconstruction, once

        def head_of_reconstruction() -> tuple[Tensor, Tensor]:
            assert head is not None
            if not redrawn:
                features = head.features(reconstruction)
                redrawn.append((features, head.logits(features).float()))
            return redrawn[0]

        def log_doubt(logits: Tensor) -> Tensor:
            """log(1 - q(y | .)) at the predicted digit y, from logits (B, C) without rounding
            to log(0) for a sure head: the log-mass of every other digit."""
            assert y is not None
            others = logits.scatter(1, y[:, None], float("-inf"))
            return torch.logsumexp(others, 1) - torch.logsumexp(logits, 1)

        computed: dict[str, Callable[[], Tensor]] = {
            "log_squared_error": lambda: torch.log(error_map.flatten(1).sum(1) + _STAT_EPS),
            "log_local_error": lambda: torch.log(
                F.avg_pool2d(error, 3, stride=1, padding=1).pow(2).flatten(1).sum(1) + _STAT_EPS
            ),
            "log_kl": lambda: torch.log(posterior.kl() + _STAT_EPS),
            "mean_logvar": lambda: posterior.logvar.mean(1),
            "negative_elbo": lambda: -elbo,
            "reconstruction_ink": lambda: reconstruction.flatten(1).mean(1),
            "ink": lambda: x.flatten(1).mean(1),
            "log_peak_local_error": lambda: torch.log(
                F.avg_pool2d(error_map, 5, stride=1, padding=2).flatten(1).amax(1) + _STAT_EPS
            ),
            "head_doubt": lambda: log_doubt(logits),
            "head_feature_error": lambda: torch.log(
                (features - head_of_reconstruction()[0]).pow(2).sum(1) + _STAT_EPS
            ),
            "reconstruction_head_doubt": lambda: log_doubt(head_of_reconstruction()[1]),
        }
        statistics = torch.stack(
            [computed[name]() for name in self.config.anomaly_statistics], dim=1
        ).float()
        return AnomalyResult(
            score=torch.zeros(x.shape[0], device=x.device),
            reconstruction=reconstruction,
            error_map=error_map,
            statistics=statistics,
            digit=y,
            digit_probability=None
            if prediction is None
            else prediction.probabilities.gather(1, prediction.digit[:, None])[:, 0],
        )

    @torch.no_grad()
    def fit_anomaly_reference(self, x: Tensor, batch_size: int = 500) -> None:
        """Fit the reference statistics of normal data x (N, 1, 28, 28), usually the train split:
        a centre per predicted digit and one shared (pooled) covariance."""
        results = [self.anomaly_statistics(b) for b in x.split(batch_size)]
        stats = torch.cat([r.statistics for r in results]).double()
        groups = (
            torch.cat([r.digit for r in results])  # type: ignore[misc]
            if self.config.conditional
            else torch.zeros(len(stats), dtype=torch.long, device=stats.device)
        )
        center = stats.mean(0).expand_as(self.anomaly_center).clone()
        for g in range(center.shape[0]):
            members = stats[groups == g]
            # A digit the model never predicts keeps the global centre instead of a NaN.
            if len(members) >= 2:
                center[g] = members.mean(0)
        residual = stats - center[groups]
        covariance = residual.T @ residual / max(len(stats) - center.shape[0], 1)
        # Ridge so one degenerate statistic (e.g. a constant) cannot make the matrix singular.
        covariance += 1e-4 * torch.eye(
            len(self.config.anomaly_statistics), dtype=covariance.dtype, device=covariance.device
        )
        self.anomaly_center.copy_(center.float())
        self.anomaly_precision.copy_(torch.linalg.inv(covariance).float())
        self.anomaly_fitted.fill_(True)

    @torch.no_grad()
    def anomaly_score(self, x: Tensor) -> AnomalyResult:
        """Typicality score, higher = more anomalous, deterministic per image.

        Plain likelihood rates blank and very simple images as more normal than digits
        (Nalisnick et al. 2019). Following the typicality view (Nalisnick et al. 2019b;
        Morningstar et al. 2021, DoSE), the score is instead the Mahalanobis distance of the
        image's statistics (log reconstruction error, log KL, mean posterior log-variance) from
        those of normal data of the same predicted digit: too simple is as atypical as too
        complex, so blank images, noise, photos and inverted digits all score high.
        """
        if not bool(self.anomaly_fitted):
            raise AnomalyNotCalibratedError(
                "this model has no anomaly reference: call fit_anomaly_reference(normal_images) "
                "(the trainer does this at the end of training)"
            )
        result = self.anomaly_statistics(x)
        group = result.digit if result.digit is not None else torch.zeros_like(result.score).long()
        delta = result.statistics - self.anomaly_center[group]
        squared = torch.einsum("bi,ij,bj->b", delta, self.anomaly_precision, delta)
        result.score = squared.clamp_min(0).sqrt()
        return result

    # ---- persistence -----------------------------------------------------------------------

    def save_pretrained(
        self,
        directory: str | Path,
        metadata: dict[str, Any] | None = None,
        extra_files: dict[str, bytes] | None = None,
    ) -> Path:
        """Write model.safetensors + config.json (+ extra files) atomically; models.checkpoint."""
        from models.checkpoint import save_checkpoint

        return save_checkpoint(self, directory, metadata, extra_files)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> VAE:
        """Rebuild a VAE from a checkpoint folder alone; CheckpointError says what is wrong."""
        from models.checkpoint import load_checkpoint

        return load_checkpoint(directory, device).model
