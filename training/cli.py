"""`python -m training` / `vae-train`: flags -> TrainConfig -> one training run -> a summary."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from models import CheckpointError
from models.config import ANOMALY_STATISTIC_NAMES, ARCHITECTURES, LIKELIHOODS
from training.checkpoints import TRAIN_STATE_DIR
from training.cliutil import EXIT_BAD_INPUT, OneLineErrorParser, report_error
from training.config import LR_SCHEDULES, ConfigError, TrainConfig
from training.data import DataError
from training.distributed import (
    Distributed,
    PeerFailed,
    environment_rank,
    environment_world_size,
    launched_by_torchrun,
)
from training.presets import PRESETS
from training.run import RunResult, check_for_torchrun, train, train_distributed
from training.sample_quality import judge_views
from training.trainer import TrainingError

# Exit code of a run that started but could not finish (e.g. the loss diverged).
EXIT_TRAINING_FAILED = 1
# 128 + SIGINT, what shells report for a job stopped with Ctrl-C.
EXIT_INTERRUPTED = 130


def hidden_dims(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        widths = ()
    if not widths or any(w <= 0 for w in widths):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive widths like 32,64, got {text!r}"
        )
    return widths


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m training",
        description=(
            "Train a VAE on MNIST and write an evaluated checkpoint. A preset sets every knob; "
            "each flag given overrides the preset. Under `torchrun --nproc-per-node N -m "
            "training ...` it trains data-parallel on N processes (DistributedDataParallel; "
            "--batch-size is the global batch, split among them)."
        ),
    )
    add = parser.add_argument
    add("--preset", default="default", help=f"one of {', '.join(PRESETS)} (default: default)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", dest="architecture", choices=ARCHITECTURES)
    model.add_argument(
        "--conditional", action=argparse.BooleanOptionalAction, help="condition on the digit"
    )
    model.add_argument("--hidden-dims", type=hidden_dims, metavar="W1,W2", help="e.g. 32,64")
    model.add_argument(
        "--decoder-blocks",
        type=int,
        metavar="N",
        help="conv: residual blocks before each of the decoder's upsampling steps (0: none)",
    )
    model.add_argument("--latent-dim", type=int)
    model.add_argument("--likelihood", choices=LIKELIHOODS)
    model.add_argument("--gaussian-std", type=float, help="fixed pixel std (default: learned)")
    model.add_argument(
        "--digit-head",
        action=argparse.BooleanOptionalAction,
        help="train a classifier q(y|x) beside a conditional VAE (fast digit prediction)",
    )
    model.add_argument(
        "--anomaly-statistics",
        type=lambda text: tuple(part.strip() for part in text.split(",")),
        metavar="S1,S2",
        help=f"what the anomaly score compares; any of {', '.join(ANOMALY_STATISTIC_NAMES)}",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help="mnist-5k (embedded) or mnist (60k, see --download)")
    data.add_argument("--data-dir", help="where real MNIST lives (default: data)")
    data.add_argument("--download", action="store_true", default=None, help="fetch real MNIST")
    data.add_argument(
        "--binarize", action=argparse.BooleanOptionalAction, help="dynamic binarisation"
    )
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int)
    optim.add_argument("--batch-size", type=int)
    optim.add_argument("--lr", type=float)
    optim.add_argument("--weight-decay", type=float)
    optim.add_argument("--lr-schedule", choices=LR_SCHEDULES)
    optim.add_argument("--grad-clip", type=float, help="max gradient norm, 0 = off")
    optim.add_argument("--beta", type=float, help="KL weight after warm-up (1 = ELBO)")
    optim.add_argument("--kl-warmup-epochs", type=float)
    optim.add_argument("--free-bits", type=float, help="nats per latent dim, 0 = off")
    optim.add_argument("--patience", type=int, help="early stopping on val ELBO, 0 = off")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    runtime.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, help="bf16 autocast (CUDA only)"
    )
    runtime.add_argument("--seed", type=int)
    runtime.add_argument("--out", help="output folder (default: checkpoints/<preset>)")
    runtime.add_argument(
        "--resume", action="store_true", default=None, help="continue <out>/train_state/last"
    )
    runtime.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no tqdm bar"
    )
    runtime.add_argument(
        "--tensorboard", metavar="DIR", help="write TensorBoard logs here (needs tensorboard)"
    )
    adversarial = parser.add_argument_group("adversarial training (CVAE-GAN)")
    adversarial.add_argument(
        "--adversarial",
        action=argparse.BooleanOptionalAction,
        help="train a discriminator and a classifier beside a conditional VAE",
    )
    adversarial.add_argument("--lambda-adv", type=float, help="weight of the generator loss on D")
    adversarial.add_argument(
        "--lambda-cls", type=float, help="weight of C's cross-entropy on generated digits"
    )
    adversarial.add_argument("--discriminator-lr", type=float, help="Adam rate of D")
    adversarial.add_argument("--classifier-lr", type=float, help="Adam rate of C")
    adversarial.add_argument(
        "--adversarial-start-epochs", type=float, help="plain ELBO epochs before D and C count"
    )
    adversarial.add_argument(
        "--adversarial-ramp-epochs", type=float, help="epochs over which their weight reaches 1"
    )
    adversarial.add_argument(
        "--baseline",
        metavar="CHECKPOINT",
        help="plain VAE to compare samples with (default: train the plain twin of this run)",
    )
    adversarial.add_argument(
        "--quality-samples-per-class", type=int, help="prior samples per digit for the metrics"
    )
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--iwae-k", type=int, help="IWAE samples for the test likelihood")
    evaluation.add_argument("--eval-batch-size", type=int)
    evaluation.add_argument(
        "--sample-quality",
        action=argparse.BooleanOptionalAction,
        help="judge samples with an independent classifier and CAS at the end (~1 min on CPU)",
    )
    evaluation.add_argument("--judge-epochs", type=int, help="epochs of the judge's recipe")
    evaluation.add_argument("--anomaly-fpr", type=float, help="validation share flagged")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset with every flag that was given on top."""
    overrides: dict[str, Any] = {
        name: value for name, value in vars(args).items() if name != "preset" and value is not None
    }
    return TrainConfig.from_preset(args.preset, **overrides)


