"""Fitting the latent prior a checkpoint samples from (models/prior.py says why it exists).

Per digit (one group for unconditional models), the posterior means of the training images,
each encoded with its own label, are fitted by scikit-learn's GaussianMixture with full
covariances; the number of components, 1..max_components, is the one with the lowest BIC on
the training latents, and the validation latents' mean log-likelihood is recorded beside it.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from torch import Tensor

from models import VAE
from models.prior import GaussianMixturePrior
from training.data import Split
from training.index import encode_split

logger = logging.getLogger(__name__)

# Components tried per digit. On mnist-5k (~360 training digits each) BIC picks 1-3; more
# would fit the noise of so few points.
MAX_COMPONENTS = 4
# Added to each covariance's diagonal (sklearn's reg_covar), in latent units squared: keeps a
# component fitted to a tight cluster from collapsing.
COVARIANCE_FLOOR = 1e-4


def posterior_means(model: VAE, split: Split, batch_size: int = 500) -> Tensor:
    """Posterior means (N, L) of a split on the CPU; conditional models encode each image with
    its true label."""
    return encode_split(model, split, batch_size).cpu()


def _fit_group(points: np.ndarray, max_components: int, seed: int) -> GaussianMixture:
    best: GaussianMixture | None = None
    best_bic = np.inf
    for components in range(1, min(max_components, len(points) // 2) + 1):
        mixture = GaussianMixture(
            components,
            covariance_type="full",
            reg_covar=COVARIANCE_FLOOR,
            n_init=2,
            random_state=seed,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            mixture.fit(points)
        bic = mixture.bic(points)
        if bic < best_bic:
            best, best_bic = mixture, bic
    if best is None:
        raise ValueError(f"too few latents to fit a prior: {len(points)}")
    return best


def fit_prior(
    model: VAE,
    train: Split,
    val: Split | None = None,
    max_components: int = MAX_COMPONENTS,
    seed: int = 0,
    batch_size: int = 500,
) -> GaussianMixturePrior:
    """The fitted prior of a trained model: a Gaussian mixture per digit of the training
    split's posterior means (see the module docstring)."""
    groups = model.config.num_classes or 1
    latents = posterior_means(model, train, batch_size).double().numpy()
    labels = train.labels.cpu().numpy() if model.config.conditional else np.zeros(len(latents))
    val_latents = val_labels = None
    if val is not None:
        val_latents = posterior_means(model, val, batch_size).double().numpy()
        val_labels = val.labels.cpu().numpy() if model.config.conditional else np.zeros(len(val))
    dim = model.config.latent_dim
    weights = torch.zeros(groups, max_components, dtype=torch.float64)
    means = torch.zeros(groups, max_components, dim, dtype=torch.float64)
    tril = torch.eye(dim, dtype=torch.float64).repeat(groups, max_components, 1, 1)
    train_ll, val_ll = [], []
    for group in range(groups):
        points = latents[labels == group]
        mixture = _fit_group(points, max_components, seed)
        k = mixture.n_components
        weights[group, :k] = torch.from_numpy(mixture.weights_)
        means[group, :k] = torch.from_numpy(mixture.means_)
        tril[group, :k] = torch.linalg.cholesky(torch.from_numpy(mixture.covariances_))
        train_ll.append(float(mixture.score(points)) * len(points))
        if val_latents is not None and val_labels is not None:
            held_out = val_latents[val_labels == group]
            val_ll.append(float(mixture.score(held_out)) * len(held_out))
    weights /= weights.sum(1, keepdim=True)
    info = {
        "fitted_on": "posterior means of the train split" + (", per digit" if groups > 1 else ""),
        "selection": f"BIC over 1..{max_components} full-covariance components",
        "train_log_likelihood": round(sum(train_ll) / len(latents), 4),
    }
    if val_latents is not None:
        info["val_log_likelihood"] = round(sum(val_ll) / len(val_latents), 4)
    prior = GaussianMixturePrior(weights, means, tril, info)
    logger.info("fitted prior: %s components per group", prior.summary()["components"])
    return prior
