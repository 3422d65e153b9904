"""A fitted latent prior: a Gaussian mixture per digit of where the encoder puts real digits.

A VAE is trained to make its aggregate posterior match N(0, I), but on little data it does not:
parts of N(0, I) decode to no digit, or to the wrong one. Fitting a density to the posterior
means of the training digits after training and sampling from it instead ("ex-post density
estimation", Ghosh et al., ICLR 2020) keeps samples where real digits are. The checkpoint holds
it as `prior.safetensors`; `training/prior.py` fits it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor

from models.artifacts import load_artifact, parse_artifact
from models.checkpoint import Checkpoint, CheckpointError

PRIOR_FILE = "prior.safetensors"
PRIOR_FORMAT = "vae-serve-prior/1"
PRIOR_KIND = "gaussian-mixture"
LOG_2PI = math.log(2 * math.pi)


@dataclass
class GaussianMixturePrior:
    """One Gaussian mixture over z per group (a digit; one group for unconditional models).

    weights:    (G, K) mixture weights, each row summing to 1 (unused components weigh 0)
    means:      (G, K, L)
    scale_tril: (G, K, L, L) lower Cholesky factors of the component covariances
    info:       how it was fitted (components per group, data, log-likelihoods)
    """

    weights: Tensor
    means: Tensor
    scale_tril: Tensor
    info: dict[str, Any]

    def __post_init__(self) -> None:
        if self.means.dim() != 3:
            raise ValueError(f"means must be (G, K, L), got {tuple(self.means.shape)}")
        groups, components, latent = self.means.shape
        if tuple(self.weights.shape) != (groups, components):
            raise ValueError(f"weights must be ({groups}, {components})")
        if tuple(self.scale_tril.shape) != (groups, components, latent, latent):
            raise ValueError(f"scale_tril must be ({groups}, {components}, {latent}, {latent})")
        for name in ("weights", "means", "scale_tril"):
            if not bool(torch.isfinite(getattr(self, name)).all()):
                raise ValueError(f"{name} has non-finite values")
        if bool((self.weights < 0).any()) or not torch.allclose(
            self.weights.sum(1), torch.ones(groups, dtype=self.weights.dtype), atol=1e-4
        ):
            raise ValueError("weights must be non-negative and sum to 1 per group")
        diagonal = self.scale_tril.diagonal(dim1=-2, dim2=-1)
        if bool((diagonal <= 0).any()):
            raise ValueError("scale_tril must have a positive diagonal")
        self.weights = self.weights.float()
        self.means = self.means.float()
        self.scale_tril = self.scale_tril.float()

    @property
    def num_groups(self) -> int:
        return self.means.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.means.shape[2]

    def sample(
        self,
        groups: Tensor,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """One z per entry of groups (N,) on the CPU, (N, L): a component drawn by weight, then
        its Gaussian with the std scaled by temperature. Draw order (components, then noise)
        is fixed, so a seeded CPU generator reproduces the draws. `noise` (N, L) replaces the
        standard normal draw, e.g. to give two digits the same style noise."""
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        groups = groups.long().cpu()
        if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= self.num_groups):
            raise ValueError(f"groups must be in 0..{self.num_groups - 1}")
        component = torch.multinomial(self.weights[groups], 1, generator=generator)[:, 0]
        if noise is None:
            noise = torch.randn(len(groups), self.latent_dim, generator=generator)
        elif tuple(noise.shape) != (len(groups), self.latent_dim):
            raise ValueError(f"noise must be ({len(groups)}, {self.latent_dim})")
        tril = self.scale_tril[groups, component]  # (N, L, L)
        return self.means[groups, component] + temperature * (tril @ noise[:, :, None])[:, :, 0]

    def candidates(
        self,
        groups: Tensor,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        rounds: int = 1,
    ) -> Tensor:
        """`rounds` independent draws per entry of groups (N,), (N, rounds, L), drawn in one go
        (all components, then all noise) so a request pays for one draw whatever `rounds` is;
        a seeded CPU generator reproduces them."""
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        groups = groups.long().cpu()
        if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= self.num_groups):
            raise ValueError(f"groups must be in 0..{self.num_groups - 1}")
        rows = groups[:, None]  # (N, 1): broadcasts against the (N, R) components
        component = torch.multinomial(self.weights[groups], rounds, True, generator=generator)
        noise = torch.randn(len(groups), rounds, self.latent_dim, generator=generator)
        tril = self.scale_tril[rows, component]  # (N, R, L, L)
        return self.means[rows, component] + temperature * (tril @ noise[..., None])[..., 0]

    def log_prob(self, z: Tensor, groups: Tensor) -> Tensor:
        """log p(z | group) per row of z (N, L), on z's device, (N,)."""
        weights, means, tril = (
            t.to(z.device)[groups.to(z.device)] for t in (self.weights, self.means, self.scale_tril)
        )
        delta = z[:, None, :].float() - means  # (N, K, L)
        solved = torch.linalg.solve_triangular(tril, delta[..., None], upper=False)[..., 0]
        log_det = tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (N, K)
        component = -0.5 * solved.pow(2).sum(-1) - log_det - 0.5 * self.latent_dim * LOG_2PI
        # Unused components weigh exactly 0: -inf, so they add nothing however close they are.
        log_weights = torch.where(weights > 0, weights.log(), float("-inf"))
        return torch.logsumexp(component + log_weights, dim=1)

    def summary(self) -> dict[str, Any]:
        """What config.json and GET /models say about the prior."""
        return {
            "kind": PRIOR_KIND,
            "file": PRIOR_FILE,
            "groups": self.num_groups,
            "components": [int((w > 0).sum()) for w in self.weights],
            **self.info,
        }

    # ---- persistence -----------------------------------------------------------------------

    def export(self) -> tuple[bytes, dict[str, Any]]:
        """The file's bytes and its config.json entry (the summary and the bytes' sha256)."""
        tensors = {
            "weights": self.weights.contiguous(),
            "means": self.means.contiguous(),
            "scale_tril": self.scale_tril.contiguous(),
        }
        metadata = {"format": PRIOR_FORMAT, "info": json.dumps(self.info, allow_nan=False)}
        data = save_safetensors(tensors, metadata=metadata)
        return data, {**self.summary(), "sha256": hashlib.sha256(data).hexdigest()}

    @classmethod
    def from_bytes(cls, data: bytes) -> GaussianMixturePrior:
        """Parse `export` bytes; ValueError says what is wrong."""
        tensors, metadata = parse_artifact(data, PRIOR_FORMAT, {"weights", "means", "scale_tril"})
        try:
            info = json.loads(metadata.get("info", "{}"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"metadata is not valid JSON ({exc})") from exc
        return cls(tensors["weights"], tensors["means"], tensors["scale_tril"], info)


def load_prior(
    folder: str | Path, latent_dim: int, groups: int, expected_sha256: str | None = None
) -> GaussianMixturePrior | None:
    """The checkpoint's fitted prior (on the CPU), None when it has none; CheckpointError when
    the file is damaged or does not fit the model."""
    path = Path(folder) / PRIOR_FILE
    fix = "retrain, or delete the file to sample from N(0, I)"
    prior = load_artifact(
        path, expected_sha256, fix, "a fitted prior", GaussianMixturePrior.from_bytes
    )
    if prior is None:
        return None
    if prior.latent_dim != latent_dim or prior.num_groups != groups:
        raise CheckpointError(
            f"{path}: fitted for {prior.num_groups} group(s) of {prior.latent_dim} latent dims, "
            f"but the model has {groups} and {latent_dim}; {fix}"
        )
    return prior


def checkpoint_prior(checkpoint: Checkpoint) -> GaussianMixturePrior | None:
    """load_prior for a loaded checkpoint: its folder, model and config.json's sha256."""
    config = checkpoint.model.config
    return load_prior(
        checkpoint.path,
        config.latent_dim,
        config.num_classes or 1,
        checkpoint.metadata.get("prior", {}).get("sha256"),
    )
