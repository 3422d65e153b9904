"""The image the container tests share: built once per session by the real Docker engine."""

from __future__ import annotations

import pytest
from containers import IMAGE, build_image, docker


@pytest.fixture(scope="session")
def engine() -> str:
    """The docker CLI of a running engine (the tests skip without one, or fail under CI)."""
    return docker()


@pytest.fixture(scope="session")
def image(engine: str) -> str:
    """The project's image, built from its Dockerfile (IMAGE; the layer cache makes a rebuild
    of unchanged dependencies take seconds)."""
    build_image(engine)
    return IMAGE