def summary(result: RunResult) -> str:
    metrics, anomaly = result.metrics, result.anomaly
    lines = [
        f"checkpoint: {result.checkpoint}",
        f"  trained {result.epochs_run} epochs in {result.train_seconds:.1f} s on {result.device}",
    ]
    given = " (given the digit)" if metrics["conditional"] else ""
    lines.append(f"  test ELBO{given}: {metrics['elbo']:.2f} nats")
    lines.append(f"  test IWAE NLL{given}, k={metrics['iwae_k']}: {metrics['iwae_nll']:.2f} nats")
    if metrics["conditional"]:
        lines.append(f"  test IWAE NLL, digit summed out: {metrics['marginal_iwae_nll']:.2f} nats")
        lines.append(f"  digit accuracy: {metrics['digit_accuracy']:.1%}")
    lines.append(
        f"  anomaly threshold {anomaly['threshold']:.3f} (flags {anomaly['fpr']:.1%} of "
        f"validation digits, {anomaly['test_fpr']:.1%} of test digits)"
    )
    held_out = anomaly.get("held_out")
    if held_out is not None:
        summary = held_out["summary"]
        lines.append(
            f"  held-out anomaly sets: near AUROC min {summary['near_auroc_min']:.3f}, mean "
            f"{summary['near_auroc_mean']:.3f}; far AUROC min {summary['far_auroc_min']:.3f}"
        )
    quality = metrics.get("sample_quality")
    if quality is not None:
        views = judge_views(quality)
        for name, view in views.items():
            served = view["served"]
            lines.append(
                f"  samples ({served['prior']} prior, {served['samples_per_class']} per digit) "
                f"judged by the {name} judge: on-digit {served['accuracy']:.1%}, FD "
                f"{served['frechet_distance']:.3g} ({served['fd_ratio']:.2f}x the real-digit "
                f"floor {served['frechet_distance_floor']:.3g}), diversity "
                f"{served['diversity_ratio']:.2f}x real, CAS {view['cas']['accuracy']:.1%} "
                f"(real digits {view['cas']['real_training_digits_accuracy']:.1%})"
            )
    comparison = metrics.get("adversarial_comparison")
    if comparison is not None:
        lines.append(
            f"  prior samples ({comparison['samples_per_class']} per digit), judged by the "
            "reference classifier:"
        )
        for name in ("adversarial", "plain"):
            judged = comparison[name]["reference_classifier"]
            lines.append(
                f"    {name:<11} digit accuracy {judged['accuracy']:.1%}, "
                f"Frechet distance to test digits {judged['frechet_distance']:.2f}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    # Under torchrun every rank runs this; rank 0 alone logs, prints and reports errors that
    # every rank meets alike (flags, settings), so each is said once.
    rank = environment_rank()
    quiet = contextlib.redirect_stderr(io.StringIO()) if rank else contextlib.nullcontext()
    with quiet:
        args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(message)s",
        stream=sys.stderr,
    )
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        return report_error(exc) if rank == 0 else EXIT_BAD_INPUT
    if not launched_by_torchrun():
        return _run(lambda: train(config), config)
    try:
        check_for_torchrun(config, environment_world_size())
    except ConfigError as exc:
        return report_error(exc) if rank == 0 else EXIT_BAD_INPUT
    try:
        distributed = Distributed.start(config.device)
    except ConfigError as exc:
        return report_error(exc, rank)
    try:
        return _run(lambda: train_distributed(config, distributed), config, rank)
    finally:
        distributed.close()


def _run(run: Callable[[], RunResult | None], config: TrainConfig, rank: int = 0) -> int:
    """Run the training; print its summary (rank 0) or its error as one line."""
    try:
        result = run()
    except PeerFailed:
        return EXIT_BAD_INPUT  # rank 0 said why
    except (ConfigError, DataError, CheckpointError) as exc:
        return report_error(exc, rank)
    except TrainingError as exc:
        # The ranks agree on the losses and the validation score, so all stop together.
        if rank == 0:
            report_error(exc)
        return EXIT_TRAINING_FAILED
    except KeyboardInterrupt:
        if rank == 0:
            print(
                f"interrupted: run again with --resume to continue from the last finished "
                f"epoch in {config.out_dir / TRAIN_STATE_DIR / 'last'}",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
    if result is not None:
        print(summary(result))
    return 0
