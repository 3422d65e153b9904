"""deploy/grafana: the provisioned data source and dashboard, and every PromQL query of the
shipped files, checked against the metrics the service really exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from app.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards"
DASHBOARD = GRAFANA / "dashboards" / "vae.json"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
COMPOSE = REPO / "docker-compose.yml"

# Series Prometheus itself attaches to every scrape target.
PROMETHEUS_BUILTINS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# Series of a classic histogram: the family name itself is never a series.
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Replicas on Ray Serve (app/ray_serve.py) export each `vae_*` series of their own registry
# through Ray's metrics agent, which names it `ray_<series>` and adds the `replica` label
# (tests/deploy/test_ray_serve.py finds them there, in a real Prometheus).
RAY_PREFIX = "ray_"

# PromQL words that are neither metric names nor followed by "(" like functions are.
PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "group_left",
    "group_right",
    "inf",
    "nan",
}
# `by (...)`, `without (...)`, `on (...)`, `ignoring (...)`, `group_left (...)`: label lists.
LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*(?![\w(])(?!\s*\()")


def exported_series() -> set[str]:
    """Series names in the service's exposition, read from `Metrics().render()`.

    Label-less families have samples; labelled ones only their `# TYPE` line until first
    used, so names come from both. A histogram family `x` exports `x_bucket`, `x_sum` and
    `x_count`.
    """
    text = Metrics().render().decode()
    names = set(re.findall(r"^([A-Za-z_:][\w:]*)[{ ]", text, re.MULTILINE))
    for name, kind in re.findall(r"^# TYPE (\S+) (\w+)$", text, re.MULTILINE):
        if kind == "histogram":
            names.discard(name)
            names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
        elif kind == "counter":
            names.add(name if name.endswith("_total") else name + "_total")
        else:
            names.add(name)
    return names


def ray_exported_series() -> set[str]:
    """The service's series as Ray Serve replicas export them."""
    return {RAY_PREFIX + name for name in exported_series() if name.startswith("vae_")}


def recorded_series() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (Grafana's `$variables` allowed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = LABEL_LIST.sub("", expr)
    expr = re.sub(r"\$\{[^}]*\}|\$\w+", "", expr)  # Grafana variables
    expr = re.sub(r"\boffset\s+-?\w+", "", expr)
    return {name for name in IDENTIFIER.findall(expr) if name.lower() not in PROMQL_KEYWORDS}


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels folded into a collapsed row


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        (f"panel {panel['title']!r} {target['refId']}", target["expr"])
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            # label_values(<selector>, <label>): only the selector is PromQL.
            match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
            queries.append((f"variable ${variable['name']}", match[1] if match else query))
    return queries


def rule_queries() -> list[tuple[str, str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [
        (f"rule {rule.get('record') or rule['alert']}", rule["expr"])
        for group in groups
        for rule in group["rules"]
    ]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def datasource() -> dict[str, Any]:
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    return source


def test_metric_names_skips_functions_labels_keywords_and_variables() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (route, le) (rate(a_bucket{route=~"$r", x="y z"}'
        "[$__rate_interval]))) / on (job) group_left sum without (le) (b_total offset 5m)"
        " > bool 1e3 or c:rec:ratio unless absent(up)"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c:rec:ratio", "up"}


def test_exported_series_come_from_the_exporter() -> None:
    series = exported_series()
    assert {
        "vae_request_duration_seconds_bucket",
        "vae_request_duration_seconds_count",
        "vae_requests_rejected_total",
        "vae_requests_in_flight",
        "vae_anomaly_score_bucket",
        "vae_model_info",
    } <= series
    assert "vae_request_duration_seconds" not in series  # a histogram family, not a series


def test_datasource_is_the_compose_prometheus_with_a_fixed_uid(datasource: dict[str, Any]) -> None:
    assert datasource["type"] == "prometheus"
    assert datasource["uid"]
    url = datasource["url"]
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    host = url.removeprefix("http://").split(":")[0]
    assert host in services, f"{url} does not name a compose service"
    assert url == "http://prometheus:9090"


def test_dashboard_provider_reads_where_compose_mounts_the_dashboards() -> None:
    (provider_file,) = PROVIDERS.glob("*.yml")
    (provider,) = yaml.safe_load(provider_file.read_text())["providers"]
    assert provider["type"] == "file"
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    mounts = {m["target"]: m["source"] for m in grafana["volumes"] if isinstance(m, dict)}
    source = mounts[provider["options"]["path"]]
    assert (REPO / source).resolve() == DASHBOARD.parent
    home = PurePosixPath(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == PurePosixPath(provider["options"]["path"])
    assert (DASHBOARD.parent / home.name).is_file()


def test_dashboard_is_valid_json_with_a_stable_uid(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard.get("id") is None  # Grafana assigns ids; a fixed one clashes on import
    ids = [panel["id"] for panel in dashboard_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_panel_has_a_query(dashboard: dict[str, Any]) -> None:
    for panel in dashboard_panels(dashboard):
        if panel["type"] == "row":
            continue
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no target"
        assert all(target.get("expr", "").strip() for target in targets), panel["title"]


def test_every_datasource_reference_is_the_provisioned_one(
    dashboard: dict[str, Any], datasource: dict[str, Any]
) -> None:
    def references(node: Any) -> Iterator[Any]:
        if isinstance(node, dict):
            if "datasource" in node:
                yield node["datasource"]
            for value in node.values():
                yield from references(value)
        elif isinstance(node, list):
            for value in node:
                yield from references(value)

    found = list(references(dashboard))
    assert found
    for reference in found:
        assert reference == {"type": "prometheus", "uid": datasource["uid"]}, reference


def test_dashboard_covers_the_service(dashboard: dict[str, Any]) -> None:
    queried = {name for _, expr in dashboard_queries() for name in metric_names(expr)}
    assert {
        "vae_request_duration_seconds_count",  # request rate
        "vae_request_duration_seconds_bucket",  # latency quantiles
        "job:vae_requests_errors:ratio_rate5m",  # error ratio
        "vae_batch_size_bucket",
        "vae_inference_duration_seconds_bucket",
        "vae_anomaly_score_bucket",
        "vae_queue_depth",
        "vae_requests_in_flight",
        "vae_requests_rejected_total",
        "process_resident_memory_bytes",
        "vae_gpu_memory_allocated_bytes",
    } <= queried
    heatmaps = [p for p in dashboard_panels(dashboard) if p["type"] == "heatmap"]
    assert any(
        "vae_anomaly_score_bucket" in t["expr"] and t.get("format") == "heatmap"
        for panel in heatmaps
        for t in panel["targets"]
    )


@pytest.mark.parametrize(("where", "expr"), dashboard_queries() + rule_queries())
def test_queries_name_only_exported_or_recorded_series(where: str, expr: str) -> None:
    names = metric_names(expr)
    assert names, f"{where}: no metric found in {expr!r}"
    exported = exported_series() | ray_exported_series()
    unknown = names - exported - recorded_series() - PROMETHEUS_BUILTINS
    assert not unknown, f"{where} queries series the service does not export: {unknown}"


def test_dashboard_shows_latency_and_traffic_per_ray_replica(dashboard: dict[str, Any]) -> None:
    per_replica = {
        name
        for _, expr in dashboard_queries()
        if re.search(r"\bby\s*\([^)]*\breplica\b", expr)
        for name in metric_names(expr)
    }
    assert {
        "ray_vae_request_duration_seconds_bucket",  # latency quantiles per replica
        "ray_vae_request_duration_seconds_count",  # request rate per replica
        "ray_vae_inference_duration_seconds_bucket",
    } <= per_replica
