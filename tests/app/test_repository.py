"""Models loaded, reloaded, versioned and unloaded at runtime (app/service/repository.py,
app/http/routes/repository.py): under steady mixed load on a real server, a checkpoint
retrained into the served folder and loaded answers with zero failed requests, every response
from exactly one version and the new version's outputs after the switch; unloading a model
under load leaves the others untouched; a damaged checkpoint keeps the old version; the poll
mode loads a completed save and never a half-written one; tritonclient's repository calls."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pytest
import torch
from app_testing import REPO, LiveApp, files, png_of, start_app, stop_app
from conftest import CONDITIONAL_NAME, UNCONDITIONAL_NAME, serve

from models import VAE
from models.checkpoint import WEIGHTS_NAME, swap_in_progress
from training.config import TrainConfig
from training.run import train

pytestmark = pytest.mark.slow
READY_WITHIN_S = 120.0
LATENT = [0.5, -0.25, 1.0, 0.0, -1.0, 0.75, 0.1, -0.3] * 4  # cut to each model's latent_dim


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another revision of the conditional model: the same recipe, another seed."""
    out = tmp_path_factory.mktemp("retrained") / CONDITIONAL_NAME
    return train(TrainConfig.from_preset("tiny", out=str(out), seed=7, progress=False)).checkpoint


@pytest.fixture
def served(tmp_path: Path, named_checkpoints: dict[str, Path]) -> dict[str, Path]:
    """Both checkpoints in a folder of their own, which the test may retrain or damage."""
    root = tmp_path / "models"
    return {
        name: Path(shutil.copytree(path, root / name)) for name, path in named_checkpoints.items()
    }


def start(tmp_path: Path, served: dict[str, Path], **settings: str) -> LiveApp:
    return start_app(
        tmp_path / "server.log",
        "--checkpoints",
        str(next(iter(served.values())).parent),
        ready_within_s=READY_WITHIN_S,
        settings={"device": "cpu", **settings},
    )


def _digest(folder: Path) -> str:
    return str(json.loads((folder / "config.json").read_text())["weights_sha256"])


def decoded(folder: Path, digit: int = 7) -> np.ndarray:
    """What the model in `folder` decodes LATENT (of its latent size) to, for `digit`."""
    model = VAE.from_pretrained(folder).eval()
    z = torch.tensor([LATENT[: model.config.latent_dim]])
    with torch.inference_mode():
        labels = torch.nn.functional.one_hot(torch.tensor([digit]), 10).float()
        images = model.decode(z, labels)
    return images[0, 0].numpy()


def decode_request(latent_dim: int, conditional: bool = True) -> dict[str, Any]:
    """A v2 -decode request of LATENT (cut to the model's size), for the digit 7 if the model
    takes one."""
    z = {"name": "z", "datatype": "FP32", "shape": [1, latent_dim], "data": LATENT[:latent_dim]}
    digit = {"name": "digit", "datatype": "INT64", "shape": [1], "data": [7]}
    return {"inputs": [z, digit] if conditional else [z]}


def _version(response: httpx2.Response) -> str | None:
    return response.headers.get("x-model-version")


@dataclass
class Answer:
    started: float
    route: str
    status: int
    version: str | None
    payload: Any = None


