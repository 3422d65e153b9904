"""Tests for app.settings: environment parsing, validation messages, checkpoint discovery."""

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from app.settings import Settings, SettingsError, usable_cores


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep VAE_* variables from the developer's shell out of every test."""
    for name in list(os.environ):
        if name.startswith("VAE_"):
            monkeypatch.delenv(name)


def make_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_defaults() -> None:
    settings = Settings()
    assert settings.checkpoints == "checkpoints/default"
    assert settings.device == "auto"
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.max_samples == 256
    assert settings.max_upload_bytes == 10 * 1024 * 1024
    assert settings.max_json_bytes == 4 * 1024 * 1024
    assert settings.max_image_pixels == 4096 * 4096
    assert settings.max_files == 64
    assert settings.max_batch_images == 64
    assert settings.max_batch_wait_ms == 0.0
    assert settings.max_queue_images == 4096
    assert settings.request_timeout_s == 30.0
    assert settings.workers is None
    assert settings.worker_count == usable_cores()
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))
    assert settings.torch_threads is None
    assert settings.log_level == "info"
    assert settings.enable_test_hooks is False


def test_workers_default_to_the_usable_cores() -> None:
    assert Settings().worker_count == usable_cores()
    assert Settings(workers="auto").workers is None
    assert Settings(workers=3).worker_count == 3


def test_environment_variables_are_read_with_the_vae_prefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    environment = {
        "VAE_CHECKPOINTS": "a,b",
        "VAE_DEVICE": "CUDA:1",
        "VAE_HOST": "0.0.0.0",
        "VAE_PORT": "9000",
        "VAE_MAX_SAMPLES": "4096",
        "VAE_MAX_UPLOAD_BYTES": "1024",
        "VAE_MAX_IMAGE_PIXELS": "784",
        "VAE_MAX_FILES": "3",
        "VAE_MAX_BATCH_IMAGES": "32",
        "VAE_MAX_BATCH_WAIT_MS": "1.5",
        "VAE_MAX_QUEUE_IMAGES": "5000",
        "VAE_REQUEST_TIMEOUT_S": "2.5",
        "VAE_WORKERS": "2",
        "VAE_TORCH_THREADS": "4",
        "VAE_LOG_LEVEL": "DEBUG",
        "VAE_ENABLE_TEST_HOOKS": "true",
        "VAE_SOMETHING_ELSE": "ignored",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.checkpoints == "a,b"
    assert settings.device == "cuda:1"
    assert settings.host == "0.0.0.0"
    assert settings.port == 9000
    assert settings.max_samples == 4096
    assert settings.max_upload_bytes == 1024
    assert settings.max_image_pixels == 784
    assert settings.max_files == 3
    assert settings.max_batch_images == 32
    assert settings.max_batch_wait_ms == 1.5
    assert settings.max_queue_images == 5000
    assert settings.request_timeout_s == 2.5
    assert settings.workers == 2
    assert settings.torch_threads == 4
    assert settings.log_level == "debug"
    assert settings.enable_test_hooks is True


def test_constructor_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAE_PORT", "9000")
    assert Settings(port=9001).port == 9001


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", " CPU "])
def test_valid_devices(device: str) -> None:
    assert Settings(device=device).device == device.strip().lower()


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "cuda:-1", "mps", "", "cpu:0"])
def test_bad_device_lists_the_valid_values(device: str) -> None:
    with pytest.raises(ValidationError, match=r"auto, cpu, cuda, cuda:N"):
        Settings(device=device)


def test_bad_device_from_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VAE_DEVICE", "tpu")
    with pytest.raises(ValidationError, match="VAE_DEVICE='tpu'"):
        Settings()


def test_bad_log_level_lists_the_valid_values() -> None:
    with pytest.raises(ValidationError, match="critical, error, warning, info, debug, trace"):
        Settings(log_level="verbose")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("port", 0, "greater than or equal to 1"),
        ("port", 65536, "less than or equal to 65535"),
        ("max_samples", 0, "greater than or equal to 1"),
        ("max_samples", 4097, "less than or equal to 4096"),
        ("max_upload_bytes", -1, "greater than 0"),
        ("max_image_pixels", 0, "greater than 0"),
        ("max_files", -5, "greater than 0"),
        ("max_batch_images", 0, "greater than 0"),
        ("max_batch_wait_ms", -0.5, "greater than or equal to 0"),
        ("max_batch_wait_ms", 1000.5, "less than or equal to 1000"),
        ("max_queue_images", 0, "greater than 0"),
        ("request_timeout_s", 0, "greater than 0"),
        ("workers", 0, "greater than 0"),
        ("torch_threads", 0, "greater than 0"),
        ("grpc_port", 0, "greater than or equal to 1"),
    ],
)
def test_out_of_range_values_fail_naming_the_field(field: str, value: float, message: str) -> None:
    overrides: dict[str, Any] = {field: value}
    with pytest.raises(ValidationError, match=message) as caught:
        Settings(**overrides)
    assert caught.value.errors()[0]["loc"] == (field,)


