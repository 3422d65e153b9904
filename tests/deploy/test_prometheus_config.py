"""deploy/prometheus: promtool accepts config and rules, and the alerts fire when they should
(test_prometheus_live.py runs them in a real Prometheus against the real api)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
JOB = "vae-api"


def executable(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` is not on PATH (Debian/Ubuntu: apt-get install prometheus)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [executable("promtool"), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def test_scrapes_the_api_every_5_seconds(config: dict[str, Any]) -> None:
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    assert job["scrape_interval"] == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets == ["api:8000"]  # the compose service name and the api's fixed port


def test_loads_the_rules_beside_it(config: dict[str, Any]) -> None:
    assert [(CONFIG.parent / path).resolve() for path in config["rule_files"]] == [RULES]


def test_promtool_accepts_the_config() -> None:
    run_promtool("check", "config", str(CONFIG))


def test_promtool_accepts_the_rules() -> None:
    run_promtool("check", "rules", str(RULES))


def test_records_latency_quantiles_rate_and_error_ratio(rules: list[dict[str, Any]]) -> None:
    recorded = {rule["record"] for rule in rules if "record" in rule}
    assert {
        "route:vae_request_duration_seconds:p50_5m",
        "route:vae_request_duration_seconds:p95_5m",
        "route:vae_request_duration_seconds:p99_5m",
        "route:vae_requests:rate5m",
        "job:vae_requests:rate5m",
        "route:vae_requests_errors:ratio_rate5m",
        "job:vae_requests_errors:ratio_rate5m",
    } <= recorded


def test_every_alert_has_a_severity_and_a_summary(rules: list[dict[str, Any]]) -> None:
    alerts = [rule for rule in rules if "alert" in rule]
    assert {a["alert"] for a in alerts} == {
        "VaeApiDown",
        "VaeApiNotUp",
        "VaeApiAbsent",
        "VaeApiHighLatencyP99",
        "VaeApiHighErrorRatio",
    }
    for alert in alerts:
        assert alert["labels"]["severity"] in ("warning", "critical"), alert["alert"]
        assert alert["annotations"]["summary"], alert["alert"]
        assert "for" in alert, f"{alert['alert']} would fire on a single bad evaluation"


def firing(alertname: str, value: int = 1, **labels: str) -> dict[str, Any]:
    """An `ALERTS` sample of a firing alert, as promtool's expression tests expect it."""
    matchers = {"alertname": alertname, "alertstate": "firing", **labels}
    series = "ALERTS{" + ", ".join(f'{k}="{v}"' for k, v in sorted(matchers.items())) + "}"
    return {"labels": series, "value": value}


def request_counts(route: str, status: str, per_15s: int) -> dict[str, str]:
    series = (
        f'vae_request_duration_seconds_count{{job="{JOB}", instance="api:8000", '
        f'route="{route}", method="POST", status="{status}"}}'
    )
    return {"series": series, "values": f"0+{per_15s}x100"}


def latency_buckets(route: str, per_15s: dict[str, int]) -> list[dict[str, str]]:
    """Cumulative bucket counters: `per_15s[le]` more requests at or below `le` every 15 s."""
    return [
        {
            "series": (
                f'vae_request_duration_seconds_bucket{{job="{JOB}", instance="api:8000", '
                f'route="{route}", method="POST", status="200", le="{le}"}}'
            ),
            "values": f"0+{count}x100",
        }
        for le, count in per_15s.items()
    ]


def down_alert(alertname: str) -> dict[str, Any]:
    """A firing VaeApiDown or VaeApiNotUp of the api target, as promtool's alert tests expect
    it: labels and the annotations with their template filled in."""
    (rule,) = [
        rule
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if rule.get("alert") == alertname
    ]
    annotations = {
        key: value.replace("{{ $labels.instance }}", "api:8000")
        for key, value in rule["annotations"].items()
    }
    labels = {"job": JOB, "instance": "api:8000", **rule["labels"]}
    return {"exp_labels": labels, "exp_annotations": annotations}


