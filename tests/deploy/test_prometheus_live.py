"""deploy/prometheus against the real service: the api (`python -m app`) on a loopback port,
scraped by a real Prometheus running the shipped config and rules, queried over its HTTP API."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from prometheus_client import CONTENT_TYPE_LATEST

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
JOB = "vae-api"
PROMETHEUS = shutil.which("prometheus")
# The query: p99 latency per route over the last 30 s of 1 s scrapes.
P99_30S = (
    "histogram_quantile(0.99, sum by (le, route) (rate(vae_request_duration_seconds_bucket[30s])))"
)
TRAFFIC_REQUESTS = 200
TRAFFIC_SECONDS = 5.0
CONCURRENCY = 4
OVERLOAD_REQUESTS = 60

pytestmark = [
    pytest.mark.slow,
    # Only a missing binary skips; once it is there, every failure is a failure.
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="`prometheus` is not on PATH (Debian/Ubuntu: apt-get install prometheus)",
    ),
]

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else "(no log)"


@dataclass
class Server:
    """A process started by the test, the loopback URL it serves and where its output goes."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def diagnosis(self) -> str:
        state = "running" if self.process.poll() is None else f"exited {self.process.returncode}"
        return f"{self.name} ({state}) log:\n{tail(self.log)}"


@contextmanager
def running(
    name: str, argv: list[str], url: str, log: Path, settings: dict[str, str] | None = None
) -> Iterator[Server]:
    """Run `argv` with its output in `log`; stop it on the way out, whatever happened."""
    # Without the caller's VAE_* variables: the flags and `settings` alone configure the api.
    env = {key: value for key, value in os.environ.items() if not key.startswith("VAE_")}
    env.update(settings or {})
    with log.open("wb") as output:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=env
        )
        try:
            yield Server(name, process, url, log)
        finally:
            # SIGTERM first: both shut down cleanly on it. The api's graceful shutdown may take
            # VAE_REQUEST_TIMEOUT_S + 1 s with requests in flight, so give it that, then kill.
            process.terminate()
            try:
                process.wait(timeout=35)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def wait_for(
    condition: Callable[[], T | None], what: str, servers: list[Server], timeout_s: float
) -> T:
    """Poll `condition()` until it returns a result (None: not yet); fail with the servers' logs
    if it never does, or if one of them exits meanwhile."""
    deadline = time.monotonic() + timeout_s
    while True:
        for server in servers:
            if server.process.poll() is not None:
                pytest.fail(f"{server.name} exited while waiting for {what}\n{server.diagnosis()}")
        try:
            result = condition()
        except (urllib.error.URLError, ConnectionError):  # not listening (or ready) yet
            result = None
        if result is not None:
            return result
        if time.monotonic() > deadline:
            logs = "\n\n".join(server.diagnosis() for server in servers)
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{logs}")
        time.sleep(0.5)


def query(prometheus: Server, expr: str) -> list[dict[str, Any]]:
    """The instant vector `expr` evaluates to now, from Prometheus' HTTP API."""
    url = f"{prometheus.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=5) as response:
        payload = json.load(response)
    assert payload["status"] == "success", payload
    assert payload["data"]["resultType"] == "vector", payload
    return list(payload["data"]["result"])


def sample_value(result: list[dict[str, Any]], **labels: str) -> float | None:
    """The value of the one series in `result` carrying `labels`; None when there is none."""
    matching = [s for s in result if all(s["metric"].get(k) == v for k, v in labels.items())]
    assert len(matching) <= 1, matching
    return float(matching[0]["value"][1]) if matching else None


def finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def api_get(prometheus: Server, path: str) -> Any:
    with urllib.request.urlopen(f"{prometheus.url}{path}", timeout=5) as response:
        payload = json.load(response)
    assert payload["status"] == "success", payload
    return payload["data"]


