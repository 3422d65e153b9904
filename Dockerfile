# Image of the VAE service; the trainer runs the same image with another command.
# Needs BuildKit (`RUN --mount`), the default builder of Docker 23+ and of podman; the engine's
# built-in Dockerfile frontend reads this file (no `# syntax=` line, which would pull a frontend
# image from a registry).
#
# Base (BASE_IMAGE): by default the official PyTorch runtime image, pinned by tag, for both stages.
# - It ships torch 2.8.0 and torchvision 0.23 built against CUDA 12.8 and cuDNN 9, so the GPU
#   stack comes ready-made and tested together; the host needs only the NVIDIA driver (R570 or
#   newer for CUDA 12.8) and the NVIDIA Container Toolkit. Its kernels need a GPU of compute
#   capability 7.0 or newer (no Maxwell or Pascal). On a host without such a GPU the same image
#   runs on CPU (VAE_DEVICE=auto checks the GPU, falls back and logs why).
# - "runtime", not "devel": the service compiles nothing, and devel adds gigabytes of toolkit.
# - torch 2.8.0 satisfies pyproject's torch>=2.3,<2.15 (and torchvision 0.23 its
#   torchvision>=0.18,<0.30), so pip keeps the base's CUDA build instead of downloading another
#   torch; the dependency step below fails the build if that ever stops being true.
# - Its Python (3.11, in /opt/conda) meets requires-python >=3.11.
# - A tag, never `latest`: rebuilds are reproducible and a torch upgrade is a reviewed diff
#   (tests/deploy/test_dockerfile.py checks the tag's torch against pyproject's range).
# Any other base with Python >= 3.11 (python3 and its venv module) and groupadd/useradd works
# too, e.g. `--build-arg BASE_IMAGE=python:3.11-slim-bookworm`: where the base has no torch,
# pip installs PyPI's (CUDA) build from pyproject's range. CI builds on such a base
# (Debian bookworm's python3, .ci/container-base), as no registry is reachable there.
# checkov:skip=CKV_DOCKER_7:FROM names the ARG below, which pins a tag; checkov does not resolve ARGs
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

FROM ${BASE_IMAGE} AS build

# A venv that still sees the base image's site-packages: torch stays where the base put it,
# and the runtime stage copies this one folder.
RUN python3 -m venv --system-site-packages /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src

# Dependencies first (the runtime's and the `grpc` extra's, so VAE_GRPC_PORT works in the
# image), read from pyproject.toml alone: this layer is rebuilt when the
# dependencies change, not on every source edit; pip's cache (a BuildKit cache mount) keeps
# the downloaded wheels across rebuilds. A base that ships torch must keep it: the build fails
# if pip replaced it (a base whose torch left pyproject's range would otherwise download
# gigabytes of another torch, unnoticed).
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    base_torch="$(python -c 'import torch; print(torch.__file__)' 2>/dev/null || true)" \
    && python -c "import tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; deps = project['dependencies'] + project['optional-dependencies']['grpc']; open('/tmp/requirements.txt', 'w').write('\n'.join(deps))" \
    && pip install -r /tmp/requirements.txt \
    && if [ -n "$base_torch" ]; then python -c "import sys, torch; assert torch.__file__ == sys.argv[1], 'pip replaced the base image torch ' + sys.argv[1] + ' with ' + torch.__file__" "$base_torch"; fi

# Then the source, built into a wheel (installed as a package in the runtime stage, not run
# from a bind mount); --no-deps because the layer above already holds every dependency.
COPY README.md ./
COPY app ./app
COPY models ./models
COPY training ./training
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --no-deps --wheel-dir /wheels .


FROM ${BASE_IMAGE} AS runtime

LABEL org.opencontainers.image.title="vae-serve" \
      org.opencontainers.image.description="Variational autoencoders trained on MNIST, served over HTTP"

# A fixed numeric uid so orchestrators can check runAsNonRoot. /checkpoints and /data belong
# to it: Docker copies that ownership into an empty named volume mounted there, so the trainer
# (and the api's first-start training) can write checkpoints, and download MNIST into /data.
RUN groupadd --system --gid 10001 vae \
    && useradd --system --uid 10001 --gid vae --create-home --home-dir /home/vae vae \
    && mkdir -p /checkpoints /data \
    && chown vae:vae /checkpoints /data

# The dependencies (gigabytes, with torch), then the project on top as a layer of its own: a
# source edit rebuilds only that small layer, and the one above stays cached.
COPY --from=build /opt/venv /opt/venv
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    /opt/venv/bin/pip install --no-deps --no-index --no-cache-dir --disable-pip-version-check \
        /wheels/*.whl

# Settings come from the environment (VAE_*); these are the image's defaults, and
# docker-compose.yml or `docker run -e` override them.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VAE_HOST=0.0.0.0 \
    VAE_PORT=8000 \
    VAE_DEVICE=auto \
    VAE_CHECKPOINTS=/checkpoints/default

WORKDIR /home/vae
USER 10001:10001
EXPOSE 8000

# Healthy means ready (all models loaded), not merely alive. The base image has no curl, and
# Python's urllib needs nothing extra: urlopen raises on a 503, so the check exits non-zero.
# The start period is compose's: a first start with --train-if-missing trains before anything
# listens (minutes on a CPU); the first passing check ends it early.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('VAE_PORT', '8000'), timeout=4)"]

# Run it with an init (`docker run --init`, compose's `init: true`): Python as PID 1 would
# ignore SIGTERM until it installs its handler.
CMD ["python", "-m", "app"]
