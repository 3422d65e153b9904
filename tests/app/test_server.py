"""Tests for app.__main__: the real server over real HTTP, and startup failures as exit codes."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import numpy as np
import pytest
import torch
from app_testing import REPO, clean_environment, open_image, png_of, start_app, stop_app
from prometheus_client.parser import text_string_to_metric_families

from models import load_checkpoint

pytestmark = pytest.mark.slow

READY_WITHIN_S = 60.0


def run_app(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=REPO,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def server(
    trained_checkpoint: Path, tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`python -m app` on a free port, ready."""
    app = start_app(
        tmp_path / "server.log",
        "--checkpoints",
        str(trained_checkpoint),
        ready_within_s=READY_WITHIN_S,
    )
    try:
        yield app.base, app.process
    finally:
        stop_app(app)


def test_real_server_serves_and_stops_cleanly_on_sigterm(
    server: tuple[str, subprocess.Popen[bytes]], mnist_test: tuple[torch.Tensor, torch.Tensor]
) -> None:
    base, process = server
    with httpx2.Client(base_url=base, timeout=30) as http:
        sample = http.post("/sample", params={"digit": 7, "seed": 3})
        assert sample.status_code == 200
        assert sample.headers["content-type"] == "image/png"
        assert sample.headers["x-seed"] == "3"
        image = open_image(sample.content)
        assert (image.mode, image.size) == ("L", (28, 28))
        assert np.asarray(image).std() > 0

        images, labels = mnist_test
        seven = png_of(images[int((labels == 7).nonzero()[0])])
        blank = png_of(torch.zeros(1, 28, 28))
        scored = http.post(
            "/anomaly-score",
            files=[
                ("file", ("seven.png", seven, "image/png")),
                ("file", ("b.png", blank, "image/png")),
            ],
        )
        assert scored.status_code == 200
        normal, empty = scored.json()["items"]
        assert normal["score"] < empty["score"]
        assert empty["is_anomaly"]

        assert http.post("/sample", params={"digit": 10}).status_code == 422
        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        counts = {
            (s.labels["route"], s.labels["status"]): s.value
            for family in text_string_to_metric_families(metrics.text)
            for s in family.samples
            if s.name == "vae_request_duration_seconds_count"
        }
        assert counts[("/sample", "200")] == 1
        assert counts[("/sample", "422")] == 1
        assert counts[("/anomaly-score", "200")] == 1

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def assert_fails_cleanly(result: subprocess.CompletedProcess[str], *mentions: str) -> None:
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for mention in mentions:
        assert mention in errors[0]


def test_workers_share_the_load_and_metrics_add_up_across_them(
    trained_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two worker processes (the default on 2 cores) behind one port: whichever answers
    /metrics counts every worker's requests, and SIGTERM stops them all."""
    metrics_dir = tmp_path / "metrics"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))  # to see whose files
    app = start_app(
        tmp_path / "server.log",
        "--checkpoints",
        str(trained_checkpoint),
        ready_within_s=2 * READY_WITHIN_S,
        settings={"workers": "2"},
    )
    requests = 48

    def one(index: int) -> int:
        # A connection per request: the kernel hands each to whichever worker accepts first.
        with httpx2.Client(base_url=app.base, timeout=30) as http:
            return http.post("/sample", params={"digit": index % 10, "seed": index}).status_code

    try:
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(one, range(requests))) == [200] * requests
        workers = {int(p.name.rsplit("_", 1)[1][:-3]) for p in metrics_dir.glob("gauge_*.db")}
        assert len(workers) == 2, sorted(metrics_dir.iterdir())
        served = {int(p.name.rsplit("_", 1)[1][:-3]) for p in metrics_dir.glob("histogram_*.db")}
        for _ in range(6):  # scrapes land on either worker
            text = httpx2.get(f"{app.base}/metrics", timeout=30).text
            counts = {
                s.labels["route"]: s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name == "vae_request_duration_seconds_count" and s.labels["status"] == "200"
            }
            assert counts["/sample"] == requests, (counts, served)
            assert metric_value(text, "vae_model_info") == 1.0
            assert metric_value(text, "vae_requests_in_flight") == 1.0  # this scrape
            assert metric_value(text, "process_resident_memory_bytes") > 0
        app.process.send_signal(signal.SIGTERM)
        assert app.process.wait(timeout=60) == 0, app.log.read_text()
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), pid
    finally:
        stop_app(app)


def metric_value(text: str, name: str) -> float:
    values = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]
    assert len(values) == 1, (name, values)
    return values[0]


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_missing_checkpoint_folder_exits_2_with_one_error_line() -> None:
    result = run_app("--checkpoints", "/nonexistent")
    assert_fails_cleanly(result, "/nonexistent", "does not exist")


def flip_a_weight_byte(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))


def break_config(folder: Path) -> None:
    (folder / "config.json").write_text('{"model": ')


def drop_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


@pytest.mark.parametrize(
    ("damage", "named_file"),
    [
        (flip_a_weight_byte, "model.safetensors"),
        (break_config, "config.json"),
        (drop_weights, "model.safetensors"),
    ],
)
def test_corrupt_checkpoint_exits_2_with_one_error_line(
    tmp_path: Path,
    trained_checkpoint: Path,
    damage: Callable[[Path], None],
    named_file: str,
) -> None:
    folder = Path(shutil.copytree(trained_checkpoint, tmp_path / "damaged"))
    damage(folder)
    assert_fails_cleanly(run_app("--checkpoints", str(folder)), named_file)


