"""Tests for training/cli.py: flags over presets, the run summary, and one-line input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.cli import build_parser, config_from_args, main
from training.config import TrainConfig


def config_for(*argv: str) -> TrainConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


def test_no_flags_means_the_default_preset() -> None:
    assert config_for() == TrainConfig()


def test_flags_override_the_preset_and_unset_flags_keep_it() -> None:
    config = config_for(
        "--preset", "tiny", "--model", "mlp", "--hidden-dims", "64,32", "--no-conditional",
        "--lr", "1e-3", "--kl-warmup-epochs", "0.5", "--free-bits", "0.25", "--binarize",
        "--no-progress", "--iwae-k", "7", "--anomaly-fpr", "0.05", "--out", "somewhere",
    )  # fmt: skip
    assert config.preset == "tiny"
    assert (config.architecture, config.hidden_dims, config.conditional) == ("mlp", (64, 32), False)
    assert (config.lr, config.kl_warmup_epochs, config.free_bits) == (1e-3, 0.5, 0.25)
    assert config.binarize and not config.progress
    assert (config.iwae_k, config.anomaly_fpr, config.out) == (7, 0.05, "somewhere")
    assert config.epochs == TrainConfig.from_preset("tiny").epochs  # not given: from the preset


def test_every_train_config_knob_has_a_flag() -> None:
    flags = {action.dest for action in build_parser()._actions}
    knobs = set(TrainConfig().to_dict())
    assert knobs <= flags, knobs - flags


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "huge"], "unknown preset 'huge': choose one of default, quality, mnist-full"),
        (["--model", "transformer"], "invalid choice: 'transformer'"),
        (["--dataset", "cifar10"], "unknown dataset 'cifar10'"),
        (["--epochs", "0"], "invalid epochs 0"),
        (["--epochs", "many"], "invalid int value: 'many'"),
        (["--batch-size", "-1"], "invalid batch_size -1"),
        (["--hidden-dims", "32,x"], "comma-separated positive widths"),
        (["--latent-dim", "0"], "latent_dim"),
        (["--gaussian-std", "0.1"], "--likelihood gaussian"),
        (["--device", "tpu"], "invalid device 'tpu'"),
        (["--resume"], "nothing to resume"),
        (["--dataset", "mnist", "--data-dir", "no-such-dir"], "pass --download"),
        (["--anomaly-fpr", "2"], "anomaly_fpr"),
    ],
)
def test_bad_input_is_one_error_line_exit_2_and_writes_nothing(
    argv: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        raise SystemExit(main(["--preset", "tiny", "--out", "run", *argv]))
    captured = capsys.readouterr()
    assert exited.value.code == 2
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("no_tensorboard")
def test_tensorboard_without_the_package_is_refused_the_same_way(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    test_bad_input_is_one_error_line_exit_2_and_writes_nothing(
        ["--tensorboard", "tb"], "pip install tensorboard", tmp_path, capsys, monkeypatch
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--device", "cuda", "--out", str(tmp_path / "run")]) == 2
    assert "--device cpu" in capsys.readouterr().err


def test_unwritable_output_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["--preset", "tiny", "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the checkpoint") and err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.parametrize("argv", [["--preset", "huge"], ["--epochs", "0"]])
def test_module_entry_point_exits_2_without_a_traceback(argv: list[str], tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "training", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_run_prints_where_the_checkpoint_is_and_its_headline_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--epochs", "1", "--iwae-k", "1", "--out", str(out)]
    assert main([*argv, "--no-progress", "--amp"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"checkpoint: {out}\n")
    for headline in ("test ELBO", "IWAE NLL", "digit accuracy", "anomaly threshold"):
        assert headline in printed
    metadata = json.loads((out / "config.json").read_text())
    assert metadata["training"]["epochs_run"] == 1
    assert metadata["training"]["amp"] is False  # --amp is ignored on the CPU


def test_ctrl_c_says_how_to_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(config: TrainConfig) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("training.cli.train", interrupted)
    assert main(["--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and str(tmp_path / "run" / "train_state" / "last") in err