class MixedLoad:
    """Threads sending /sample, /anomaly-score and a v2 -decode infer until stopped, each
    answer recorded with the version that gave it: a steady load (each thread pauses
    PAUSE_S between requests) that leaves the cores room for the training beside it."""

    PAUSE_S = 0.02

    def __init__(self, base: str, model: str, digit_png: bytes, card: dict[str, Any]) -> None:
        self.base, self.model, self.png = base, model, digit_png
        self.latent_dim, self.conditional = card["latent_dim"], card["conditional"]
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(3)]

    def __enter__(self) -> MixedLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, kind: int) -> None:
        with httpx2.Client(base_url=self.base, timeout=60) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                if kind == 0:
                    digit = {"digit": 7} if self.conditional else {}
                    r = http.post("/sample", params={"model": self.model, "seed": 1, **digit})
                    answer = Answer(
                        started, "sample", r.status_code, r.headers.get("x-model-version")
                    )
                elif kind == 1:
                    r = http.post(
                        "/anomaly-score", params={"model": self.model}, files=files(self.png)
                    )
                    answer = Answer(
                        started, "anomaly", r.status_code, r.headers.get("x-model-version")
                    )
                else:
                    body = decode_request(self.latent_dim, self.conditional)
                    r = http.post(f"/v2/models/{self.model}-decode/infer", json=body)
                    data = r.json() if r.status_code == 200 else {}
                    answer = Answer(
                        started, "v2", r.status_code, data.get("model_version"), data.get("outputs")
                    )
                if answer.status not in (200, 404):
                    answer.payload = r.text  # what went wrong, for the assertion's message
                with self._lock:
                    self.answers.append(answer)
                self._stop.wait(self.PAUSE_S)

    def since(self, moment: float) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if a.started > moment]


def v2_image(answer: Answer) -> np.ndarray:
    (images,) = [o for o in answer.payload if o["name"] == "images"]
    return np.asarray(images["data"], dtype=np.float32).reshape(28, 28)


def test_reload_under_load_switches_versions_with_no_failed_request(
    tmp_path: Path, served: dict[str, Path], mnist_test: tuple[torch.Tensor, torch.Tensor]
) -> None:
    folder = served[CONDITIONAL_NAME]
    old_version, old_image = _digest(folder)[:12], decoded(folder)
    app = start(tmp_path, served, model_control="explicit")
    try:
        with httpx2.Client(base_url=app.base, timeout=60) as http:
            card = next(m for m in http.get("/models").json()["models"] if m["name"] == folder.name)
            assert card["versions"] == [old_version]
            images, labels = mnist_test
            seven = png_of(images[int((labels == 7).nonzero()[0, 0])])
            with MixedLoad(app.base, folder.name, seven, card) as load:
                time.sleep(1.0)
                # Retrain into the served folder (another seed): the training's crash-safe
                # save swaps the new checkpoint in place while the server answers.
                config = TrainConfig.from_preset("tiny", out=str(folder), seed=7, progress=False)
                train(config)
                new_version = _digest(folder)[:12]
                assert new_version != old_version
                asked = time.monotonic()
                loaded = http.post(f"/models/{folder.name}/load")
                switched = time.monotonic()
                assert loaded.status_code == 200, loaded.text
                assert loaded.json() == {
                    "name": folder.name,
                    "version": new_version,
                    "versions": [old_version, new_version],
                }
                time.sleep(1.5)
            answers = load.answers
        new_image = decoded(folder)
        assert np.abs(old_image - new_image).max() > 0.05  # the two revisions draw differently
        before = [a for a in answers if a.started < asked]
        after = load.since(switched)
        assert len(before) > 10 and len(after) > 10, (len(before), len(after))
        assert {a.status for a in answers} == {200}, [a for a in answers if a.status != 200][:3]
        assert {a.version for a in answers} <= {old_version, new_version}
        assert all(a.version is not None for a in answers)
        assert {a.version for a in before} == {old_version}
        assert {a.version for a in after} == {new_version}
        # Each version's own outputs: the v2 images are the floats each revision decodes.
        for answer in [a for a in answers if a.route == "v2"]:
            expected = old_image if answer.version == old_version else new_image
            np.testing.assert_allclose(v2_image(answer), expected, atol=1e-5)
        # The old revision stays loaded and can be pinned, on REST and v2.
        with httpx2.Client(base_url=app.base, timeout=60) as http:
            pinned = http.post("/sample", params={"digit": 7, "version": old_version})
            assert pinned.status_code == 200
            assert pinned.headers["x-model-version"] == old_version
            meta = http.get(f"/v2/models/{folder.name}-decode").json()
            assert meta["versions"] == [old_version, new_version]
            missing = http.post("/sample", params={"version": "0123456789ab"})
            assert missing.status_code == 404
            assert "no loaded version" in missing.json()["detail"]
    finally:
        stop_app(app)