def test_invalid_setting_exits_2_with_one_error_line(trained_checkpoint: Path) -> None:
    result = run_app("--checkpoints", str(trained_checkpoint), "--device", "tpu")
    assert_fails_cleanly(result, "VAE_DEVICE")


# ---- --train-if-missing: what `make run` and the compose api run --------------------------


def test_first_start_training_runs_on_the_service_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_gpu: Callable[..., None]
) -> None:
    import training.cli
    from app.__main__ import _train_if_missing
    from app.settings import Settings

    calls: list[list[str]] = []
    monkeypatch.setattr(training.cli, "main", lambda argv: calls.append(list(argv)) or 0)
    fake_gpu((8, 6))
    for device, expected in (("cpu", "cpu"), ("auto", "cuda"), ("cuda:0", "cuda:0")):
        _train_if_missing(Settings(checkpoints=str(tmp_path / "new"), device=device), "tiny")
        argv = calls.pop()
        assert argv[argv.index("--device") + 1] == expected, device
        assert argv[argv.index("--preset") + 1] == "tiny"
        # Ready sooner: no judge or CAS classifiers, a 1-sample IWAE.
        assert "--no-sample-quality" in argv and argv[argv.index("--iwae-k") + 1] == "1"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_first_start_training_on_a_device_that_is_not_there_fails_before_training(
    tmp_path: Path,
) -> None:
    target = tmp_path / "default"
    result = run_app("--train-if-missing", "--checkpoints", str(target), "--device", "cuda")
    assert_fails_cleanly(result, "VAE_DEVICE=cuda", "no CUDA device")
    assert not target.exists()


def test_train_if_missing_trains_then_serves_and_later_starts_skip_it(tmp_path: Path) -> None:
    target = tmp_path / "default"
    args = ("--train-if-missing", "--train-preset", "tiny", "--checkpoints", str(target))
    settings = {"device": "cpu"}
    first = start_app(tmp_path / "first.log", *args, ready_within_s=900, settings=settings)
    try:
        with httpx2.Client(base_url=first.base, timeout=30) as http:
            (card,) = http.get("/models").json()["models"]
            assert (card["name"], card["device"], card["epochs"]) == ("default", "cpu", 12)
            assert card["anomaly"]["threshold"] > 0 and card["index"] is not None
            assert http.post("/sample", params={"digit": 7}).status_code == 200
    finally:
        stop_app(first)
    log = first.log.read_text()
    assert f"no checkpoint in {target}: training the tiny preset into it first, on cpu" in log
    assert "training preset 'tiny' on cpu" in log
    # Every stage after the epochs says when it starts and how long it took.
    for stage in ("fitting the decoder temperature", "evaluating epoch", "scoring the held-out"):
        assert stage in log, stage
    assert log.count("  done in ") >= 4

    second = start_app(tmp_path / "second.log", *args, ready_within_s=120, settings=settings)
    stop_app(second)
    assert "no checkpoint in" not in second.log.read_text()


def test_sigterm_during_first_start_training_stops_it_cleanly(tmp_path: Path) -> None:
    target = tmp_path / "default"
    log = tmp_path / "server.log"
    env = {**clean_environment(), "VAE_DEVICE": "cpu"}
    argv = [sys.executable, "-m", "app", "--train-if-missing", "--train-preset", "tiny"]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*argv, "--checkpoints", str(target)],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        last_epoch = target / "train_state" / "last" / "state.pt"
        deadline = time.monotonic() + 600
        while not last_epoch.is_file():  # an epoch saved: mid-training
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "SIGTERM: stopped the first-start training" in log.read_text()
    # No half-written checkpoint: no final one at all, the epoch folders whole, nothing staged.
    assert not (target / "config.json").exists()
    assert load_checkpoint(target / "train_state" / "last").metadata["training"]["epoch"] >= 1
    assert list(tmp_path.rglob("*staging*")) == []


def test_an_unknown_train_preset_is_refused_before_anything_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from app.__main__ import _parse

    with pytest.raises(SystemExit) as exited:
        _parse(["--train-if-missing", "--train-preset", "huge"])
    assert exited.value.code == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err
    assert _parse(["--train-preset", "tiny"]).train_preset == "tiny"


def test_the_c_http_parser_and_loop_serve_alike(trained_checkpoint: Path, tmp_path: Path) -> None:
    """VAE_HTTP=httptools runs uvicorn on httptools and uvloop (their C extensions are mapped
    into the server process, which the default h11 on asyncio never loads) and answers alike."""

    def mapped(pid: int) -> str:
        return Path(f"/proc/{pid}/maps").read_text()

    for http_setting, loaded in (("h11", False), ("httptools", True)):
        app = start_app(
            tmp_path / f"{http_setting}.log",
            "--checkpoints",
            str(trained_checkpoint),
            ready_within_s=READY_WITHIN_S,
            settings={"http": http_setting},
        )
        try:
            with httpx2.Client(base_url=app.base, timeout=30) as http:
                sample = http.post("/sample", params={"digit": 7, "seed": 3})
                assert sample.status_code == 200 and sample.headers["x-seed"] == "3"
            maps = mapped(app.process.pid)
            assert ("uvloop" in maps and "httptools" in maps) is loaded, http_setting
        finally:
            stop_app(app)
