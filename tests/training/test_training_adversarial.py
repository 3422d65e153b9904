"""Tests for training/adversarial.py and training/sample_quality.py: the adversarial step, its
resumable state, the sample-quality metrics, and short real adversarial runs on mnist-5k."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from resume_testing import Interrupt, InterruptAfter, assert_same_tensors
from safetensors.torch import load_file

from app.main import create_app
from app.settings import Settings
from models import VAE, VAEConfig, load_checkpoint
from models.adversarial import Classifier, CriticConfig, Discriminator
from training.adversarial import (
    ADVERSARY_FILE,
    AdversarialObjective,
    AdversarialSettings,
    adversarial_weight,
    adversary_bytes,
    feature_matching,
    load_adversary,
)
from training.checkpoints import SIDE_STATE_KEY, STATE_FILE, load_resume_point
from training.cli import main
from training.config import ConfigError, TrainConfig
from training.objective import VAEObjective
from training.run import RunResult, plain_baseline, train
from training.sample_quality import (
    REFERENCE_FILE,
    first_per_class,
    frechet_distance,
    per_class_accuracy,
    random_shift,
)
from training.trainer import Callback, StepOutput, Trainer

# ---- the schedule and the losses ------------------------------------------------------------


def test_adversarial_weight_is_zero_then_ramps_to_one() -> None:
    weights = [adversarial_weight(step, start_steps=3, ramp_steps=4) for step in range(9)]
    assert weights == [0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert adversarial_weight(3, start_steps=3, ramp_steps=0) == 1.0


def test_feature_matching_is_the_squared_distance_of_the_means() -> None:
    real = torch.tensor([[0.0, 2.0], [2.0, 2.0]])  # mean (1, 2)
    fake = torch.tensor([[4.0, 0.0]])  # mean (4, 0)
    assert float(feature_matching(real, fake)) == pytest.approx(9.0 + 4.0)


def tiny_vae() -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(architecture="conv", hidden_dims=(4, 8), latent_dim=2))


def tiny_objective(start_steps: int = 0, lambda_adv: float = 1.0) -> AdversarialObjective:
    config = CriticConfig(channels=(4, 8), feature_dim=8)
    return AdversarialObjective(
        VAEObjective(beta=1.0, kl_warmup_epochs=0, steps_per_epoch=1),
        Discriminator(config),
        Classifier(config),
        AdversarialSettings(
            lambda_adv=lambda_adv,
            lambda_cls=1.0,
            discriminator_lr=1e-3,
            classifier_lr=1e-3,
            start_steps=start_steps,
            ramp_steps=0,
        ),
    )


def batch(size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(size, 1, 28, 28, generator=generator), torch.arange(size) % 10


def test_a_step_trains_d_and_c_and_returns_a_loss_that_trains_only_the_vae() -> None:
    model, objective = tiny_vae(), tiny_objective()
    before = {
        name: [p.detach().clone() for p in network.parameters()]
        for name, network in (("D", objective.discriminator), ("C", objective.classifier))
    }
    output = objective(model, *batch(), step=0)

    for name, network in (("D", objective.discriminator), ("C", objective.classifier)):
        moved = [
            not torch.equal(a, b) for a, b in zip(before[name], network.parameters(), strict=True)
        ]
        assert all(moved), f"{name} did not take its optimiser step"
        network.zero_grad(set_to_none=True)
    output.loss.backward()
    for network in (objective.discriminator, objective.classifier):
        assert all(p.grad is None for p in network.parameters()), "the VAE's loss trained a critic"
    assert all(p.grad is not None for p in model.decoder.parameters())
    for name in ("recon", "kl", "d_loss", "d_real", "d_fake", "c_loss", "g_adv", "g_cls"):
        assert math.isfinite(float(output.logs[name])), name


def test_before_the_start_the_loss_is_the_negative_elbo_alone() -> None:
    model, objective = tiny_vae(), tiny_objective(start_steps=10)
    x, y = batch()
    torch.manual_seed(5)
    adversarial = objective(model, x, y, step=3)
    assert "g_adv" not in adversarial.logs and adversarial.logs["adv_weight"] == 0.0
    torch.manual_seed(5)
    plain = VAEObjective(beta=1.0, kl_warmup_epochs=0, steps_per_epoch=1)(model, x, y, 3)
    assert torch.equal(adversarial.loss, plain.loss)


def test_the_adversarial_terms_change_the_loss_once_started() -> None:
    model, weak, strong = (
        tiny_vae(),
        tiny_objective(lambda_adv=0.0),
        tiny_objective(lambda_adv=100.0),
    )
    x, y = batch()
    torch.manual_seed(5)
    without = weak(model, x, y, step=0)
    torch.manual_seed(5)
    with_terms = strong(model, x, y, step=0)
    assert float(with_terms.loss.detach()) > float(without.loss.detach())


def test_unconditional_models_are_refused() -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig(architecture="mlp", hidden_dims=(8,), latent_dim=2, num_classes=None))
    with pytest.raises(TypeError, match="conditional"):
        tiny_objective()(model, *batch(), step=0)


def test_state_and_weights_round_trip(tmp_path: Path) -> None:
    model, objective = tiny_vae(), tiny_objective()
    objective(model, *batch(), step=0)
    buffer = io.BytesIO()
    torch.save(objective.state_dict(), buffer)
    (tmp_path / ADVERSARY_FILE).write_bytes(objective.files()[ADVERSARY_FILE])

    restored = tiny_objective()
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    restored.load_files(tmp_path)
    for a, b in (
        (objective.discriminator, restored.discriminator),
        (objective.classifier, restored.classifier),
    ):
        for (name, value), other in zip(
            a.state_dict().items(), b.state_dict().values(), strict=True
        ):
            assert torch.equal(value, other), name
    saved = restored.discriminator_optimizer.state_dict()["state"]
    assert saved and torch.equal(
        saved[0]["exp_avg"], objective.discriminator_optimizer.state_dict()["state"][0]["exp_avg"]
    )


def test_a_damaged_adversary_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / ADVERSARY_FILE
    path.write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="without --resume"):
        load_adversary(path)
    config = CriticConfig(channels=(4, 8), feature_dim=8)
    path.write_bytes(adversary_bytes(Discriminator(config), Classifier(config)))
    discriminator, classifier = load_adversary(path)
    assert discriminator.config == classifier.config == config


# ---- sample quality ---------------------------------------------------------------------------


def test_frechet_distance_of_a_sample_with_itself_is_zero() -> None:
    features = torch.randn(500, 6, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_the_closed_form_for_isotropic_gaussians() -> None:
    """N(m, a^2 I) vs N(0, b^2 I) in d dims: |m|^2 + d (a - b)^2."""
    generator = torch.Generator().manual_seed(0)
    d = 4
    a = 2.0 * torch.randn(200_000, d, generator=generator) + 1.0
    b = 0.5 * torch.randn(200_000, d, generator=generator)
    expected = d * 1.0**2 + d * (2.0 - 0.5) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)


def test_per_class_accuracy_is_per_true_digit() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0, 0])
    assert per_class_accuracy(predicted, labels, 3) == [0.5, 1.0, 0.0]


def test_first_per_class_takes_the_first_rows_of_each_digit() -> None:
    labels = torch.tensor([3, 0, 3, 3, 0, 1])
    assert first_per_class(labels, 2).tolist() == [1, 4, 5, 0, 2]


def test_random_shift_moves_whole_pixels_and_keeps_them() -> None:
    x = torch.zeros(64, 1, 28, 28)
    x[:, 0, 10, 12] = 1.0
    shifted = random_shift(x, 2, torch.Generator().manual_seed(0))
    rows, cols = (shifted[:, 0] == 1.0).nonzero()[:, 1:].T
    assert shifted.sum() == 64 and set(shifted.unique().tolist()) == {0.0, 1.0}
    assert set(rows.tolist()) == set(range(8, 13)) and set(cols.tolist()) == set(range(10, 15))


# ---- settings and command line ----------------------------------------------------------------


def test_adversarial_needs_a_conditional_model() -> None:
    with pytest.raises(ConfigError, match="--adversarial needs a conditional"):
        TrainConfig.from_preset("mlp", adversarial=True)


def test_baseline_without_adversarial_is_refused() -> None:
    with pytest.raises(ConfigError, match="--baseline"):
        TrainConfig(baseline="somewhere")


def test_cvae_gan_preset_is_the_default_model_trained_adversarially() -> None:
    """Its plain twin is exactly the default preset."""
    preset, default = TrainConfig.from_preset("cvae-gan"), TrainConfig()
    assert preset.adversarial and preset.baseline is None
    assert preset.replace(adversarial=False, preset="default") == default


def test_cli_adversarial_on_an_unconditional_model_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--preset", "mlp", "--adversarial", "--out", "run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --adversarial needs a conditional VAE") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_resuming_a_plain_run_adversarially_is_refused(trained_checkpoint: Path) -> None:
    config = TrainConfig.from_preset("tiny", adversarial=True, out=str(trained_checkpoint))
    with pytest.raises(ConfigError, match="adversarial False -> True"):
        load_resume_point(trained_checkpoint, config)


# ---- real runs on mnist-5k ----------------------------------------------------------------------


class LossRecorder(Callback):
    """Every batch's loss and logs, as floats."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_batch_end(self, trainer: Trainer, output: StepOutput) -> None:
        logs = {name: float(value) for name, value in output.logs.items()}
        self.steps.append({"loss": float(output.loss.detach()), **logs})