def test_unload_under_load_404s_that_model_only(
    tmp_path: Path, served: dict[str, Path], mnist_test: tuple[torch.Tensor, torch.Tensor]
) -> None:
    app = start(tmp_path, served, model_control="explicit")
    images, labels = mnist_test
    seven = png_of(images[int((labels == 7).nonzero()[0, 0])])
    try:
        with httpx2.Client(base_url=app.base, timeout=60) as http:
            cards = {m["name"]: m for m in http.get("/models").json()["models"]}
            with (
                MixedLoad(app.base, CONDITIONAL_NAME, seven, cards[CONDITIONAL_NAME]) as kept,
                MixedLoad(app.base, UNCONDITIONAL_NAME, seven, cards[UNCONDITIONAL_NAME]) as gone,
            ):
                time.sleep(1.0)
                unloaded = http.post(f"/models/{UNCONDITIONAL_NAME}/unload")
                done = time.monotonic()
                assert unloaded.status_code == 200, unloaded.text
                assert unloaded.json()["name"] == UNCONDITIONAL_NAME
                time.sleep(1.5)
            assert {a.status for a in kept.answers} == {200}
            after = gone.since(done)
            assert after and {a.status for a in after} == {404}
            odd = [a for a in gone.answers if a.status not in (200, 404)]
            assert not odd, odd[:3]
            index = http.post("/v2/repository/index").json()
            states = {row["name"]: row["state"] for row in index}
            assert states == {CONDITIONAL_NAME: "READY", UNCONDITIONAL_NAME: "UNAVAILABLE"}
            # And back: loading it again serves it.
            assert http.post(f"/models/{UNCONDITIONAL_NAME}/load").status_code == 200
            assert http.post("/sample", params={"model": UNCONDITIONAL_NAME}).status_code == 200
    finally:
        stop_app(app)


def test_a_damaged_checkpoint_keeps_the_old_version_and_says_why(
    served: dict[str, Path],
) -> None:
    folder = served[CONDITIONAL_NAME]
    for client in serve(checkpoints=str(folder.parent), device="cpu", model_control="explicit"):
        version = client.post("/sample").headers["x-model-version"]
        weights = folder / WEIGHTS_NAME
        weights.write_bytes(weights.read_bytes()[:1000])  # a truncated file
        failed = client.post(f"/models/{folder.name}/load")
        assert failed.status_code == 400
        assert "could not be loaded" in failed.json()["detail"]
        assert "keeps serving" in failed.json()["detail"]
        still = client.post("/sample")
        assert still.status_code == 200 and still.headers["x-model-version"] == version
        index = {row["name"]: row for row in client.post("/v2/repository/index").json()}
        assert index[folder.name]["state"] == "READY"
        assert client.post("/models/nope/load").status_code == 404


def test_management_is_off_unless_enabled(trained_checkpoint: Path) -> None:
    for client in serve(checkpoints=str(trained_checkpoint), device="cpu"):
        refused = client.post(f"/models/{trained_checkpoint.name}/load")
        assert refused.status_code == 403
        assert "VAE_MODEL_CONTROL=explicit" in refused.json()["detail"]
        v2 = client.post(f"/v2/repository/models/{trained_checkpoint.name}/unload")
        assert v2.status_code == 403 and "VAE_MODEL_CONTROL" in v2.json()["error"]
        assert client.post("/sample").status_code == 200  # nothing was unloaded


def test_management_needs_the_admin_key(served: dict[str, Path]) -> None:
    from test_auth import ADMIN_KEY, KEYS, USER_KEY, bearer

    name = CONDITIONAL_NAME
    for client in serve(
        checkpoints=str(served[name].parent), device="cpu", model_control="explicit", api_keys=KEYS
    ):
        assert client.post(f"/models/{name}/load").status_code == 401
        user = client.post(f"/models/{name}/load", headers=bearer(USER_KEY))
        assert user.status_code == 403 and "admin" in user.json()["detail"]
        index = client.post("/v2/repository/index", headers=bearer(USER_KEY))
        assert index.status_code == 403
        assert client.post(f"/models/{name}/load", headers=bearer(ADMIN_KEY)).status_code == 200