def test_out_of_range_environment_value_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAE_MAX_FILES", "-1")
    with pytest.raises(ValidationError, match="max_files"):
        Settings()


def test_non_numeric_environment_value_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAE_PORT", "eighty")
    with pytest.raises(ValidationError, match="port"):
        Settings()


def test_grpc_is_off_by_default_and_needs_a_port_of_its_own() -> None:
    assert Settings().grpc_port is None
    assert Settings(grpc_port=8001).grpc_port == 8001
    with pytest.raises(ValidationError, match="VAE_GRPC_PORT and VAE_PORT are both 9000"):
        Settings(port=9000, grpc_port=9000)


def test_grpc_port_without_the_grpc_extra_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "grpc" else find_spec(name, *args),
    )
    with pytest.raises(ValidationError, match=r"pip install 'vae-serve\[grpc\]'"):
        Settings(grpc_port=8001)


def test_empty_checkpoints_fail_at_construction() -> None:
    with pytest.raises(ValidationError, match="VAE_CHECKPOINTS is empty"):
        Settings(checkpoints=" , ")


def test_every_field_has_a_description() -> None:
    missing = [name for name, field in Settings.model_fields.items() if not field.description]
    assert missing == []


# --- checkpoint_dirs ---------------------------------------------------------------------


def test_a_folder_with_config_json_is_one_checkpoint(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "vae")
    make_checkpoint(checkpoint / "nested")  # not looked at: the folder itself is the checkpoint
    assert Settings(checkpoints=str(checkpoint)).checkpoint_dirs() == [checkpoint]


def test_a_folder_of_checkpoints_expands_to_its_subfolders_sorted(tmp_path: Path) -> None:
    beta = make_checkpoint(tmp_path / "beta")
    alpha = make_checkpoint(tmp_path / "alpha")
    (tmp_path / "notes").mkdir()  # no config.json: skipped
    (tmp_path / "README.md").write_text("not a folder")
    make_checkpoint(tmp_path / "notes" / "deeper")  # only immediate subfolders count
    assert Settings(checkpoints=str(tmp_path)).checkpoint_dirs() == [alpha, beta]


def test_comma_separated_folders_keep_their_order_and_drop_duplicates(tmp_path: Path) -> None:
    first = make_checkpoint(tmp_path / "z_first")
    group = tmp_path / "group"
    second = make_checkpoint(group / "a")
    third = make_checkpoint(group / "b")
    setting = f"{first}, {group} ,{second},"
    assert Settings(checkpoints=setting).checkpoint_dirs() == [first, second, third]


def test_missing_checkpoint_folder_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(SettingsError, match=f"{missing} does not exist"):
        Settings(checkpoints=str(missing)).checkpoint_dirs()


def test_a_file_is_not_a_checkpoint_folder(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "config.json"
    not_a_folder.write_text("{}")
    with pytest.raises(SettingsError, match="does not exist"):
        Settings(checkpoints=str(not_a_folder)).checkpoint_dirs()


def test_folder_without_any_checkpoint_is_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SettingsError, match=f"no checkpoint in {tmp_path}"):
        Settings(checkpoints=str(tmp_path)).checkpoint_dirs()


def test_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)


def test_queue_must_hold_the_largest_request() -> None:
    with pytest.raises(ValidationError, match="VAE_MAX_QUEUE_IMAGES=100 is below"):
        Settings(max_queue_images=100, max_samples=256)


def interrupted_save(folder: Path) -> None:
    """What a save of `folder` leaves when killed after moving the old checkpoint aside and
    before moving the new one in (models.checkpoint): .NAME.old, and .NAME.new complete with
    the train_state/ it took over; no NAME."""
    make_checkpoint(folder.with_name(f".{folder.name}.old"))
    new = make_checkpoint(folder.with_name(f".{folder.name}.new"))
    (new / "train_state").mkdir()


@pytest.mark.parametrize("named", ["the checkpoint", "its parent"])
def test_a_checkpoint_whose_save_was_killed_midway_is_found(tmp_path: Path, named: str) -> None:
    interrupted_save(tmp_path / "default")
    other = make_checkpoint(tmp_path / "other")
    if named == "the checkpoint":
        found = Settings(checkpoints=str(tmp_path / "default")).checkpoint_dirs()
        assert found == [tmp_path / "default"]
    else:  # and the swap's hidden folders are not taken for checkpoints of their own
        found = Settings(checkpoints=str(tmp_path)).checkpoint_dirs()
        assert found == [tmp_path / "default", other]
    assert (tmp_path / "default" / "train_state").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default", "other"]


def test_explicit_model_control_runs_one_worker_and_refuses_more() -> None:
    assert Settings(model_control="explicit").worker_count == 1
    assert Settings(model_control="poll", workers=2).worker_count == 2
    with pytest.raises(ValidationError, match="reaches one worker process only"):
        Settings(model_control="explicit", workers=2)