# Input series are 15 s apart, like rule evaluations; `0+15x100` is a counter growing 1/s.
ALERT_TESTS: list[dict[str, Any]] = [
    {
        "name": "a target that stops answering fires VaeApiDown after a minute",
        "interval": "15s",
        "input_series": [
            {"series": f'up{{job="{JOB}", instance="api:8000"}}', "values": "1x8 0x40"},
        ],
        "alert_rule_test": [
            {"alertname": "VaeApiDown", "eval_time": "2m45s", "exp_alerts": []},  # pending
            {"alertname": "VaeApiAbsent", "eval_time": "10m", "exp_alerts": []},
        ],
        "promql_expr_test": [
            {
                "expr": 'ALERTS{alertname="VaeApiDown"}',
                "eval_time": "4m",
                "exp_samples": [
                    firing("VaeApiDown", instance="api:8000", job=JOB, severity="critical")
                ],
            },
        ],
    },
    {
        # The api trains the default model before it listens: nothing to scrape for minutes.
        "name": "a first start that trains for 25 minutes fires nothing",
        "interval": "15s",
        "input_series": [
            {"series": f'up{{job="{JOB}", instance="api:8000"}}', "values": "0x100 1x40"},
        ],
        "alert_rule_test": [
            {"alertname": alert, "eval_time": time, "exp_alerts": []}
            for alert in ("VaeApiDown", "VaeApiNotUp")
            for time in ("2m", "20m", "25m", "26m", "30m", "35m")
        ],
    },
    {
        "name": "a start that never comes up fires VaeApiNotUp after 30 minutes, not VaeApiDown",
        "interval": "15s",
        "input_series": [
            {"series": f'up{{job="{JOB}", instance="api:8000"}}', "values": "0x200"},
        ],
        "alert_rule_test": [
            {"alertname": "VaeApiNotUp", "eval_time": "29m", "exp_alerts": []},
            {"alertname": "VaeApiDown", "eval_time": "45m", "exp_alerts": []},
        ],
        "promql_expr_test": [
            {
                "expr": 'ALERTS{alertstate="firing"}',
                "eval_time": "31m",
                "exp_samples": [
                    firing("VaeApiNotUp", instance="api:8000", job=JOB, severity="critical")
                ],
            },
        ],
    },
    {
        "name": "a long outage passes from VaeApiDown to VaeApiNotUp with no gap",
        "interval": "15s",
        "input_series": [
            {"series": f'up{{job="{JOB}", instance="api:8000"}}', "values": "1x7 0x300"},
        ],
        # Down from 1m45s: VaeApiDown fires from 2m45s until the last `up` of 1 leaves its
        # 35-minute window (36m45s); VaeApiNotUp from 31m45s on.
        "alert_rule_test": [
            {
                "alertname": alert,
                "eval_time": f"{minute}m",
                "exp_alerts": [down_alert(alert)] if firing_at(minute) else [],
            }
            for minute in range(3, 60)
            for alert, firing_at in (
                ("VaeApiDown", lambda m: m <= 36),
                ("VaeApiNotUp", lambda m: m >= 32),
            )
        ],
    },
    {
        "name": "no vae-api target at all fires VaeApiAbsent after 5 minutes",
        "interval": "15s",
        "input_series": [{"series": 'up{job="other", instance="x:1"}', "values": "1x40"}],
        "alert_rule_test": [
            {"alertname": "VaeApiAbsent", "eval_time": "4m", "exp_alerts": []},
            {"alertname": "VaeApiDown", "eval_time": "8m", "exp_alerts": []},
        ],
        "promql_expr_test": [
            {
                "expr": 'ALERTS{alertname="VaeApiAbsent"}',
                "eval_time": "6m",
                "exp_samples": [firing("VaeApiAbsent", job=JOB, severity="critical")],
            },
        ],
    },
    {
        "name": "without any 5xx the error ratio is 0, not missing, and nothing fires",
        "interval": "15s",
        "input_series": [request_counts("/reconstruct", "200", 15)],
        "alert_rule_test": [
            {"alertname": "VaeApiHighErrorRatio", "eval_time": "10m", "exp_alerts": []},
        ],
        "promql_expr_test": [
            {
                "expr": "job:vae_requests_errors:ratio_rate5m",
                "eval_time": "10m",
                "exp_samples": [
                    {"labels": f'job:vae_requests_errors:ratio_rate5m{{job="{JOB}"}}', "value": 0}
                ],
            },
            {
                "expr": "route:vae_requests_errors:ratio_rate5m",
                "eval_time": "10m",
                "exp_samples": [
                    {
                        "labels": 'route:vae_requests_errors:ratio_rate5m{route="/reconstruct"}',
                        "value": 0,
                    }
                ],
            },
        ],
    },
    {
        "name": "an eighth of requests failing (5xx) fires VaeApiHighErrorRatio after 5 minutes",
        "interval": "15s",
        "input_series": [
            request_counts("/reconstruct", "200", 15),
            request_counts("/reconstruct", "500", 5),
            request_counts("/reconstruct", "400", 20),  # client errors do not count
        ],
        "alert_rule_test": [
            {"alertname": "VaeApiHighErrorRatio", "eval_time": "4m", "exp_alerts": []},
        ],
        "promql_expr_test": [
            {
                "expr": "round(job:vae_requests_errors:ratio_rate5m, 0.001)",
                "eval_time": "10m",
                "exp_samples": [{"labels": f'{{job="{JOB}"}}', "value": 0.125}],
            },
            {
                "expr": 'ALERTS{alertname="VaeApiHighErrorRatio"}',
                "eval_time": "10m",
                "exp_samples": [firing("VaeApiHighErrorRatio", job=JOB, severity="critical")],
            },
        ],
    },
    {
        "name": "a route with p99 over 1 s for 10 minutes fires VaeApiHighLatencyP99",
        "interval": "15s",
        "input_series": [
            # /sample: every request between 1 s and 2.5 s, so p99 = 1 + 0.99 * 1.5 s.
            *latency_buckets("/sample", {"1": 0, "2.5": 15, "+Inf": 15}),
            # /encode: every request under 5 ms.
            *latency_buckets("/encode", {"0.005": 15, "1": 15, "2.5": 15, "+Inf": 15}),
        ],
        "alert_rule_test": [
            {"alertname": "VaeApiHighLatencyP99", "eval_time": "8m", "exp_alerts": []},
        ],
        "promql_expr_test": [
            {
                "expr": "round(route:vae_request_duration_seconds:p99_5m, 0.001)",
                "eval_time": "12m",
                "exp_samples": [
                    {"labels": '{route="/sample"}', "value": 2.485},
                    {"labels": '{route="/encode"}', "value": 0.005},
                ],
            },
            {
                "expr": 'ALERTS{alertname="VaeApiHighLatencyP99"}',
                "eval_time": "12m",
                "exp_samples": [
                    firing("VaeApiHighLatencyP99", route="/sample", severity="warning")
                ],
            },
        ],
    },
]


def test_alerts_fire_when_they_should_and_not_before(tmp_path: Path) -> None:
    suite = {"rule_files": [str(RULES)], "evaluation_interval": "15s", "tests": ALERT_TESTS}
    suite_file = tmp_path / "rules_test.yml"
    suite_file.write_text(yaml.safe_dump(suite, sort_keys=False))
    run_promtool("test", "rules", str(suite_file))
