"""One training run end to end: checks, data, model, trainer, then the evaluated checkpoint."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from models import VAE, load_checkpoint, read_metadata
from models.checkpoint import recover_checkpoint
from models.prior import PRIOR_FILE, checkpoint_prior
from training.adversarial import AdversarialObjective
from training.checkpoints import (
    STATE_FILE,
    TRAIN_STATE_DIR,
    CheckpointCallback,
    ResumePoint,
    load_resume_point,
    train_state_dir,
)
from training.config import ConfigError, TrainConfig, resolve_device
from training.data import Batches, MNISTData, Split, load_dataset
from training.distributed import Distributed, rank_seed
from training.evaluate import anomaly_report, calibrate_anomaly, evaluate
from training.generate import png_bytes, sample_grid
from training.index import INDEX_FILE, build_checkpoint_index
from training.objective import VAEObjective
from training.prior import fit_prior
from training.sample_quality import compare_sample_quality, sample_quality
from training.sharpness import fit_decoder_temperature
from training.tensorboard import TensorBoardCallback, open_writer, require_tensorboard
from training.trainer import Callback, Trainer, TrainerSettings

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.png"
# Where an adversarial run trains its plain twin, inside its train_state/.
BASELINE_DIR = "baseline"
ADVERSARIAL_UNDER_TORCHRUN = (
    "--adversarial does not run under torchrun: its discriminator and classifier take "
    "optimiser steps of their own inside the loss, which DistributedDataParallel does not "
    "synchronise; train it in one process: python -m training --preset cvae-gan"
)

T = TypeVar("T")


@dataclass
class RunResult:
    """Where the final checkpoint is and what it scored."""

    checkpoint: Path
    metrics: dict[str, Any]  # evaluate() on the test split
    anomaly: dict[str, Any]  # calibrate_anomaly()
    epochs_run: int
    train_seconds: float
    device: str


@dataclass
class Stages:
    """Logs each stage after training as it starts and ends (with its time), so a long
    evaluation never runs silently; `seconds` keeps the times for config.json."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        logger.info("%s ...", what)
        started = time.perf_counter()
        yield
        elapsed = time.perf_counter() - started
        self.seconds[what] = round(elapsed, 2)
        logger.info("  done in %.1f s", elapsed)


class ValidationELBO:
    """Mean single-sample ELBO on a split with a freshly seeded generator each call, so epochs
    are compared on the same noise; higher is better."""

    def __init__(self, split: Split, batch_size: int, seed: int) -> None:
        self.split = split
        self.batch_size = batch_size
        self.seed = seed

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> float:
        if not isinstance(model, VAE):
            raise TypeError(f"ValidationELBO needs a models.VAE, got {type(model).__name__}")
        model.eval()
        generator = torch.Generator(model.device).manual_seed(self.seed)
        total = torch.zeros((), dtype=torch.float64, device=model.device)
        for x, y in Batches(self.split, self.batch_size, shuffle=False):
            labels = y if model.config.conditional else None
            total += model.elbo(x, labels, k=1, generator=generator).double().sum()
        return float(total) / len(self.split)


def train(config: TrainConfig, callbacks: Sequence[Callback] = ()) -> RunResult:
    """Train as `config` says and write the final checkpoint to config.out_dir.

    Every check that can fail on bad input (device, TensorBoard, output folder, data, resume
    state) runs before anything is written. `callbacks` run after the built-in ones.
    """
    fitted = _fit(config, callbacks, None)
    return finish(config, fitted.data, fitted.trainer, fitted.device, fitted.baseline)


def train_distributed(
    config: TrainConfig, distributed: Distributed, callbacks: Sequence[Callback] = ()
) -> RunResult | None:
    """`train` as one rank of a torchrun job: every rank trains its share of each batch under
    DistributedDataParallel (config.batch_size is the global batch); rank 0 alone checks and
    writes the output folder, validates, logs and, after training, fits, evaluates and writes
    the final checkpoint, which it returns. The other ranks return None once training ends.
    `callbacks` run on every rank."""
    check_for_torchrun(config, distributed.world_size)
    fitted = _fit(config, callbacks, distributed)
    if not distributed.is_main:
        return None
    return finish(config, fitted.data, fitted.trainer, fitted.device, fitted.baseline)


