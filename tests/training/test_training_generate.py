"""Tests for training/generate.py: bulk PNG generation, its CLI, and the fixed-seed sample grid."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import VAE, VAEConfig
from training.data import load_dataset, to_float
from training.generate import main, sample_grid


def read_labels(folder: Path) -> list[dict[str, str]]:
    with (folder / "labels.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L" and image.size == (28, 28)
        return np.asarray(image)


@pytest.mark.slow
def test_writes_n_pngs_of_one_digit_with_labels(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sevens"
    assert main([str(trained_checkpoint), "--digit", "7", "--n", "25", "--out", str(out)]) == 0
    assert "wrote 25 images" in capsys.readouterr().out
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"7_{i:05d}.png" for i in range(25)]
    assert read_labels(out) == [{"file": name, "digit": "7"} for name in pngs]
    pixels = read_png(out / "7_00000.png")
    assert pixels.dtype == np.uint8 and pixels.max() > 128  # a bright stroke on black


@pytest.mark.slow
def test_without_digit_a_conditional_model_cycles_through_all_digits(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    assert main([str(trained_checkpoint), "--n", "30", "--out", str(tmp_path), "--grid"]) == 0
    digits = [row["digit"] for row in read_labels(tmp_path)]
    assert digits == [str(i % 10) for i in range(30)]
    assert (tmp_path / "2_00012.png").is_file()
    assert (tmp_path / "grid.png").is_file()


@pytest.mark.slow
def test_same_seed_same_images_other_seed_other_images(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        args = [str(trained_checkpoint), "--n", "3", "--seed", seed, "--batch-size", "2"]
        assert main([*args, "--out", str(tmp_path / name)]) == 0
    first, again, other = (read_png(tmp_path / n / "1_00001.png") for n in "abc")
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.slow
def test_generated_digits_are_recognised_by_an_independent_classifier(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    # 1-nearest-neighbour on the real training digits: 93% accurate on the real test digits.
    train = load_dataset("mnist-5k").train
    references = to_float(train.images).flatten(1)
    # Temperature 1 draws many ambiguous VAE scribbles; 0.5 shows what the model has learned.
    args = [str(trained_checkpoint), "--n", "200", "--temperature", "0.5", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = read_labels(tmp_path)
    images = np.stack([read_png(tmp_path / row["file"]) for row in rows])
    samples = torch.from_numpy(images).reshape(len(rows), -1).float() / 255.0
    predicted = train.labels[torch.cdist(samples, references).argmin(1)]
    wanted = torch.tensor([int(row["digit"]) for row in rows])
    accuracy = float((predicted == wanted).double().mean())
    assert accuracy > 0.85, accuracy


@pytest.mark.slow
def test_unconditional_model_writes_unlabelled_samples(
    trained_unconditional_checkpoint: Path, tmp_path: Path
) -> None:
    assert main([str(trained_unconditional_checkpoint), "--n", "4", "--out", str(tmp_path)]) == 0
    assert read_labels(tmp_path) == [{"file": f"sample_{i:05d}.png", "digit": ""} for i in range(4)]


@pytest.mark.slow
def test_digit_on_an_unconditional_model_is_a_one_line_error(
    trained_unconditional_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([str(trained_unconditional_checkpoint), "--digit", "3", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "unconditional" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--digit", "10"], "--digit"),
        (["--n", "0"], "--n"),
        (["--temperature", "0"], "--temperature"),
        (["--device", "tpu"], "device"),
    ],
)
@pytest.mark.slow
def test_bad_arguments_are_one_line_errors(
    trained_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    assert main([str(trained_checkpoint), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_and_unwritable_out_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "config.json" in capsys.readouterr().err
    torch.manual_seed(0)
    VAE(VAEConfig(architecture="mlp", hidden_dims=(8,), latent_dim=2)).save_pretrained(
        tmp_path / "model"
    )
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main([str(tmp_path / "model"), "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--out" in err


def test_sample_grid_is_10_by_10_and_seeded() -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig(architecture="mlp", hidden_dims=(8,), latent_dim=2))
    grid = sample_grid(model, seed=4)
    assert grid.shape == (3, 302, 302)
    assert torch.equal(grid, sample_grid(model, seed=4))
    assert not torch.equal(grid, sample_grid(model, seed=5))
