"""deploy/ray against a real Ray Serve on this machine (loopback only): `serve run` of the
project's config, two replicas sharing mixed traffic, a replica killed mid-traffic and
replaced, every replica's latency histograms in a real Prometheus, and a clean shutdown."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest
import ray
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from ray import serve

import app.ray_serve
from app.metrics import Metrics
from app.ray_serve import REPLICA_HEADER, RayMetricsExport, ReplicaHeaderMiddleware, build_app
from app.service.imaging import encode_png
from app.settings import Settings, SettingsError
from training.data import load_dataset, to_float

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "ray" / "serve.yaml"
GPU_CONFIG = REPO / "deploy" / "ray" / "serve-gpu.yaml"
PROMETHEUS_CONFIG = REPO / "deploy" / "ray" / "prometheus.yml"
PROMETHEUS = shutil.which("prometheus")
APP, DEPLOYMENT = "vae", "VaeService"
REQUESTS = 300
CONCURRENCY = 8
# The query of the dashboard's per-replica latency panel, over the last 30 s of 1 s scrapes.
P99_BY_REPLICA = (
    "histogram_quantile(0.99, sum by (le, replica) "
    "(rate(ray_vae_request_duration_seconds_bucket[30s])))"
)

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], T | None], what: str, timeout_s: float, log: Path) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = condition()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            result = None
        if result is not None:
            return result
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-6000:] if log.is_file() else "(no log)"
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tail}")
        time.sleep(0.5)


# ---- the pieces, without Ray ----------------------------------------------------------------


def test_every_response_names_the_replica() -> None:
    plain = FastAPI()

    @plain.get("/models")
    async def models() -> dict[str, str]:
        return {"default": "m"}

    plain.add_middleware(ReplicaHeaderMiddleware, replica="vae#VaeService#abc")
    with TestClient(plain) as client:
        for path in ("/models", "/no-such-route"):
            assert client.get(path).headers[REPLICA_HEADER] == "vae#VaeService#abc"


class RecordingGauge:
    """Stands in for ray.serve.metrics.Gauge: what the export sets, by series and tags."""

    made: ClassVar[dict[str, RecordingGauge]] = {}

    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...]) -> None:
        self.tag_keys = tag_keys
        self.values: dict[tuple[tuple[str, str], ...], float] = {}
        RecordingGauge.made[name] = self

    def set(self, value: float, tags: dict[str, str]) -> None:
        assert tuple(sorted(tags)) == self.tag_keys
        self.values[tuple(sorted(tags.items()))] = value


def test_the_replicas_histograms_are_copied_into_ray_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(app.ray_serve, "Gauge", RecordingGauge)
    RecordingGauge.made = {}
    metrics = Metrics()
    latency = metrics.request_duration.labels("/sample", "POST", "200")
    for seconds in (0.003, 0.004, 0.2):
        latency.observe(seconds)
    export = RayMetricsExport(metrics.registry)
    export.export()
    buckets = RecordingGauge.made["vae_request_duration_seconds_bucket"]
    assert buckets.tag_keys == ("le", "method", "route", "status")
    by_le = {dict(tags)["le"]: value for tags, value in buckets.values.items()}
    assert (by_le["0.0025"], by_le["0.005"], by_le["0.1"], by_le["0.25"], by_le["+Inf"]) == (
        0, 2, 2, 3, 3,
    )  # fmt: skip
    count = RecordingGauge.made["vae_request_duration_seconds_count"]
    assert list(count.values.values()) == [3]
    assert "vae_request_duration_seconds_created" not in RecordingGauge.made
    assert not [name for name in RecordingGauge.made if not name.startswith("vae_")]
    # Cumulative, as Prometheus' rate() wants: the next export carries the new total.
    latency.observe(0.004)
    export.export()
    assert list(count.values.values()) == [4]


def test_a_bad_setting_fails_the_replica_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VAE_DEVICE", "tpu")
    with pytest.raises(SettingsError, match=r"runtime_env: VAE_DEVICE: .*not a device"):
        build_app()


# ---- the config files, as Serve reads them --------------------------------------------------


@pytest.mark.parametrize("path", [CONFIG, GPU_CONFIG], ids=["cpu", "gpu"])
def test_the_serve_configs_are_valid_and_cover_the_drain(path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (application,) = config.applications
    assert application.import_path == "app.ray_serve:deployment"
    (deployment,) = application.deployments
    assert deployment.name == DEPLOYMENT
    settings = Settings(**{
        key.removeprefix("VAE_").lower(): value
        for key, value in application.runtime_env["env_vars"].items()
    })  # fmt: skip
    # Serve waits this long for a stopping replica's drain before killing it.
    assert deployment.graceful_shutdown_timeout_s >= settings.shutdown_drain_s + 2
    # Serve, not the app's own 503 cap, decides where requests go.
    assert deployment.max_ongoing_requests <= settings.max_concurrency
    autoscaling = deployment.autoscaling_config
    assert isinstance(autoscaling, dict)
    assert autoscaling["min_replicas"] >= 2 and autoscaling["max_replicas"] >= 2
    gpus = deployment.ray_actor_options.num_gpus or 0
    assert (gpus > 0) == (path == GPU_CONFIG)
    assert config.http_options.host == "127.0.0.1"


# ---- a real Ray Serve -----------------------------------------------------------------------


@dataclass
class Cluster:
    """The local Ray instance, `serve run`'s process, the HTTP address and the logs."""

    url: str
    serve_run: subprocess.Popen[bytes]
    log: Path
    metrics_port: int