def check_for_torchrun(config: TrainConfig, world_size: int) -> None:
    """Refuse, with a ConfigError that says what to change, what cannot run on `world_size`
    torchrun processes."""
    if config.adversarial:
        raise ConfigError(ADVERSARIAL_UNDER_TORCHRUN)
    if config.batch_size % world_size:
        suggestion = world_size * max(1, round(config.batch_size / world_size))
        raise ConfigError(
            f"--batch-size {config.batch_size} is the global batch, split evenly among the "
            f"{world_size} processes, and does not divide by {world_size}: use a multiple of "
            f"{world_size}, e.g. --batch-size {suggestion}"
        )


@dataclass
class _Fitted:
    """A trained run, before the steps of `finish`."""

    data: MNISTData
    trainer: Trainer
    device: torch.device
    baseline: Path | None


def _fit(
    config: TrainConfig, callbacks: Sequence[Callback], distributed: Distributed | None
) -> _Fitted:
    device = resolve_device(config.device) if distributed is None else distributed.device
    main = distributed is None or distributed.is_main
    if config.amp and device.type != "cuda":
        logger.warning("--amp is ignored on %s: bf16 autocast is used on CUDA only", device)
    if config.tensorboard is not None and main:
        require_tensorboard()
    out_dir = config.out_dir

    def check_output_folder() -> None:
        # A final save that a kill interrupted is finished first: it may hold train_state/.
        recover_checkpoint(out_dir)
        check_output(out_dir, config.tensorboard)

    def read_resume_point() -> ResumePoint | None:
        return load_resume_point(out_dir, config) if config.resume else None

    def load_data() -> MNISTData:
        return load_dataset(config.dataset, data_dir=config.data_dir, download=config.download)

    # Rank 0 alone reads and writes the output folder (rank 0's node is the one that must
    # hold it); the others receive what it read. Each node downloads the data once.
    _on_main(distributed, check_output_folder)
    data = load_data() if distributed is None else distributed.local_main_first(load_data)
    resume_point = _on_main(distributed, read_resume_point)
    baseline = plain_baseline(config) if config.adversarial else None

    logger.info(
        "training preset %r on %s (%s) -> %s",
        config.preset,
        device,
        ", ".join(f"{k} {v}" for k, v in data.split_info["sizes"].items()),
        out_dir,
    )
    state_dir = train_state_dir(out_dir)

    def prepare_state_dir() -> None:
        if resume_point is None:
            # A new run must not mix its epochs with an older run's best/ or last/.
            for stale in ("last", "best"):
                shutil.rmtree(state_dir / stale, ignore_errors=True)
        state_dir.mkdir(parents=True, exist_ok=True)

    _on_main(distributed, prepare_state_dir)

    data = data.to(device)
    torch.manual_seed(config.seed)
    model = VAE(config.model_config()).to(device)
    if distributed is not None:
        # The same initial weights on every rank (seeded above), then a random stream of each
        # rank's own: the reparameterisation noise and the head's shifts differ per rank.
        torch.manual_seed(rank_seed(config.seed, distributed.rank))
    data_generator = torch.Generator().manual_seed(config.seed)
    batches = Batches(
        data.train,
        config.batch_size,
        generator=data_generator,
        binarize=config.binarize,
        rank=0 if distributed is None else distributed.rank,
        world_size=1 if distributed is None else distributed.world_size,
    )
    adversary = (
        AdversarialObjective.for_run(config, len(batches), device) if config.adversarial else None
    )
    builtin: list[Callback] = []
    if main:
        builtin.append(CheckpointCallback(model, out_dir, config, side_state=adversary))
        if config.tensorboard is not None:
            writer = open_writer(Path(config.tensorboard))
            builtin.append(TensorBoardCallback(writer, model, seed=config.seed))
    trainer = Trainer(
        model,
        adversary
        or VAEObjective(config.beta, config.kl_warmup_epochs, len(batches), config.free_bits),
        batches,
        TrainerSettings(
            epochs=config.epochs,
            lr=config.lr,
            weight_decay=config.weight_decay,
            lr_schedule=config.lr_schedule,
            grad_clip=config.grad_clip,
            patience=config.patience,
            amp=config.amp,
            progress=config.progress,
            validation_name="val ELBO",
        ),
        validate=ValidationELBO(data.val, config.eval_batch_size, config.seed),
        callbacks=[*builtin, *callbacks],
        data_generator=data_generator,
        distributed=distributed,
    )
    if resume_point is not None:
        model.load_state_dict(resume_point.weights)
        if adversary is not None:
            if resume_point.side_state is None or resume_point.folder is None:
                raise ConfigError(
                    f"--resume: {out_dir} holds no discriminator and classifier state; "
                    "start a new run without --resume"
                )
            adversary.load_files(resume_point.folder)
            adversary.load_state_dict(resume_point.side_state)
        trainer.load_state_dict(resume_point.trainer_state)  # last: it restores the RNGs
        logger.info("resuming after epoch %d of %d", resume_point.epoch, config.epochs)
    trainer.fit()
    return _Fitted(data, trainer, device, baseline)


