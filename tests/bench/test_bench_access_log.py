"""bench/access_log.py: /sample with the access log off, as text and as JSON, side by side (a
smoke test of the tool on a tiny checkpoint, not a measurement)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240  # three server starts and a second of load; this bound only catches a hang


def access_log(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.access_log", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def test_an_unknown_case_is_refused_before_anything_starts() -> None:
    completed = access_log("--case", "nope")
    assert completed.returncode == 2
    assert "unknown case(s) nope" in completed.stderr


@pytest.mark.slow
def test_three_servers_side_by_side(trained_checkpoint: Path, tmp_path: Path) -> None:
    completed = access_log(
        "--case", "sample_c1", "--rounds", "1", "--duration", "0.3",
        "--checkpoint", str(trained_checkpoint), "--out", str(tmp_path), "--line-requests", "200",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "access-log.json").read_text())
    rows = result["cases"]["sample_c1"]
    assert set(rows) == {"off", "text", "json"}
    for mode, row in rows.items():
        assert row["requests"] > 0 and row["errors"] == 0, mode
        assert row["ratio_to_off"] > 0, mode
    assert rows["off"]["ratio_to_off"] == 1.0
    costs = result["line_cost_us"]
    assert set(costs) == {"off", "text", "json"}
    assert 0 < costs["off"] < costs["text"] and costs["off"] < costs["json"]  # a line costs CPU
    table = (tmp_path / "access-log.md").read_text()
    assert table.startswith("Measured with `python -m bench.access_log")
    assert "| sample_c1 | json |" in table
    assert "In-process, CPU per request" in table
