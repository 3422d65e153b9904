"""Tests for training/run.py: real training on mnist-5k, the final checkpoint, exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from resume_testing import Interrupt, InterruptAfter, assert_same_tensors

from models import VAE, load_checkpoint
from training.checkpoints import STATE_FILE
from training.config import ConfigError, TrainConfig
from training.data import load_dataset, to_float
from training.evaluate import ANOMALY_TARGETS, anomaly_scores
from training.ood_sets import ood_sets
from training.run import check_output, train

# The tiny model's held-out AUROCs (measured: far min 1.000, near mean 0.907), with a margin.
FAR_FLOOR = 0.98
NEAR_MEAN_FLOOR = 0.85


@pytest.mark.slow
def test_training_beats_the_untrained_model_by_far(trained_checkpoint: Path) -> None:
    trained = load_checkpoint(trained_checkpoint)
    torch.manual_seed(0)
    untrained = VAE(trained.model.config).eval()
    test = load_dataset("mnist-5k").test
    x = to_float(test.images)
    generator = torch.Generator().manual_seed(0)
    untrained_elbo = float(untrained.elbo(x, test.labels, generator=generator).mean())
    trained_elbo = trained.metadata["metrics"]["elbo"]
    assert trained_elbo > untrained_elbo + 100, (trained_elbo, untrained_elbo)
    assert trained.metadata["metrics"]["digit_accuracy"] > 0.8


@pytest.mark.slow
def test_final_checkpoint_holds_metrics_calibration_and_files(trained_checkpoint: Path) -> None:
    metadata = json.loads((trained_checkpoint / "config.json").read_text())
    training = metadata["training"]
    assert training["preset"] == "tiny"
    assert training["epochs_run"] == training["config"]["epochs"] == 12
    assert training["train_seconds"] > 0 and training["device"] == "cpu"
    assert 1 <= training["best_epoch"] <= 12
    assert metadata["dataset"] == load_dataset("mnist-5k").split_info

    metrics = metadata["metrics"]
    assert metrics["num_images"] == 1000 and metrics["iwae_k"] == 10
    # IWAE is a tighter bound than the ELBO; reconstructions are close to the inputs.
    assert metrics["elbo"] < metrics["iwae_log_likelihood"] < 0
    assert metrics["iwae_nll"] == -metrics["iwae_log_likelihood"]
    assert metrics["marginal_iwae_nll"] == -metrics["marginal_iwae_log_likelihood"]
    assert 0 < metrics["reconstruction_mse"] < 0.05
    assert len(metrics["per_class_accuracy"]) == 10

    anomaly = metadata["anomaly"]
    assert anomaly["score_kind"] == "typicality-mahalanobis"
    assert anomaly["statistics"] == [
        "log_squared_error",
        "log_local_error",
        "reconstruction_ink",
    ]
    assert anomaly["statistics"] == metadata["model"]["anomaly_statistics"]
    # The held-out sets are scored with the calibrated threshold, one row per set.
    held_out = anomaly["held_out"]
    assert held_out["part"] == "test" and len(held_out["sets"]) == 12
    assert all(0.5 < row["auroc"] <= 1.0 for row in held_out["sets"].values())
    assert held_out["summary"]["normal_flagged"] == anomaly["test_fpr"]

    # The fits after training: the prior's card and file, a crisper decoder temperature.
    assert metadata["prior"]["kind"] == "gaussian-mixture"
    assert (trained_checkpoint / "prior.safetensors").is_file()
    assert 0.2 <= metadata["model"]["decoder_temperature"] < 1.0
    assert (
        metadata["prior"]["decoder_temperature"]["value"]
        == (metadata["model"]["decoder_temperature"])
    )
    assert set(training["evaluation_seconds"]) >= {
        "fitting the decoder temperature and the latent prior",
        "scoring the held-out anomaly sets",
    }
    assert (anomaly["reference"], anomaly["calibration"]) == ("train split", "validation split")
    assert anomaly["fpr"] == 0.01 and anomaly["validation_size"] == 400
    quantiles = anomaly["quantiles"]
    assert len(quantiles) == 101 and quantiles == sorted(quantiles)
    assert quantiles[98] <= anomaly["threshold"] <= quantiles[100]
    assert anomaly["test_fpr"] < 0.05

    report = json.loads((trained_checkpoint / "metrics.json").read_text())
    assert report["metrics"] == metrics and report["anomaly"] == anomaly
    assert [entry["epoch"] for entry in report["history"]] == list(range(1, 13))
    with Image.open(trained_checkpoint / "samples.png") as grid:
        assert grid.size == (302, 302)  # 10 x 10 digits of 28 pixels with 2-pixel gaps

    state = trained_checkpoint / "train_state"
    assert (state / "last" / STATE_FILE).is_file()
    assert (state / "best" / "model.safetensors").is_file()
    # The anomaly reference is part of the weights the service loads.
    assert bool(load_checkpoint(trained_checkpoint).model.anomaly_fitted)


@pytest.mark.slow
def test_the_held_out_auroc_table_is_each_sets_ranking_against_the_test_digits(
    trained_checkpoint: Path,
) -> None:
    """Each row of the README's table, recomputed here: the score of every image of the test
    part's set and of the 1,000 test digits, the AUROC as the share of (anomaly, digit) pairs
    ranked the right way round (ties half), the share flagged at the threshold; and the
    summary and its verdicts from the rows."""
    checkpoint = load_checkpoint(trained_checkpoint)
    anomaly = checkpoint.metadata["anomaly"]
    held_out, threshold = anomaly["held_out"], anomaly["threshold"]
    test = load_dataset("mnist-5k").test
    normal = anomaly_scores(checkpoint.model, test.images)
    sets = {s.name: s for s in ood_sets(test.images, test.labels, "test")}
    assert list(held_out["sets"]) == list(sets)
    for name, row in held_out["sets"].items():
        scores = anomaly_scores(checkpoint.model, sets[name].images)
        above = (scores[:, None] > normal[None, :]).double().mean()
        ties = (scores[:, None] == normal[None, :]).double().mean()
        assert row["auroc"] == pytest.approx(float(above + 0.5 * ties), abs=1e-9), name
        assert row["flagged"] == pytest.approx(float((scores > threshold).double().mean()))
        assert row["kind"] == sets[name].kind and row["images"] == 500
    near = [row["auroc"] for row in held_out["sets"].values() if row["kind"] == "near"]
    far = [row["auroc"] for row in held_out["sets"].values() if row["kind"] == "far"]
    summary, met = held_out["summary"], held_out["met"]
    assert summary["near_auroc_min"] == min(near) and summary["far_auroc_min"] == min(far)
    assert summary["near_auroc_mean"] == pytest.approx(sum(near) / len(near))
    assert met["near_auroc_min"] == (min(near) >= ANOMALY_TARGETS["near_auroc_min"])
    assert met["near_auroc_mean"] == (sum(near) / len(near) >= ANOMALY_TARGETS["near_auroc_mean"])
    # Even the 12-epoch tiny model ranks the far sets and most near ones well above chance.
    assert min(far) >= FAR_FLOOR and sum(near) / len(near) >= NEAR_MEAN_FLOOR


@pytest.mark.slow
def test_unconditional_checkpoint_has_no_digit_metrics(
    trained_unconditional_checkpoint: Path,
) -> None:
    metadata = json.loads((trained_unconditional_checkpoint / "config.json").read_text())
    assert metadata["model"]["num_classes"] is None
    assert "digit_accuracy" not in metadata["metrics"]
    assert "marginal_elbo" not in metadata["metrics"]
    assert metadata["metrics"]["elbo"] > -160
    assert metadata["anomaly"]["test_fpr"] < 0.05
    assert (trained_unconditional_checkpoint / "samples.png").is_file()


def small_run(out: Path, **changes: object) -> TrainConfig:
    return TrainConfig.from_preset(
        "tiny", epochs=3, iwae_k=1, out=str(out), progress=False, **changes
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "uninterrupted"
    return train(small_run(out)).checkpoint


@pytest.mark.slow
def test_resume_after_an_interruption_gives_the_same_weights(
    uninterrupted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        train(small_run(out), callbacks=[InterruptAfter(2)])
    assert not (out / "config.json").exists()  # no final checkpoint from a broken run
    state = torch.load(out / "train_state" / "last" / STATE_FILE, weights_only=True)
    assert state["epoch"] == 2

    resumed = train(small_run(out, resume=True))

    for folder in ("train_state/last", "train_state/best", "."):
        expected = load_checkpoint(uninterrupted / folder).model.state_dict()
        found = load_checkpoint(resumed.checkpoint / folder).model.state_dict()
        assert_same_tensors(expected, found, folder)
    expected_metadata = json.loads((uninterrupted / "config.json").read_text())
    assert resumed.metrics == expected_metadata["metrics"]
    assert resumed.epochs_run == 3


@pytest.mark.slow
def test_resume_with_another_model_names_the_difference(uninterrupted: Path) -> None:
    with pytest.raises(ConfigError, match="latent_dim 8 -> 4") as caught:
        train(small_run(uninterrupted, resume=True, latent_dim=4))
    assert "another --out" in str(caught.value)


def test_resume_without_a_previous_run_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(small_run(tmp_path / "fresh", resume=True))
    assert not (tmp_path / "fresh").exists()


def test_output_under_a_file_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file"):
        train(small_run(blocker / "run"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_new_nested_output_folder_is_accepted_without_creating_it(tmp_path: Path) -> None:
    check_output(tmp_path / "a" / "b" / "c")
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_with_other_files_is_refused_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"not part of a checkpoint \(notes.txt\)"):
        train(small_run(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_tensorboard_logs_inside_out_must_live_under_train_state(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train_state/tb"):
        check_output(tmp_path / "run", tensorboard=str(tmp_path / "run" / "tb"))
    check_output(tmp_path / "run", tensorboard=str(tmp_path / "run" / "train_state" / "tb"))
    check_output(tmp_path / "run", tensorboard=str(tmp_path / "tb"))


@pytest.mark.slow
def test_resume_finishes_a_final_save_that_was_killed_midway(
    uninterrupted: Path, tmp_path: Path
) -> None:
    # The final save killed after moving the folder aside and before moving the new one in
    # (models.checkpoint): no <out>, the new checkpoint with train_state/ in .<out>.new.
    out = tmp_path / "killed"
    shutil.copytree(uninterrupted, tmp_path / ".killed.new")
    (tmp_path / ".killed.old").mkdir()
    resumed = train(small_run(out, resume=True))
    assert resumed.checkpoint == out and resumed.epochs_run == 3
    expected = load_checkpoint(uninterrupted).model.state_dict()
    assert_same_tensors(expected, load_checkpoint(out).model.state_dict(), "final")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed"]