def _on_main(distributed: Distributed | None, step: Callable[[], T]) -> T:
    """`step` here in one process; on rank 0 alone, its result shared, under torchrun."""
    return step() if distributed is None else distributed.from_main(step)


def finish(
    config: TrainConfig,
    data: MNISTData,
    trainer: Trainer,
    device: torch.device,
    baseline: Path | None = None,
) -> RunResult:
    """Best weights -> anomaly calibration -> test metrics -> the final checkpoint in out_dir.

    An adversarial run keeps its last epoch instead of the best by validation ELBO: its
    adversarial terms trade likelihood for sharper samples, so the best-ELBO epoch would pick
    the least adversarial weights. Its metrics add the sample quality against `baseline`.
    """
    out_dir = config.out_dir
    selected = "last" if config.adversarial else "best"
    evaluated_epoch = trainer.epoch if config.adversarial else trainer.best_epoch
    model = load_checkpoint(train_state_dir(out_dir) / selected, device).model
    stages = Stages()
    with stages("fitting the decoder temperature and the latent prior"):
        temperature, sharpness = fit_decoder_temperature(model, data.train, config.eval_batch_size)
        model.config = replace(model.config, decoder_temperature=temperature)
        prior = fit_prior(model, data.train, data.val, seed=config.seed)
    with stages("calibrating the anomaly score on the train and validation splits"):
        anomaly = calibrate_anomaly(model, data, config.anomaly_fpr, config.eval_batch_size)
    with stages(f"evaluating epoch {evaluated_epoch} on the test split (IWAE k={config.iwae_k})"):
        metrics = evaluate(
            model,
            data.test,
            iwae_k=config.iwae_k,
            batch_size=config.eval_batch_size,
            generator=torch.Generator(device).manual_seed(config.seed),
        )
    with stages("scoring the held-out anomaly sets"):
        anomaly["held_out"] = anomaly_report(
            model, data, anomaly["threshold"], batch_size=config.eval_batch_size
        )
    if config.sample_quality and model.config.conditional:
        with stages("judging samples with two independent classifiers (and CAS)"):
            metrics["sample_quality"] = sample_quality(
                model,
                prior,
                data,
                train_state_dir(out_dir),
                seed=config.seed,
                epochs=config.judge_epochs,
            )
    if isinstance(trainer.loss_fn, AdversarialObjective) and baseline is not None:
        with stages(f"comparing samples with the plain VAE in {baseline}"):
            plain = load_checkpoint(baseline, device)
            metrics["adversarial_comparison"] = compare_sample_quality(
                model,
                plain.model,
                trainer.loss_fn.classifier,
                data,
                per_class=config.quality_samples_per_class,
                seed=config.seed,
                cache_dir=train_state_dir(out_dir),
                priors=(prior, checkpoint_prior(plain)),
                epochs=config.judge_epochs,
            )
        metrics["adversarial_comparison"]["baseline"] = str(baseline)
    training = {
        "preset": config.preset,
        "config": config.to_dict(),
        "epochs_run": trainer.epoch,
        "best_epoch": trainer.best_epoch,
        "best_val_elbo": trainer.best_score,
        "evaluated_epoch": evaluated_epoch,
        "stopped_early": trainer.stopped_early,
        "train_seconds": round(trainer.train_seconds, 3),
        "device": str(device),
        "amp": trainer.use_amp,
        "evaluation_seconds": stages.seconds,
    }
    if trainer.distributed is not None:
        # A torchrun run: how many processes shared each batch, and through what.
        training["processes"] = trainer.distributed.world_size
        training["backend"] = trainer.distributed.backend
    with stages("building the latent index of the train split"):
        # The index behind POST /similar (training/index.py).
        index_bytes, index_card = build_checkpoint_index(
            model, data.train, data.test, data.name, config.eval_batch_size
        ).export()
    prior_bytes, prior_card = prior.export()
    prior_card["decoder_temperature"] = {"value": temperature, **sharpness}
    report = {
        "training": training,
        "metrics": metrics,
        "anomaly": anomaly,
        "index": index_card,
        "prior": prior_card,
    }
    model.save_pretrained(
        out_dir,
        metadata={**report, "dataset": data.split_info},
        extra_files={
            METRICS_FILE: (
                json.dumps({**report, "history": trainer.history}, indent=2) + "\n"
            ).encode(),
            SAMPLES_FILE: png_bytes(sample_grid(model, seed=config.seed, prior=prior)),
            INDEX_FILE: index_bytes,
            PRIOR_FILE: prior_bytes,
        },
    )
    return RunResult(
        checkpoint=out_dir,
        metrics=metrics,
        anomaly=anomaly,
        epochs_run=trainer.epoch,
        train_seconds=trainer.train_seconds,
        device=str(device),
    )


