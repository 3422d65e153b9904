"""training/prior.py: the number of mixture components per digit is the one BIC prefers."""

from __future__ import annotations

import numpy as np
import pytest

from training.prior import MAX_COMPONENTS, _fit_group


def clusters(count: int, per_cluster: int = 150, dim: int = 4, seed: int = 0) -> np.ndarray:
    """per_cluster points around each of `count` centres 12 apart (unit spread)."""
    rng = np.random.default_rng(seed)
    centres = 12.0 * np.eye(dim)[:count]
    return np.concatenate([c + rng.normal(size=(per_cluster, dim)) for c in centres])


@pytest.mark.parametrize("count", [1, 2, 3])
def test_bic_picks_as_many_components_as_there_are_clusters(count: int) -> None:
    assert _fit_group(clusters(count), MAX_COMPONENTS, seed=0).n_components == count


def test_bic_stops_at_the_most_components_allowed() -> None:
    """Five clusters with at most four components: four, and never more than half the points."""
    assert _fit_group(clusters(5, dim=5), MAX_COMPONENTS, seed=0).n_components == MAX_COMPONENTS
    assert _fit_group(clusters(3, per_cluster=1), MAX_COMPONENTS, seed=0).n_components == 1
