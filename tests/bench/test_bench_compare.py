"""bench/compare.py: two versions served side by side from git worktrees (a smoke test of the
tool on a tiny checkpoint, not a measurement)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 180  # two server starts and a second of load; this bound only catches a hang


def compare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.compare", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def worktrees() -> str:
    listed = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True, check=True
    )
    return listed.stdout


def test_an_unknown_case_is_refused_before_anything_starts() -> None:
    completed = compare("HEAD", "--case", "nope")
    assert completed.returncode == 2
    assert "unknown case(s) nope" in completed.stderr


@pytest.mark.slow
def test_head_against_the_working_tree(trained_checkpoint: Path, tmp_path: Path) -> None:
    before = worktrees()
    completed = compare(
        "HEAD", "--case", "floor_c1", "--case", "sample_c1", "--rounds", "1", "--duration",
        "0.3", "--checkpoint", str(trained_checkpoint), "--out", str(tmp_path), "--name", "smoke",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "compare-smoke.json").read_text())
    assert result["new"] == "working tree"
    assert result["base"].split()[0]  # the short hash and subject of HEAD
    assert set(result["cases"]) == {"floor_c1", "sample_c1"}
    for name, row in result["cases"].items():
        for side in ("base", "new"):
            assert row[side]["requests"] > 0 and row[side]["errors"] == 0, (name, side)
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, name
    table = (tmp_path / "compare-smoke.md").read_text()
    assert table.startswith("Measured with `python -m bench.compare HEAD")
    assert "| sample_c1 |" in table
    assert worktrees() == before  # the temporary checkout is gone