def short_run(out: Path, **changes: object) -> TrainConfig:
    """Two epochs of the tiny model in batches of 128 (29 steps each); the adversarial terms
    start half-way through the first."""
    settings: dict[str, object] = {
        "adversarial": True,
        "epochs": 2,
        "batch_size": 128,
        "adversarial_start_epochs": 0.5,
        "adversarial_ramp_epochs": 0.5,
        "iwae_k": 1,
        "quality_samples_per_class": 20,
        "out": str(out),
        "progress": False,
    }
    return TrainConfig.from_preset("tiny", **{**settings, **changes})


@pytest.fixture(scope="module")
def adversarial_run(
    tmp_path_factory: pytest.TempPathFactory, trained_checkpoint: Path
) -> tuple[RunResult, LossRecorder]:
    """A short adversarial run compared with the session's tiny plain checkpoint (~10 s)."""
    out = tmp_path_factory.mktemp("adversarial") / "run"
    recorder = LossRecorder()
    result = train(short_run(out, baseline=str(trained_checkpoint)), callbacks=[recorder])
    return result, recorder


@pytest.mark.slow
def test_a_short_run_reports_sample_quality_of_both_models(
    adversarial_run: tuple[RunResult, LossRecorder], trained_checkpoint: Path
) -> None:
    result, _ = adversarial_run
    metadata = json.loads((result.checkpoint / "config.json").read_text())
    quality = metadata["metrics"]["adversarial_comparison"]
    assert (
        json.loads((result.checkpoint / "metrics.json").read_text())["metrics"]
        == (metadata["metrics"])
    )
    assert quality["baseline"] == str(trained_checkpoint)
    assert (quality["samples_per_class"], quality["temperature"]) == (20, 1.0)
    assert 0.8 < quality["reference_classifier"]["test_accuracy"] <= 1.0
    for model in ("adversarial", "plain"):
        for judge in ("reference_classifier", "adversary_classifier"):
            numbers = quality[model][judge]
            assert len(numbers["per_class_accuracy"]) == 10
            assert numbers["accuracy"] == pytest.approx(sum(numbers["per_class_accuracy"]) / 10)
            assert 0.0 <= numbers["frechet_distance"] < math.inf
    # The plain tiny VAE's samples are digits: the reference classifier mostly names them.
    assert quality["plain"]["reference_classifier"]["accuracy"] > 0.6
    # The verdicts follow from the numbers above them: higher accuracy, lower distance.
    ours, theirs = (quality[m]["reference_classifier"] for m in ("adversarial", "plain"))
    assert quality["adversarial_beats_plain"] == {
        "accuracy": ours["accuracy"] > theirs["accuracy"],
        "frechet_distance": ours["frechet_distance"] < theirs["frechet_distance"],
    }
    assert metadata["training"]["evaluated_epoch"] == 2
    assert (result.checkpoint / "train_state" / REFERENCE_FILE).is_file()