@pytest.fixture(scope="module")
def cluster(
    trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A local Ray instance on loopback, and `serve run` of the project's config against it
    (two replicas serving the test checkpoint on a free port)."""
    folder = tmp_path_factory.mktemp("ray")
    config = yaml.safe_load(CONFIG.read_text())
    port = free_port()
    config["http_options"]["port"] = port
    (application,) = config["applications"]
    application["runtime_env"]["env_vars"]["VAE_CHECKPOINTS"] = str(trained_checkpoint)
    config_file = folder / "serve.yaml"
    config_file.write_text(yaml.safe_dump(config))
    log = folder / "serve-run.log"
    metrics_port = free_port()
    with pytest.MonkeyPatch.context() as environment:
        # Ray's processes inherit this environment: every Ray process on 127.0.0.1 (Ray's
        # single-machine mode; without it Ray takes the machine's address even when told
        # 127.0.0.1), no usage statistics sent, and this checkout's packages in every worker.
        environment.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # This process imported Ray (at collection) before the variable was set: its reading.
        environment.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        environment.setenv("RAY_USAGE_STATS_ENABLED", "0")
        environment.setenv("PYTHONPATH", str(REPO), prepend=os.pathsep)
        context = ray.init(
            address="local",
            num_cpus=4,  # two replicas of one CPU each, and room to start the replacement
            include_dashboard=False,
            _metrics_export_port=metrics_port,
            _system_config={"metrics_report_interval_ms": 1000},
            logging_level="warning",
            log_to_driver=False,
        )
        try:
            assert context.address_info["node_ip_address"] == "127.0.0.1", context.address_info
            with log.open("wb") as output:
                serve_run = subprocess.Popen(
                    [
                        str(Path(sys.executable).with_name("serve")),
                        "run",
                        f"--address={context.address_info['gcs_address']}",
                        str(config_file),
                    ],
                    cwd=REPO,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            try:
                yield Cluster(f"http://127.0.0.1:{port}", serve_run, log, metrics_port)
            finally:
                if serve_run.poll() is None:
                    serve_run.send_signal(signal.SIGINT)
                    try:
                        serve_run.wait(timeout=90)
                    except subprocess.TimeoutExpired:
                        serve_run.kill()
                        serve_run.wait()
        finally:
            ray.shutdown()


def replicas_running(count: int) -> bool | None:
    status = serve.status().applications.get(APP)
    if status is None or status.status != "RUNNING":
        return None
    states = status.deployments[DEPLOYMENT].replica_states
    return True if states == {"RUNNING": count} else None


@dataclass
class Result:
    kind: str
    started: float
    ended: float
    status: int  # 0: no HTTP answer at all
    replica: str | None
    client: int = -1  # which client thread sent it
    body: str = ""  # the answer of a failed request (Serve's error names the replica)


def digit_png() -> bytes:
    test = load_dataset("mnist-5k").test
    return encode_png(to_float(test.images[:1])[0])


def multipart(field: str, payload: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="d.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


class Traffic:
    """Mixed requests (/sample?digit=7 and /anomaly-score uploads) from a pool of clients."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.upload, self.content_type = multipart("file", digit_png())

    def one(self, index: int) -> Result:
        if index % 2:
            kind = "anomaly"
            request = urllib.request.Request(
                f"{self.url}/anomaly-score", data=self.upload, method="POST",
                headers={"Content-Type": self.content_type},
            )  # fmt: skip
        else:
            kind = "sample"
            request = urllib.request.Request(
                f"{self.url}/sample?digit=7&seed={index}", method="POST"
            )
        started = time.monotonic()
        failure = ""
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                body = response.read()
                status, replica = response.status, response.headers.get(REPLICA_HEADER)
                if kind == "anomaly":
                    assert json.loads(body)["items"][0]["digit"] is not None
        except urllib.error.HTTPError as error:
            status, replica = error.code, error.headers.get(REPLICA_HEADER)
            failure = error.read().decode(errors="replace")
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            status, replica, failure = 0, None, repr(error)
        return Result(kind, started, time.monotonic(), status, replica, body=failure)

    def run(self, count: int) -> list[Result]:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            return list(pool.map(self.one, range(count)))


@pytest.fixture(scope="module")
def serving(cluster: Cluster) -> Cluster:
    """The deployment up: both replicas running and answering through Serve's proxy."""

    def ready() -> bool | None:
        if cluster.serve_run.poll() is not None:
            log = cluster.log.read_text()[-6000:]
            pytest.fail(f"serve run exited {cluster.serve_run.returncode}\n{log}")
        with urllib.request.urlopen(f"{cluster.url}/readyz", timeout=5) as response:
            return True if response.status == 200 and replicas_running(2) else None

    wait_for(ready, "two replicas of the deployment to be ready", timeout_s=300, log=cluster.log)
    return cluster


@pytest.mark.slow
def test_two_replicas_share_mixed_traffic(serving: Cluster) -> None:
    results = Traffic(serving.url).run(REQUESTS)
    failed = [r for r in results if r.status != 200]
    assert not failed, failed[:5]
    by_replica: dict[str | None, int] = {}
    for result in results:
        by_replica[result.replica] = by_replica.get(result.replica, 0) + 1
    assert None not in by_replica
    assert len(by_replica) == 2, by_replica
    # Serve spreads the load: each replica took a real share, not a stray request or two.
    assert min(by_replica.values()) >= REQUESTS // 10, by_replica
    with urllib.request.urlopen(f"{serving.url}/models", timeout=5) as response:
        assert json.load(response)["models"][0]["device"] == "cpu"


@pytest.fixture(scope="module")
def prometheus(serving: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus running deploy/ray/prometheus.yml (1 s scrapes) against this Ray."""
    if PROMETHEUS is None:
        pytest.skip("`prometheus` is not on PATH (Debian/Ubuntu: apt-get install prometheus)")
    folder = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = "1s"
    (job,) = config["scrape_configs"]
    job["scrape_interval"], job["scrape_timeout"] = "1s", "1s"
    # The discovery file the shipped config reads is written by Ray's dashboard, which this
    # loopback-only instance runs without: its one metrics agent is named directly instead.
    assert job.pop("file_sd_configs")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{serving.metrics_port}"]}]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = folder / "prometheus.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=5) as response:
        payload = json.load(response)
    assert payload["status"] == "success", payload
    return list(payload["data"]["result"])


@pytest.mark.slow
def test_every_replicas_latency_reaches_prometheus(serving: Cluster, prometheus: str) -> None:
    traffic = Traffic(serving.url)
    answered: set[str] = set()

    def both_replicas() -> dict[str, float] | None:
        # Keep requests coming, so the rates over the last 30 s stay above zero.
        answered.update(r.replica for r in traffic.run(4 * CONCURRENCY) if r.replica)
        result = query(prometheus, P99_BY_REPLICA)
        p99 = {s["metric"].get("replica", ""): float(s["value"][1]) for s in result}
        finite = {replica: value for replica, value in p99.items() if value == value}
        return finite if len(finite) >= 2 else None

    p99 = wait_for(both_replicas, "p99 latency of two replicas in Prometheus", 120, serving.log)
    # The `replica` label is the replica's id, the end of what X-Replica says.
    assert {label for label in p99} <= {full.rsplit("#", 1)[-1] for full in answered}, (
        p99,
        answered,
    )
    assert all(0 < value < 10 for value in p99.values()), p99


def wait_until_dead(actor: Any, timeout_s: float = 60) -> float:
    """When the killed actor is gone: `ray.kill` returns before it dies, and until then a
    request can still be routed to it. A call to a dead actor raises RayActorError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return time.monotonic()
        except ray.exceptions.GetTimeoutError:
            pass
        time.sleep(0.05)
    pytest.fail(f"the killed replica was still alive after {timeout_s:.0f} s")


@pytest.mark.slow
def test_a_killed_replica_is_replaced_and_only_its_requests_in_flight_fail(
    serving: Cluster,
) -> None:
    traffic = Traffic(serving.url)
    results: list[Result] = []
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(10**9))

    def client(number: int) -> None:
        while not stop.is_set():
            with lock:
                index = next(counter)
            result = traffic.one(index)
            result.client = number
            with lock:
                results.append(result)

    clients = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CONCURRENCY)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(3)  # traffic on both replicas before the kill
        with lock:
            before = {r.replica for r in results if r.status == 200}
        assert len(before) == 2, before
        victim = sorted(before)[0]
        (survivor,) = before - {victim}
        actor = ray.get_actor(f"SERVE_REPLICA::{victim}", namespace="serve")
        kill_started = time.monotonic()
        ray.kill(actor, no_restart=True)
        dead = wait_until_dead(actor)

        def replaced() -> str | None:
            with lock:
                newcomers = {r.replica for r in results if r.status == 200} - before
            return next(iter(newcomers)) if newcomers and replicas_running(2) else None

        replacement = wait_for(replaced, "Serve to replace the killed replica", 180, serving.log)
        time.sleep(2)  # and traffic on the new pair
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=90)
    failures = [r for r in results if r.status != 200]
    # Only requests under way while the replica was dying may fail: started before it was
    # dead, answered after the kill began...
    assert all(r.started < dead and r.ended > kill_started for r in failures), (
        failures, kill_started, dead,
    )  # fmt: skip
    # ...each client has one request in flight at a time, so at most one failure each...
    per_client = [r.client for r in failures]
    assert len(per_client) == len(set(per_client)), failures
    # ...and they were the victim's: Serve's error names the replica that died, when it says.
    assert not [r for r in failures if survivor.split("#")[-1] in r.body], failures
    after = [r for r in results if r.started > dead]
    assert after and all(r.status == 200 for r in after)
    assert victim not in {r.replica for r in after}
    assert {survivor, replacement} <= {r.replica for r in after}
    print(
        f"\nray serve kill: {len(results)} requests, {len(failures)} failed "
        f"({sorted({r.status for r in failures})}), in flight at the kill "
        f"{sum(r.started < kill_started < r.ended for r in results)}, dead after "
        f"{dead - kill_started:.2f} s, replaced in "
        f"{min(r.ended for r in results if r.replica == replacement) - dead:.1f} s"
    )