def test_tritonclient_repository_calls(tmp_path: Path, served: dict[str, Path]) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    app = start(tmp_path, served, model_control="explicit")
    try:
        client = triton.InferenceServerClient(app.base.removeprefix("http://"))
        index = client.get_model_repository_index()
        assert {row["name"] for row in index} == {CONDITIONAL_NAME, UNCONDITIONAL_NAME}
        assert all(row["state"] == "READY" for row in index)
        client.unload_model(f"{UNCONDITIONAL_NAME}-decode")  # a v2 name: its whole model
        assert not client.is_model_ready(f"{UNCONDITIONAL_NAME}-decode")
        with pytest.raises(InferenceServerException, match="no v2 model"):
            client.get_model_metadata(f"{UNCONDITIONAL_NAME}-decode")
        client.load_model(UNCONDITIONAL_NAME)
        assert client.is_model_ready(f"{UNCONDITIONAL_NAME}-decode")
        with pytest.raises(InferenceServerException, match="no model named"):
            client.load_model("nope")
    finally:
        stop_app(app)


def test_poll_loads_a_completed_save_and_never_a_half_written_one(
    tmp_path: Path, served: dict[str, Path], retrained: Path
) -> None:
    folder = served[CONDITIONAL_NAME]
    old_version, new_version = _digest(folder)[:12], _digest(retrained)[:12]
    app = start(tmp_path, served, model_control="poll", model_poll_interval_s="0.2")
    try:
        with httpx2.Client(base_url=app.base, timeout=60) as http:

            def version() -> str:
                answer = http.post("/sample", params={"model": folder.name})
                assert answer.status_code == 200
                return str(answer.headers["x-model-version"])

            assert version() == old_version
            # A save in progress: the new checkpoint half-staged beside the folder, and the
            # folder itself already replaced (the save's middle steps). Never loaded.
            staging = folder.with_name(f".{folder.name}.new")
            shutil.copytree(retrained, staging)
            (staging / WEIGHTS_NAME).write_bytes(b"half")
            shutil.rmtree(folder)
            shutil.copytree(retrained, folder)
            assert swap_in_progress(folder)
            time.sleep(1.5)
            assert version() == old_version
            shutil.rmtree(staging)  # the save completes
            deadline = time.monotonic() + 30
            while version() != new_version:
                assert time.monotonic() < deadline, "the completed save was not loaded"
                time.sleep(0.2)
        assert "now serves version " + new_version in app.log.read_text()
    finally:
        stop_app(app)


def test_a_swap_in_progress_is_seen_by_its_markers(tmp_path: Path) -> None:
    folder = tmp_path / "default"
    folder.mkdir()
    assert not swap_in_progress(folder)
    (tmp_path / ".default.old").mkdir()
    assert swap_in_progress(folder)


def test_version_header_on_rest_and_model_version_on_v2(served: dict[str, Path]) -> None:
    folder = served[CONDITIONAL_NAME]
    version = _digest(folder)[:12]
    for client in serve(checkpoints=str(folder), device="cpu"):
        assert client.post("/sample").headers["x-model-version"] == version
        assert client.get("/healthz").headers.get("x-model-version") is None
        card = client.get("/models").json()["models"][0]
        assert card["version"] == version and card["versions"] == [version]
        latent_dim = card["latent_dim"]
        body = decode_request(latent_dim)
        answer = client.post(f"/v2/models/{folder.name}-decode/infer", json=body).json()
        assert answer["model_version"] == version
        pinned = client.post(f"/v2/models/{folder.name}-decode/versions/{version}/infer", json=body)
        assert pinned.status_code == 200
        legacy = client.post(f"/v2/models/{folder.name}-decode/versions/1/infer", json=body)
        assert legacy.json()["model_version"] == version  # "1" of earlier releases: the newest
        unknown = f"/v2/models/{folder.name}-decode/versions/0123456789ab/infer"
        wrong = client.post(unknown, json=body)
        assert wrong.status_code == 404 and "no loaded version" in wrong.json()["error"]