def prometheus_config(api_target: str) -> dict[str, Any]:
    """The shipped config, scraping `api_target` every second and evaluating rules as often."""
    config = yaml.safe_load(CONFIG.read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    (job,) = config["scrape_configs"]
    assert job["job_name"] == JOB
    job["scrape_interval"] = "1s"  # the job's own 5 s would override the global one
    job["scrape_timeout"] = "1s"  # may not exceed the interval
    job["static_configs"] = [{"targets": [api_target]}]
    return config


@pytest.fixture(scope="module")
def api(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real service on a free loopback port, ready (models loaded and warmed up)."""
    port = free_port()
    log = tmp_path_factory.mktemp("api") / "api.log"
    argv = [
        sys.executable,
        "-m",
        "app",
        f"--checkpoints={trained_checkpoint}",
        "--host=127.0.0.1",
        f"--port={port}",
        "--device=cpu",  # this test is about metrics; the same on every machine
    ]
    # A cap of 4 requests in progress (the traffic below sends one at a time) and the test
    # fault hook, so that the last test can saturate the server with a few requests. One worker:
    # the cap is per worker, and several would share the saturating requests out (the workers'
    # summed metrics have their own test, tests/app/test_server.py).
    settings = {
        "VAE_MAX_CONCURRENCY": str(CONCURRENCY),
        "VAE_ENABLE_TEST_HOOKS": "true",
        "VAE_WORKERS": "1",
    }
    with running("api", argv, f"http://127.0.0.1:{port}", log, settings) as server:

        def ready() -> bool | None:
            with urllib.request.urlopen(f"{server.url}/readyz", timeout=5) as response:
                return True if response.status == 200 else None

        # uvicorn listens only once the lifespan has loaded and warmed up the model.
        wait_for(ready, "the api's /readyz to answer 200", [server], timeout_s=120)
        yield server


@pytest.fixture(scope="module")
def prometheus(api: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real Prometheus running the shipped config and rules against `api`."""
    assert PROMETHEUS is not None  # the module is skipped otherwise
    folder = tmp_path_factory.mktemp("prometheus")
    config_file = folder / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(prometheus_config(api.url.removeprefix("http://"))))
    # Beside the config, so its relative `rule_files: [rules.yml]` resolves as in the container.
    shutil.copy(RULES, folder / "rules.yml")
    port = free_port()
    argv = [
        PROMETHEUS,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with running(
        "prometheus", argv, f"http://127.0.0.1:{port}", folder / "prometheus.log"
    ) as server:

        def scraped_up() -> float | None:
            return sample_value(query(server, f'up{{job="{JOB}"}}'))

        # At least one scrape before the traffic, so the counters' first increase is seen.
        up = wait_for(scraped_up, "a first scrape of the api", [api, server], timeout_s=60)
        assert up == 1, f"up{{job={JOB!r}}} is {up}: the scrape failed\n{server.diagnosis()}"
        yield server


@pytest.fixture(scope="module")
def traffic(api: Server, prometheus: Server) -> dict[int, int]:
    """Requests to /sample spread over ~5 s (several scrapes); the count of each status."""
    statuses: dict[int, int] = {}
    started = time.monotonic()
    for i in range(TRAFFIC_REQUESTS):
        # Paced, not a burst, so the histogram grows across scrapes as real traffic does.
        pause = started + i * TRAFFIC_SECONDS / TRAFFIC_REQUESTS - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        request = urllib.request.Request(f"{api.url}/sample?n=4&seed={i}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
                status = response.status
        except urllib.error.HTTPError as error:
            status = error.code
        statuses[status] = statuses.get(status, 0) + 1
    return statuses


def test_metrics_content_type_is_one_prometheus_parses(api: Server) -> None:
    with urllib.request.urlopen(f"{api.url}/metrics", timeout=5) as response:
        content_type = response.headers["Content-Type"]
    assert content_type == CONTENT_TYPE_LATEST
    # Prometheus 3 (the compose image) fails a scrape whose Content-Type it does not know,
    # where the 2.x of CI would fall back to the text format and hide the problem.
    media_type, *params = (part.strip() for part in content_type.split(";"))
    assert media_type == "text/plain"
    assert "version=0.0.4" in params or "version=1.0.0" in params, content_type


def test_the_api_is_scraped(prometheus: Server) -> None:
    assert sample_value(query(prometheus, f'up{{job="{JOB}"}}')) == 1
    in_flight = query(prometheus, "vae_requests_in_flight")
    assert [series["metric"]["job"] for series in in_flight] == [JOB]


def test_p99_latency_of_sample_is_finite(
    api: Server, prometheus: Server, traffic: dict[int, int]
) -> None:
    assert traffic == {200: TRAFFIC_REQUESTS}, traffic

    def p99_of_sample() -> float | None:
        return finite(sample_value(query(prometheus, P99_30S), route="/sample"))

    # Well inside the 30 s window after the last request, which keeps the rate non-zero.
    p99 = wait_for(p99_of_sample, "a finite p99 for /sample", [api, prometheus], timeout_s=25)
    # At most the largest finite bucket (10 s); a loopback /sample of 4 images is far below.
    assert 0 < p99 <= 10


def test_recording_rules_produce_series_for_sample(
    api: Server, prometheus: Server, traffic: dict[int, int]
) -> None:
    for record in (
        "route:vae_request_duration_seconds:p50_5m",
        "route:vae_request_duration_seconds:p99_5m",
        "route:vae_requests:rate5m",
        "route:vae_requests_errors:ratio_rate5m",
    ):

        def recorded(record: str = record) -> float | None:
            return finite(sample_value(query(prometheus, record), route="/sample"))

        value = wait_for(recorded, f"{record} for /sample", [api, prometheus], timeout_s=30)
        assert value >= 0, (record, value)
    # No 5xx in the traffic: the ratio is exactly 0, present rather than absent.
    ratio = sample_value(
        query(prometheus, "route:vae_requests_errors:ratio_rate5m"), route="/sample"
    )
    assert ratio == 0


def test_every_shipped_rule_loads_and_evaluates_cleanly(
    prometheus: Server, traffic: dict[int, int]
) -> None:
    shipped = {
        rule.get("record") or rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    }

    def evaluated_rules() -> list[dict[str, Any]] | None:
        rules = [
            rule
            for group in api_get(prometheus, "/api/v1/rules")["groups"]
            for rule in group["rules"]
        ]
        # Health stays "unknown" until a rule's first evaluation.
        return rules if all(rule.get("health") != "unknown" for rule in rules) else None

    rules = wait_for(evaluated_rules, "every rule to be evaluated", [prometheus], timeout_s=30)
    assert {rule["name"] for rule in rules} == shipped
    unhealthy = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not unhealthy
    alerts = api_get(prometheus, "/api/v1/alerts")["alerts"]
    assert not [alert for alert in alerts if alert["state"] in ("pending", "firing")], alerts


def post(url: str, headers: dict[str, str] | None = None) -> int:
    """The status of a POST without a body."""
    request = urllib.request.Request(url, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


# Last in the module: it makes the error ratio alert pending, which the tests above rule out.
def test_requests_refused_at_saturation_reach_the_error_ratio_and_scrapes_go_on(
    api: Server, prometheus: Server, traffic: dict[int, int]
) -> None:
    sample = f"{api.url}/sample"
    with ThreadPoolExecutor(CONCURRENCY) as holders:
        # One request stalls the model for 5 s (test fault hook); three more queue behind it:
        # CONCURRENCY requests in progress, so the server is saturated.
        held = [holders.submit(post, sample, {"X-Test-Fault": "slow=5"})]
        time.sleep(0.5)
        held += [holders.submit(post, sample) for _ in range(CONCURRENCY - 1)]
        time.sleep(0.5)
        # The first refusal creates the 503 series; rate() counts what comes after the first
        # scrape of it, so the rest follow two scrapes later, paced like sustained overload.
        refused = [post(sample)]
        time.sleep(2)
        for _ in range(OVERLOAD_REQUESTS - 1):
            refused.append(post(sample))
            time.sleep(0.02)
        assert [future.result() for future in held] == [200] * CONCURRENCY
    assert refused == [503] * OVERLOAD_REQUESTS

    def counted() -> float | None:
        result = query(prometheus, 'vae_requests_rejected_total{reason="concurrency"}')
        value = sample_value(result, job=JOB)
        return value if value == OVERLOAD_REQUESTS else None

    wait_for(counted, "the refusals in Prometheus", [api, prometheus], timeout_s=15)

    def error_ratio() -> float | None:
        ratio = finite(sample_value(query(prometheus, "job:vae_requests_errors:ratio_rate5m")))
        return ratio if ratio is not None and ratio > 0.05 else None

    # OVERLOAD_REQUESTS 503s among the traffic, scrapes and held requests: over 5%.
    wait_for(error_ratio, "an error ratio over 5%", [api, prometheus], timeout_s=15)

    def alert_pending() -> list[dict[str, Any]] | None:
        alerts = api_get(prometheus, "/api/v1/alerts")["alerts"]
        found = [a for a in alerts if a["labels"]["alertname"] == "VaeApiHighErrorRatio"]
        return found or None

    (alert,) = wait_for(alert_pending, "VaeApiHighErrorRatio", [api, prometheus], timeout_s=15)
    assert alert["state"] == "pending"  # its `for: 5m` has just begun
    # /metrics stayed within its reserve above the cap: no scrape failed during the overload.
    assert sample_value(query(prometheus, f'min_over_time(up{{job="{JOB}"}}[1m])')) == 1