def serve_actors() -> set[str]:
    return {
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == "serve"
    }


@pytest.mark.slow
def test_serve_run_shuts_down_cleanly(serving: Cluster) -> None:
    """Ctrl-C: `serve run` shuts Serve down, each replica draining through its app's lifespan.
    A slow shutdown on a loaded machine passes, a hung one fails: the test waits while the
    shutdown makes progress (Serve's actors go away, `serve run` logs), and fails once nothing
    has changed for longer than a replica may take to drain (graceful_shutdown_timeout_s)."""
    (deployment,) = yaml.safe_load(CONFIG.read_text())["applications"][0]["deployments"]
    stall_limit_s = deployment["graceful_shutdown_timeout_s"] + 30
    serving.serve_run.send_signal(signal.SIGINT)
    last_change, last_state = time.monotonic(), (serve_actors(), serving.log.stat().st_size)
    while serving.serve_run.poll() is None:
        state = (serve_actors(), serving.log.stat().st_size)
        if state != last_state:
            last_change, last_state = time.monotonic(), state
        stalled = time.monotonic() - last_change
        assert stalled < stall_limit_s, (
            f"serve run hung: no progress for {stalled:.0f} s, Serve actors left "
            f"{sorted(state[0])}\n{serving.log.read_text()[-6000:]}"
        )
        time.sleep(1)
    assert serving.serve_run.returncode == 0, serving.log.read_text()[-6000:]
    assert not serve_actors()  # no controller, proxy or replica is left behind
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{serving.url}/healthz", timeout=5)
