"""bench/: `python -m bench --quick` end to end on a tiny checkpoint: every case, finite numbers.

A smoke test of the suite's code (load generator, servers, sections, report), not a
measurement: the quick scale runs each case for a fraction of a second.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
# The quick suite takes ~30 s on 2 CPU cores with a load average of 3, ~100 s at 9 (other jobs
# on a shared machine slow every server start), and each server now starts a worker per core;
# this bound only catches a hang.
SUITE_TIMEOUT_S = 360
SERVING_CASES = {
    *(f"floor_c{c}" for c in (1, 8, 32, 64)),
    *(f"sample_c{c}" for c in (1, 8, 32, 64)),
    "sample_rate",
    "sample_n64_c8",
    "anomaly_1_c8",
    "upload_floor_1_c8",
    "anomaly_16_c8",
    "similar_1_c8",  # the test checkpoint has a latent index: measured, never skipped
}
NAIVE_CASES = {"sample_c1", "sample_c32", "sample_c64"}
LOAD_NUMBERS = ("req_s", "images_s", "p50_ms", "p90_ms", "p99_ms", "mean_ms")


@pytest.fixture(scope="module")
def results(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, "-m", "bench", "--quick", "--checkpoint", str(trained_checkpoint)]
    # No peers venv, whatever this machine has: the peers section says it is skipped and why
    # (its cases are tested against the project in test_peers.py).
    env = {**os.environ, "VAE_BENCH_PEERS_VENV": str(out / "no-peers-venv")}
    completed = subprocess.run(
        [*command, "--out", str(out), "--name", "smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUITE_TIMEOUT_S,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (out / "smoke.md").read_text().startswith("Measured with `python -m bench --quick")
    loaded: dict[str, Any] = json.loads((out / "smoke.json").read_text())
    return loaded


def assert_load(row: dict[str, Any], name: str) -> None:
    for key in LOAD_NUMBERS:
        value = row[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, key, value)
    assert row["requests"] > 0, name
    assert row["errors"] == 0, (name, row["statuses"])
    assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"], name


@pytest.mark.slow
def test_every_serving_case_has_finite_numbers(results: dict[str, Any]) -> None:
    # A case is skipped only for a service or checkpoint without the feature (404, 400); a
    # 5xx fails the suite (tests/bench/test_serving.py), and so this test.
    assert "skipped" not in results["serving"], results["serving"]["skipped"]
    assert set(results["serving"]["cases"]) == SERVING_CASES
    assert set(results["serving"]["naive"]) == NAIVE_CASES
    for name, row in {**results["serving"]["cases"], **results["serving"]["naive"]}.items():
        assert_load(row, name)


@pytest.mark.slow
def test_batching_and_workers_configurations_are_measured(results: dict[str, Any]) -> None:
    for section in ("batching", "workers"):
        configs = results[section]["configs"]
        assert len(configs) >= 2, section
        for label, config in configs.items():
            for name, row in config["cases"].items():
                assert_load(row, f"{section}/{label}/{name}")
    cost = results["batching"]["model_cost"]["us_per_image"]
    assert all(math.isfinite(v) and v > 0 for row in cost.values() for v in row.values())
    choice = results["workers_choice"]
    assert choice["fastest"] in results["workers"]["configs"]
    assert choice["relative_throughput"]["w1_tdefault"] == pytest.approx(1.0)


@pytest.mark.slow
def test_the_peers_section_without_its_venv_says_how_to_make_it(results: dict[str, Any]) -> None:
    assert "make peers" in results["peers"]["skipped"]


@pytest.mark.slow
def test_startup_memory_and_soak(results: dict[str, Any]) -> None:
    startup = results["startup"]
    assert 0 < startup["startup_s"] < 120
    assert 0 < startup["rss_ready_mb"] <= startup["rss_after_requests_mb"] + 50
    assert startup["soak"]["server_errors"] == 0
    assert math.isfinite(startup["soak"]["rss_growth_mb"])
    assert startup["exit_status_on_sigterm"] == 0


@pytest.mark.slow
def test_training_and_targets(results: dict[str, Any]) -> None:
    cpu = results["training"]["cpu"]
    for key in ("project_epoch_s", "seed_style_epoch_s", "speedup"):
        assert math.isfinite(cpu[key]) and cpu[key] > 0, key
    gpu = results["training"]["gpu"]
    assert gpu["measured"] is torch.cuda.is_available()
    if not gpu["measured"]:
        assert "no GPU" in gpu["reason"]
    measures = {row["measure"] for row in results["targets"]}
    assert "/sample throughput / floor, c=32" in measures
    assert "batching latency cost at c=1 (p50)" in measures
    for key in ("cores", "cpu", "torch"):
        assert results["machine"][key]
