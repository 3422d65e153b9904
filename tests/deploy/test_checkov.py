"""checkov, the infrastructure-as-code scanner, on what a cluster would be given (both rendered
overlays and the KServe manifests) and on the Dockerfile: no failed check, and every skipped
check names its reason beside it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from deploy_tools import REPO, render, tool

# What a cluster would be given: the kustomizations as kustomize renders them.
RENDERED = {
    "k8s-cpu.yaml": REPO / "deploy" / "k8s" / "overlays" / "cpu",
    "k8s-gpu.yaml": REPO / "deploy" / "k8s" / "overlays" / "gpu",
    "kserve.yaml": REPO / "deploy" / "kserve",
}

pytestmark = pytest.mark.slow


def checkov(framework: str, *files: Path) -> dict[str, Any]:
    """checkov's JSON report for `files`; --skip-download: it runs offline, on its bundled
    checks."""
    result = subprocess.run(
        [
            tool("checkov"),
            "--framework",
            framework,
            *(arg for path in files for arg in ("--file", str(path))),
            "--output",
            "json",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode in (0, 1), result.stderr  # 1: some check failed (shown below)
    report = json.loads(result.stdout)
    assert isinstance(report, dict), report  # one framework, one report
    return report


def assert_clean(report: dict[str, Any], at_least: int) -> None:
    results, summary = report["results"], report["summary"]
    failed = [
        f"{check['check_id']} {check['check_name']} ({check['resource']}, {check['file_path']})"
        for check in results["failed_checks"]
    ]
    assert not failed, "\n".join(failed)
    assert summary["parsing_errors"] == 0, results.get("parsing_errors")
    assert summary["passed"] >= at_least, summary  # it really looked at the resources
    for check in results["skipped_checks"]:
        reason = check["check_result"].get("suppress_comment") or ""
        assert len(reason) > 20, f"{check['check_id']} is skipped without a reason"


def test_the_manifests_scan_clean(tmp_path: Path) -> None:
    files = []
    for name, folder in RENDERED.items():
        (tmp_path / name).write_text(render(folder))
        files.append(tmp_path / name)
    report = checkov("kubernetes", *files)
    assert_clean(report, at_least=100)
    # Each rendered Deployment and Job was checked (not just parsed past).
    scanned = {check["resource"] for check in report["results"]["passed_checks"]}
    assert {"Deployment.vae-serve.vae-api", "Job.vae-serve.vae-train"} <= scanned, scanned


def test_the_dockerfile_scans_clean() -> None:
    assert_clean(checkov("dockerfile", REPO / "Dockerfile"), at_least=5)
