"""API keys (app/http/auth.py, api_keys.py): 401 without a valid key, 403 without the route's
role, 429 past a key's rate, open probes and page, keys from the setting or a hashed file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from app_testing import (
    JSON_ACCEPT,
    REPO,
    files,
    metric,
    metrics_text,
    png_of,
    start_app,
    stop_app,
)
from conftest import serve
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.settings import Settings

USER_KEY = "user-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
KEYS = f"alice:user:{USER_KEY},root:admin:{ADMIN_KEY}"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(trained_checkpoint: Path) -> Iterator[TestClient]:
    yield from serve(
        checkpoints=str(trained_checkpoint), device="cpu", api_keys=KEYS, enable_bench_routes=True
    )


def test_model_routes_need_a_valid_key(keyed: TestClient) -> None:
    missing = keyed.post("/sample?digit=7")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="vae-serve"'
    assert missing.headers["connection"] == "close"  # its body was never read
    assert "needs an API key" in missing.json()["detail"]
    wrong = keyed.post("/sample?digit=7", headers=bearer("not-a-key-0123456789"))
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"] == 'Bearer realm="vae-serve", error="invalid_token"'
    assert wrong.json()["detail"] == "this API key is not valid"
    assert keyed.post("/sample?digit=7", headers=bearer(USER_KEY)).status_code == 200
    # LitServe's header works too, and an admin key may do what a user key may.
    assert keyed.post("/sample?digit=7", headers={"X-API-Key": USER_KEY}).status_code == 200
    assert keyed.get("/models", headers=bearer(ADMIN_KEY)).status_code == 200
    assert keyed.get("/models").status_code == 401


def test_v2_routes_answer_401_in_the_protocols_error_form(keyed: TestClient) -> None:
    (card,) = keyed.get("/models", headers=bearer(USER_KEY)).json()["models"]
    model, latent_dim = card["name"], card["latent_dim"]
    z = {"name": "z", "shape": [1, latent_dim], "datatype": "FP32", "data": [0.0] * latent_dim}
    digit = {"name": "digit", "shape": [1], "datatype": "INT64", "data": [3]}
    body = {"inputs": [z, digit]}
    path = f"/v2/models/{model}-decode/infer"
    refused = keyed.post(path, json=body)
    assert refused.status_code == 401
    assert "needs an API key" in refused.json()["error"]
    assert keyed.post(path, json=body, headers=bearer(USER_KEY)).status_code == 200


def test_probes_metrics_and_the_page_stay_open(keyed: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/v2/health/ready", "/", "/openapi.json"):
        assert keyed.get(path).status_code == 200, path
    assert keyed.get("/static/app.js").status_code == 200
    # A wrong key on an open route changes nothing: it is answered as without one.
    assert keyed.get("/healthz", headers=bearer("wrong-key-0123456789")).status_code == 200


def test_admin_routes_need_the_admin_role(keyed: TestClient) -> None:
    forbidden = keyed.post("/bench/floor", headers=bearer(USER_KEY))
    assert forbidden.status_code == 403
    assert "needs an admin key" in forbidden.json()["detail"]
    assert keyed.post("/bench/floor", headers=bearer(ADMIN_KEY)).status_code == 200


def test_metrics_count_by_key_id_and_never_show_a_key(keyed: TestClient) -> None:
    before = metric(keyed, "vae_key_requests_total", {"key": "alice"})
    refused = metric(keyed, "vae_requests_rejected_total", {"reason": "unauthorized"})
    keyed.post("/sample", headers=bearer(USER_KEY))
    keyed.post("/sample", headers=bearer("wrong-key-0123456789"))
    assert metric(keyed, "vae_key_requests_total", {"key": "alice"}) == before + 1
    assert metric(keyed, "vae_requests_rejected_total", {"reason": "unauthorized"}) == refused + 1
    text = metrics_text(keyed)
    assert USER_KEY not in text and ADMIN_KEY not in text


def test_operations_can_be_closed(trained_checkpoint: Path) -> None:
    for client in serve(
        checkpoints=str(trained_checkpoint), device="cpu", api_keys=KEYS, auth_operations=True
    ):
        assert client.get("/metrics").status_code == 401
        assert client.get("/readyz").status_code == 401
        assert client.get("/metrics", headers=bearer(USER_KEY)).status_code == 200
        assert client.get("/").status_code == 200  # the page still loads, then asks for a key


def test_a_key_past_its_rate_gets_429_with_retry_after(trained_checkpoint: Path) -> None:
    for client in serve(
        checkpoints=str(trained_checkpoint),
        device="cpu",
        api_keys=KEYS,
        rate_limit_per_s=0.5,
        rate_limit_burst=2,
    ):
        statuses = [client.get("/models", headers=bearer(USER_KEY)).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        limited = client.get("/models", headers=bearer(USER_KEY))
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["retry-after"]) <= 2
        assert (
            "alice" in limited.json()["detail"]
            and "VAE_RATE_LIMIT_PER_S" in limited.json()["detail"]
        )
        # Another key has its own bucket.
        assert client.get("/models", headers=bearer(ADMIN_KEY)).status_code == 200
        assert metric(client, "vae_requests_rejected_total", {"reason": "rate_limited"}) == 2


def test_a_keys_file_made_by_the_cli_holds_digests_only(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    made = subprocess.run(
        [sys.executable, "-m", "app.http.api_keys", "ci-bot"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = dict(line.split(": ", 1) for line in made.stdout.splitlines())
    key, entry = lines["key"], lines["keys-file line"]
    assert len(key) >= 32 and key not in entry
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# made by python -m app.http.api_keys\n\n{entry}\n")
    for client in serve(checkpoints=str(trained_checkpoint), device="cpu", api_keys_file=keys_file):
        upload = files(png_of(torch.zeros(1, 28, 28)))
        assert client.post("/anomaly-score", files=upload).status_code == 401
        scored = client.post("/anomaly-score", files=upload, headers={**bearer(key), **JSON_ACCEPT})
        assert scored.status_code == 200
        assert metric(client, "vae_key_requests_total", {"key": "ci-bot"}) == 1


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"api_keys": "alice:user:short"}, "shorter than 16 characters"),
        ({"api_keys": f"alice:owner:{USER_KEY}"}, "role 'owner' is not one of user, admin"),
        ({"api_keys": f"al ice:user:{USER_KEY}"}, "key id 'al ice' must be"),
        ({"api_keys": "alice"}, "is not ID:ROLE:KEY"),
        ({"api_keys": f"{KEYS},alice:user:{ADMIN_KEY}x"}, "'alice' is configured twice"),
        ({"rate_limit_per_s": 5}, "none is set"),
        ({"auth_operations": True}, "none is set"),
    ],
)
def test_unusable_key_settings_fail_at_startup(
    trained_checkpoint: Path, settings: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(checkpoints=str(trained_checkpoint), **settings)


def test_unusable_keys_files_fail_at_startup(trained_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot be read"):
        Settings(checkpoints=str(trained_checkpoint), api_keys_file=tmp_path / "absent")
    plain = tmp_path / "plain"
    plain.write_text(f"alice user {USER_KEY}\n")  # a key where its digest belongs
    with pytest.raises(ValidationError, match="line 1 is not `ID ROLE sha256:HEX`"):
        Settings(checkpoints=str(trained_checkpoint), api_keys_file=plain)


@pytest.mark.slow
def test_the_readme_tritonclient_example_with_a_key_works_as_printed(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    """The Python block of the README's API keys section, run against a real `python -m app`
    with keys set, prints what the README says it prints."""
    text = (REPO / "README.md").read_text()
    start = text.index("### Operations: ")
    section = text[start : text.index("\n## ", start)]
    (example,) = re.findall(r"```python\n(.*?)```", section, re.S)
    (printed, *_) = re.findall(r"```text\n(.*?)```", section[section.index(example) :], re.S)
    default = shutil.copytree(trained_checkpoint, tmp_path / "default")
    server = start_app(
        tmp_path / "server.log",
        "--checkpoints", str(default), "--device", "cpu",
        ready_within_s=120, settings={"api_keys": KEYS},
    )  # fmt: skip
    try:
        script = tmp_path / "example.py"
        script.write_text(example.replace("localhost:8000", f"127.0.0.1:{server.port}"))
        result = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "KEY": USER_KEY},
        )
    finally:
        stop_app(server)
    assert result.returncode == 0, result.stderr

    # The version is the checkpoint's weights digest: the README shows an example one.
    def digestless(text: str) -> str:
        return re.sub(r"'[0-9a-f]{12}'", "'v'", text)

    assert digestless(result.stdout) == digestless(printed)


def test_the_readme_ray_serve_snippet_fits_the_serve_config() -> None:
    """The README's Serve config fragment for keys sits where deploy/ray/serve.yaml keeps the
    replicas' settings, and names a setting the app has."""
    text = (REPO / "README.md").read_text()
    start = text.index("### Operations: ")
    (snippet,) = re.findall(r"```yaml\n(.*?)```", text[start : text.index("\n## ", start)], re.S)
    (application,) = yaml.safe_load(snippet)["applications"]
    shipped = yaml.safe_load((REPO / "deploy/ray/serve.yaml").read_text())["applications"]
    assert application["name"] in {app["name"] for app in shipped}
    (variables,) = [app["runtime_env"]["env_vars"] for app in shipped if app["name"] == "vae"]
    assert "VAE_CHECKPOINTS" in variables  # the same place the shipped settings live
    for name in application["runtime_env"]["env_vars"]:
        assert name.startswith("VAE_")
        assert name.removeprefix("VAE_").lower() in Settings.model_fields