def readme_reload_commands() -> list[tuple[str, str | None]]:
    """The README's reload block: each command with the comment that says what it prints."""
    text = (REPO / "README.md").read_text()
    start = text.index("**Reloading and versions.**")
    (block, *_) = re.findall(r"```bash\n(.*?)```", text[start:], re.S)
    commands = []
    for line in block.splitlines():
        command, _, comment = line.partition("#")
        commands.append((command.strip(), comment.strip() or None))
    return commands


def test_the_readme_reload_commands_work_as_printed(
    tmp_path: Path, served: dict[str, Path]
) -> None:
    """The README's block, in order, against a real server: started as it says (on a folder of
    checkpoints with one named `default`), a retraining into the served folder (with the tiny
    preset, which the test adds so as to train in seconds), then each curl, whose JSON has the
    keys and values its comment shows (digests aside)."""
    # A folder of its own: the `served` fixture's `models/` folder would shadow the package
    # for a command run beside it.
    work = tmp_path / "readme"
    root = work / "checkpoints"
    shutil.copytree(served[CONDITIONAL_NAME], root / "default")
    (serve_line, _), (train_line, _), *curls = readme_reload_commands()
    assert serve_line == "VAE_MODEL_CONTROL=explicit python -m app --checkpoints checkpoints/"
    app = start_app(
        tmp_path / "server.log",
        "--checkpoints",
        str(root),
        ready_within_s=READY_WITHIN_S,
        settings={"model_control": "explicit", "device": "cpu"},
    )
    try:
        assert train_line.startswith("python -m training --out checkpoints/default ")
        trained = subprocess.run(
            [*shlex.split(train_line.replace("python", sys.executable, 1)), "--preset", "tiny",
             "--no-progress", "--no-sample-quality"],
            cwd=work, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        assert trained.returncode == 0, trained.stderr[-2000:]
        answers = []
        for command, printed in curls:
            assert command.startswith("curl ") and printed is not None
            done = subprocess.run(
                [*shlex.split(command.replace("localhost:8000", f"127.0.0.1:{app.port}")), "-sS"],
                capture_output=True, text=True, timeout=120, check=True,
            )  # fmt: skip
            answer = json.loads(done.stdout)
            shown = json.loads(re.sub(r'"[0-9a-f]{4}\.\.\."', '"digest"', printed))
            digestless = re.sub(r'"[0-9a-f]{12}"', '"digest"', json.dumps(answer))
            assert json.loads(digestless) == shown, (command, answer)
            answers.append(answer)
        loaded, index, unloaded = answers
        new_version = _digest(root / "default")[:12]
        assert loaded["version"] == new_version == loaded["versions"][-1] == index[0]["version"]
        assert unloaded["unloaded"] == loaded["versions"]
        assert httpx2.post(f"{app.base}/sample", timeout=30).status_code == 404
    finally:
        stop_app(app)


def test_a_rollback_to_a_loaded_version_makes_it_the_newest_again(
    served: dict[str, Path], retrained: Path
) -> None:
    folder = served[CONDITIONAL_NAME]
    old = folder.with_name("old")
    shutil.copytree(folder, old)
    old_version, new_version = _digest(folder)[:12], _digest(retrained)[:12]
    for client in serve(checkpoints=str(folder), device="cpu", model_control="explicit"):
        shutil.rmtree(folder)
        shutil.copytree(retrained, folder)
        assert client.post(f"/models/{folder.name}/load").json()["version"] == new_version
        shutil.rmtree(folder)
        shutil.copytree(old, folder)  # the previous checkpoint restored
        rolled = client.post(f"/models/{folder.name}/load").json()
        assert rolled["version"] == old_version
        assert rolled["versions"] == [new_version, old_version]  # oldest first
        assert client.post("/sample").headers["x-model-version"] == old_version
        meta = client.get(f"/v2/models/{folder.name}-decode").json()
        assert meta["versions"] == [new_version, old_version]
