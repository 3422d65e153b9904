"""Checkpoints: exact round trip, atomic writes, and one clear error per kind of damage."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
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


# ---- the swap of a re-saved checkpoint: a failure or a kill at any step loses nothing ----

# The steps of re-saving a checkpoint that has a train_state/ (models.checkpoint._rename and
# _remove_tree calls): staging -> .ckpt.new, train_state/ into it, ckpt -> .ckpt.old,
# .ckpt.new -> ckpt, .ckpt.old -> a staging folder, that folder deleted.
SWAP_STEPS = 6
REPO = Path(__file__).resolve().parents[2]


def save_run(target: Path, run: int) -> VAE:
    """A model with weights of its own (seeded by `run`) saved to target, marked `run`."""
    torch.manual_seed(run)
    vae = VAE(CONFIG)
    vae.save_pretrained(target, {"run": run}, extra_files={"metrics.json": b'{"run": %d}' % run})
    return vae


def with_train_state(target: Path) -> None:
    """A train_state/ like the trainer's: resume bytes and a nested checkpoint."""
    (target / "train_state").mkdir()
    (target / "train_state" / "state.pt").write_bytes(b"resume")
    save_run(target / "train_state" / "last", 7)


def assert_complete_run(target: Path, run: int) -> None:
    """target is run `run`'s checkpoint, whole (weights verified against config.json), with
    the train_state/ of the checkpoint it replaced, and nothing of the swap left beside it."""
    loaded = load_checkpoint(target)
    assert loaded.path == target
    assert loaded.metadata["run"] == run
    torch.manual_seed(run)
    for (name, want), (_, got) in zip(
        VAE(CONFIG).state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert torch.equal(want, got), name
    assert json.loads((target / "metrics.json").read_text()) == {"run": run}
    assert (target / "train_state" / "state.pt").read_bytes() == b"resume"
    assert load_checkpoint(target / "train_state" / "last").metadata["run"] == 7
    # A save killed before its first rename leaves its staging folder: the next save deletes it.
    leftovers = [p.name for p in target.parent.iterdir() if p.name != "ckpt"]
    assert all(name.startswith(".ckpt.staging-") for name in leftovers), leftovers


class Steps:
    """Counts the swap's steps and makes chosen ones fail, as a full disk or a lost mount."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, failing: set[int] = frozenset()) -> None:
        import models.checkpoint as checkpoint

        self.count = 0
        self.failing = failing
        rename, remove_tree = checkpoint._rename, checkpoint._remove_tree

        def step(action: object) -> object:
            def run(*args: Path) -> None:
                self.count += 1
                if self.count in self.failing:
                    raise OSError(28, f"step {self.count} failed")
                action(*args)  # type: ignore[operator]

            return run

        monkeypatch.setattr(checkpoint, "_rename", step(rename))
        monkeypatch.setattr(checkpoint, "_remove_tree", step(remove_tree))


def test_a_resave_takes_the_steps_the_fault_tests_cover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ckpt"
    save_run(target, 1)
    with_train_state(target)
    steps = Steps(monkeypatch)
    save_run(target, 2)
    assert steps.count == SWAP_STEPS
    assert_complete_run(target, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("step", range(1, SWAP_STEPS + 1))
def test_a_failing_step_keeps_the_old_checkpoint_with_its_train_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: int
) -> None:
    target = tmp_path / "ckpt"
    save_run(target, 1)
    with_train_state(target)
    steps = Steps(monkeypatch, failing={step})
    if step <= 4:  # the new checkpoint is not in place yet: the save fails, the old one stays
        with pytest.raises(OSError, match=f"step {step} failed"):
            save_run(target, 2)
        assert_complete_run(target, 1)
    else:  # only deleting the old one failed: the save stands
        save_run(target, 2)
        assert_complete_run(target, 2)
    steps.failing = set()
    save_run(target, 3)
    assert_complete_run(target, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("failing", [{2, 3}, {3, 4}, {4, 5}])
def test_a_failing_undo_leaves_a_swap_that_the_next_load_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: set[int]
) -> None:
    # A step fails, then so does the first step of putting things back (the disk is gone):
    # what is left on disk is finished by the next load, which finds the new checkpoint whole.
    target = tmp_path / "ckpt"
    save_run(target, 1)
    with_train_state(target)
    steps = Steps(monkeypatch, failing=failing)
    with pytest.raises(OSError, match=f"step {min(failing)} failed"):
        save_run(target, 2)
    assert (tmp_path / ".ckpt.new").is_dir()
    steps.failing = set()
    assert_complete_run(target, 2)


KILL_DURING_SAVE = """
import os, signal, sys
from pathlib import Path
import torch
import models.checkpoint as checkpoint
from models import VAE, VAEConfig

target, kill_before = Path(sys.argv[1]), int(sys.argv[2])
steps = 0

def killed_before(action):
    def run(*args):
        global steps
        steps += 1
        if steps == kill_before:
            os.kill(os.getpid(), signal.SIGKILL)
        action(*args)
    return run

checkpoint._rename = killed_before(checkpoint._rename)
checkpoint._remove_tree = killed_before(checkpoint._remove_tree)
torch.manual_seed(2)
VAE(VAEConfig(**{config})).save_pretrained(
    target, {{"run": 2}}, extra_files={{"metrics.json": b'{{"run": 2}}'}}
)
"""


@pytest.mark.slow
@pytest.mark.parametrize("step", range(1, SWAP_STEPS + 2))
def test_a_save_killed_at_any_step_loads_as_the_old_or_the_new_checkpoint(
    tmp_path: Path, step: int
) -> None:
    # A real process (a pod evicted during its final save) killed by SIGKILL just before each
    # step of the swap, or (the last case) not at all; then the next load, here.
    target = tmp_path / "ckpt"
    save_run(target, 1)
    with_train_state(target)
    config = {**CONFIG.to_dict(), "hidden_dims": list(CONFIG.hidden_dims)}
    process = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE.format(config=config), str(target), str(step)],
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    killed = step <= SWAP_STEPS
    assert process.returncode == (-signal.SIGKILL if killed else 0), process.stderr.decode()
    # Before its first rename the new checkpoint is only a staging folder: the old one stands.
    # From the first rename on, a complete new one exists, and the load finishes the swap.
    assert_complete_run(target, 1 if step == 1 else 2)
    save_run(target, 3)
    assert_complete_run(target, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_an_unwritable_folder_reads_the_checkpoint_an_interrupted_save_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Killed after moving the old checkpoint aside (step 3), on a volume the reader may not
    # write (a read-only mount): the reader loads the complete new folder where it lies.
    target = tmp_path / "ckpt"
    save_run(target, 1)
    save_run(tmp_path / "incoming", 2)
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old")
    (tmp_path / "incoming").rename(tmp_path / ".ckpt.new")
    import models.checkpoint as checkpoint

    def read_only(source: Path, destination: Path) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(checkpoint, "_rename", read_only)
    loaded = load_checkpoint(target)
    assert loaded.metadata["run"] == 2
    assert loaded.path == tmp_path / ".ckpt.new"


def test_a_residual_decoder_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(hidden_dims=(8, 16), latent_dim=4, decoder_blocks=1)).eval()
    vae.save_pretrained(tmp_path / "ckpt")
    loaded = VAE.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.decoder_blocks == 1
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    digits = torch.tensor([1, 4, 7])
    assert torch.equal(vae.decode(z, digits), loaded.decode(z, digits))