@pytest.mark.slow
def test_losses_stay_finite_and_the_adversarial_terms_switch_on(
    adversarial_run: tuple[RunResult, LossRecorder],
) -> None:
    _, recorder = adversarial_run
    steps = recorder.steps
    assert len(steps) == 2 * 29  # 3600 digits in batches of 128, two epochs
    for step in steps:
        assert all(math.isfinite(value) for value in step.values()), step
    weights = [step["adv_weight"] for step in steps]
    assert weights[0] == 0.0 and weights[-1] == 1.0 and weights == sorted(weights)
    assert sum("g_adv" in step for step in steps) > len(steps) // 2


@pytest.mark.slow
def test_the_checkpoint_holds_only_the_vae_and_train_state_holds_d_and_c(
    adversarial_run: tuple[RunResult, LossRecorder],
) -> None:
    result, _ = adversarial_run
    checkpoint = load_checkpoint(result.checkpoint)
    weights = load_file(result.checkpoint / "model.safetensors")
    assert set(weights) == set(VAE(checkpoint.model.config).state_dict())
    assert not (result.checkpoint / ADVERSARY_FILE).exists()

    last = result.checkpoint / "train_state" / "last"
    discriminator, classifier = load_adversary(last / ADVERSARY_FILE)
    assert discriminator(torch.zeros(2, 1, 28, 28)).logits.shape == (2,)
    assert classifier(torch.zeros(2, 1, 28, 28)).logits.shape == (2, 10)
    state = torch.load(last / STATE_FILE, weights_only=True)
    assert set(state[SIDE_STATE_KEY]) == {"discriminator_optimizer", "classifier_optimizer"}


