"""Checkpoints: exact round trip, atomic writes, and one clear error per kind of damage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models import VAE, CheckpointError, VAEConfig, load_checkpoint
from models.checkpoint import CONFIG_NAME, WEIGHTS_NAME

CONFIG = VAEConfig(architecture="conv", hidden_dims=(8, 16), latent_dim=4, num_classes=10)


@pytest.fixture
def model() -> VAE:
    torch.manual_seed(0)
    vae = VAE(CONFIG)
    vae.fit_anomaly_reference(torch.rand(30, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    return vae.eval()


def test_round_trip_is_exact(model: VAE, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "ckpt", {"metrics": {"test_elbo": -100.0}})
    loaded = VAE.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    assert torch.equal(model.anomaly_score(x).score, loaded.anomaly_score(x).score)


def test_config_json_describes_the_checkpoint(model: VAE, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "ckpt", {"metrics": {"test_elbo": -100.0}})
    meta = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert meta["model"]["latent_dim"] == 4
    assert meta["metrics"] == {"test_elbo": -100.0}
    assert len(meta["weights_sha256"]) == 64
    assert "torch" in meta["versions"] and meta["created_at"]
    assert load_checkpoint(tmp_path / "ckpt").metadata == meta


def test_weights_file_is_safetensors_not_pickle(model: VAE, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "ckpt")
    header_size = int.from_bytes((tmp_path / "ckpt" / WEIGHTS_NAME).read_bytes()[:8], "little")
    header = json.loads((tmp_path / "ckpt" / WEIGHTS_NAME).read_bytes()[8 : 8 + header_size])
    assert "encoder.head.weight" in header


def test_resaving_replaces_the_folder_and_keeps_train_state(model: VAE, tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    model.save_pretrained(target, extra_files={"old.txt": b"old"})
    (target / "train_state").mkdir()
    (target / "train_state" / "state.pt").write_bytes(b"resume")
    model.save_pretrained(target, extra_files={"metrics.json": b"{}"})
    assert sorted(p.name for p in target.iterdir()) == sorted(
        [CONFIG_NAME, WEIGHTS_NAME, "metrics.json", "train_state"]
    )
    assert (target / "train_state" / "state.pt").read_bytes() == b"resume"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folders left behind


def test_a_crash_mid_write_leaves_the_old_checkpoint(
    model: VAE, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ckpt"
    model.save_pretrained(target, {"metrics": {"run": 1}})
    import models.checkpoint as checkpoint

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target, {"metrics": {"run": 2}})
    assert load_checkpoint(target).metadata["metrics"] == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_corrupt_weights_raise_a_clear_error(model: VAE, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*sha256"):
        load_checkpoint(tmp_path / "ckpt")


def test_unreadable_safetensors_without_a_hash_raises_a_clear_error(
    model: VAE, tmp_path: Path
) -> None:
    model.save_pretrained(tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / CONFIG_NAME
    meta = json.loads(config_path.read_text())
    del meta["weights_sha256"]
    config_path.write_text(json.dumps(meta))
    (tmp_path / "ckpt" / WEIGHTS_NAME).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        load_checkpoint(tmp_path / "ckpt")


def test_config_with_wrong_latent_dim_raises_a_clear_error(model: VAE, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / CONFIG_NAME
    meta = json.loads(config_path.read_text())
    meta["model"]["latent_dim"] = 7
    config_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"weights do not match .*config\.json.*expects"):
        load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.unlink(), "config.json: missing"),
        (lambda p: p.write_text("{not json"), "not valid JSON"),
        (lambda p: p.write_text("[]"), "no 'model' section"),
        (lambda p: p.write_text('{"model": {"architecture": "rnn"}}'), "invalid model config"),
    ],
)
def test_bad_config_json_raises_a_clear_error(
    model: VAE, tmp_path: Path, damage: object, message: str
) -> None:
    model.save_pretrained(tmp_path / "ckpt")
    damage(tmp_path / "ckpt" / CONFIG_NAME)  # type: ignore[operator]
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "ckpt")


def test_missing_weights_raise_a_clear_error(model: VAE, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_checkpoint(tmp_path / "ckpt")


def test_unwritable_destination_raises_a_clear_error(model: VAE, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        model.save_pretrained(blocker / "ckpt")


def test_checkpoint_is_readable_by_other_users(model: VAE, tmp_path: Path) -> None:
    import os
    import stat

    umask = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "ckpt")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert stat.S_IMODE((tmp_path / "ckpt" / name).stat().st_mode) == 0o644