def plain_baseline(config: TrainConfig) -> Path:
    """The plain VAE an adversarial run's samples are compared with: --baseline, checked here,
    or the run's plain twin (same preset, seed and epochs, no adversary) trained into
    <out>/train_state/baseline. A twin finished there with the same settings is reused; an
    unfinished one is continued on --resume."""
    if config.baseline is not None:
        plain = load_checkpoint(config.baseline).model
        if not plain.config.conditional:
            raise ConfigError(
                f"--baseline {config.baseline} is an unconditional VAE: the comparison draws "
                "samples of each digit, so give a conditional checkpoint"
            )
        if plain.config != config.model_config():
            logger.warning(
                "--baseline %s has another architecture (%s); the comparison is of models, "
                "not of training alone",
                config.baseline,
                plain.config,
            )
        return Path(config.baseline)
    twin = config.replace(
        adversarial=False,
        baseline=None,
        out=str(train_state_dir(config.out_dir) / BASELINE_DIR),
        tensorboard=None,
        resume=False,
    )
    folder = twin.out_dir

    def settings(saved: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in saved.items() if k not in ("progress", "resume", "out")}

    if (folder / "config.json").is_file():
        saved = read_metadata(folder).get("training", {}).get("config", {})
        if settings(saved) == settings(twin.to_dict()):
            logger.info("reusing the plain twin in %s", folder)
            return folder
    unfinished = (train_state_dir(folder) / "last" / STATE_FILE).is_file()
    logger.info("training the plain twin of this run into %s", folder)
    return train(twin.replace(resume=config.resume and unfinished)).checkpoint


# What a checkpoint folder may hold: save_pretrained replaces the whole folder (keeping only
# train_state/), so a run refuses an --out that holds anything else rather than delete it.
CHECKPOINT_ENTRIES = frozenset(
    {
        "config.json",
        "model.safetensors",
        METRICS_FILE,
        SAMPLES_FILE,
        INDEX_FILE,
        PRIOR_FILE,
        TRAIN_STATE_DIR,
    }
)


def check_output(out_dir: Path, tensorboard: str | None = None) -> None:
    """Refuse an output folder that cannot be written or that holds other files (the final
    save replaces the folder), and TensorBoard logs that the final save would delete; all
    without creating anything."""
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in CHECKPOINT_ENTRIES)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ConfigError(
                f"--out {out_dir} already holds files that are not part of a checkpoint "
                f"({shown}); the final checkpoint replaces the whole folder, so choose a new "
                "or empty --out"
            )
    if tensorboard is not None:
        logs, out = Path(tensorboard).resolve(), out_dir.resolve()
        if logs.is_relative_to(out) and not logs.is_relative_to(out / TRAIN_STATE_DIR):
            raise ConfigError(
                f"--tensorboard {tensorboard} is inside --out, which the final checkpoint "
                f"replaces; use {out_dir / TRAIN_STATE_DIR / 'tb'} (kept) or a folder elsewhere"
            )
    existing = out_dir
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"cannot write the checkpoint to --out {out_dir}: {existing} is a file, not a folder; "
            "choose another --out"
        )
    try:
        # Probe with a real file: permission bits, read-only mounts and quotas all show up here.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ConfigError(
            f"cannot write the checkpoint to --out {out_dir}: {existing} is not writable "
            f"({exc.strerror}); choose another --out"
        ) from exc