@pytest.mark.slow
def test_the_service_loads_and_serves_the_adversarial_checkpoint(
    adversarial_run: tuple[RunResult, LossRecorder],
) -> None:
    result, _ = adversarial_run
    with TestClient(create_app(Settings(checkpoints=str(result.checkpoint), device="cpu"))) as c:
        response = c.post("/sample?digit=7")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"


class InterruptBeforeFinishing(Callback):
    """Stops a run after its last epoch, before the final evaluation (which a resume test
    does not need)."""

    def on_train_end(self, trainer: Trainer) -> None:
        raise Interrupt


@pytest.mark.slow
def test_resume_after_an_interruption_gives_the_same_vae_d_and_c(
    adversarial_run: tuple[RunResult, LossRecorder], trained_checkpoint: Path, tmp_path: Path
) -> None:
    uninterrupted = adversarial_run[0].checkpoint / "train_state" / "last"
    out = tmp_path / "interrupted"
    config = short_run(out, baseline=str(trained_checkpoint))
    with pytest.raises(Interrupt):
        train(config, callbacks=[InterruptAfter(1)])
    assert torch.load(out / "train_state" / "last" / STATE_FILE, weights_only=True)["epoch"] == 1

    with pytest.raises(Interrupt):
        train(config.replace(resume=True), callbacks=[InterruptBeforeFinishing()])

    resumed = out / "train_state" / "last"
    for name in ("model.safetensors", ADVERSARY_FILE):
        assert_same_tensors(load_file(uninterrupted / name), load_file(resumed / name), name)
    expected_state = torch.load(uninterrupted / STATE_FILE, weights_only=True)
    found_state = torch.load(resumed / STATE_FILE, weights_only=True)
    assert found_state["epoch"] == expected_state["epoch"] == 2
    assert found_state["history"] == [
        {**entry, "seconds": found["seconds"]}
        for entry, found in zip(expected_state["history"], found_state["history"], strict=True)
    ]
    for optimizer in ("discriminator_optimizer", "classifier_optimizer"):
        expected_moments = expected_state[SIDE_STATE_KEY][optimizer]["state"][0]["exp_avg"]
        found_moments = found_state[SIDE_STATE_KEY][optimizer]["state"][0]["exp_avg"]
        assert torch.equal(found_moments, expected_moments), optimizer


def test_without_baseline_the_plain_twin_is_trained_once_then_reused_or_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained: list[TrainConfig] = []

    def fake_train(config: TrainConfig) -> RunResult:
        """Stands in for a real run of the twin: a checkpoint with its settings, at once."""
        trained.append(config)
        torch.manual_seed(0)
        VAE(config.model_config()).save_pretrained(
            config.out_dir, metadata={"training": {"config": config.to_dict()}}
        )
        return RunResult(config.out_dir, {}, {}, config.epochs, 0.0, "cpu")

    monkeypatch.setattr("training.run.train", fake_train)
    config = short_run(tmp_path / "run")
    twin = plain_baseline(config)
    assert twin == tmp_path / "run" / "train_state" / "baseline"
    (twin_config,) = trained
    assert twin_config == config.replace(adversarial=False, out=str(twin))

    assert plain_baseline(config.replace(progress=True)) == twin
    assert len(trained) == 1, "a finished twin with the same settings is reused"

    # Another seed needs another twin; an unfinished one is continued on --resume.
    (twin / "train_state" / "last").mkdir(parents=True)
    (twin / "train_state" / "last" / STATE_FILE).write_bytes(b"")
    plain_baseline(config.replace(seed=1, resume=True))
    assert trained[-1] == config.replace(seed=1, adversarial=False, out=str(twin), resume=True)
