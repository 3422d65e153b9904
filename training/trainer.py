"""A training loop that knows nothing about its model: batches in, a loss out, callbacks around."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

if TYPE_CHECKING:
    from training.distributed import Distributed

logger = logging.getLogger(__name__)

# The progress bar's numbers are refreshed this often; each refresh syncs a GPU once.
_POSTFIX_EVERY = 10


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); the message says what to change."""


@dataclass
class StepOutput:
    """What a loss function returns for one batch: the scalar to minimise and named numbers to log
    (detached scalars, averaged over the epoch for the summary)."""

    loss: Tensor
    logs: dict[str, Tensor | float] = field(default_factory=dict)


class LossFn(Protocol):
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, step: int) -> StepOutput: ...


class SizedBatches(Iterable[tuple[Tensor, Tensor]], Sized, Protocol):
    """Re-iterable (x, y) batches with a known count per epoch (training.data.Batches)."""


@dataclass(frozen=True)
class TrainerSettings:
    """How to optimise: everything the loop needs, nothing about the model."""

    epochs: int
    lr: float
    weight_decay: float = 0.0
    lr_schedule: Literal["cosine", "none"] = "cosine"
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping
    patience: int = 0  # epochs without a better validation score before stopping; 0 = never
    amp: bool = False  # bf16 autocast when the model is on CUDA; ignored elsewhere
    progress: bool = True  # a tqdm bar per epoch, shown only when stderr is a terminal
    validation_name: str = "val score"  # how the epoch summary names the validation score


@dataclass
class EpochSummary:
    """One finished epoch (1-based). val_score is higher-is-better, None without validation."""

    epoch: int
    train_loss: float
    train_logs: dict[str, float]
    val_score: float | None
    seconds: float  # training + validation, without callbacks
    lr: float  # learning rate at the end of the epoch
    improved: bool  # val_score is the best so far (always True without validation)


class Callback:
    """Hooks around the loop; override the ones you need. Callbacks run in the order given."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before the first batch of `epoch` (1-based)."""

    def on_batch_end(self, trainer: Trainer, output: StepOutput) -> None:
        """After each optimiser step; trainer.step already counts it."""

    def on_epoch_end(self, trainer: Trainer, summary: EpochSummary) -> None:
        """After validation; trainer.state_dict() is now the state a resume continues from."""

    def on_train_end(self, trainer: Trainer) -> None:
        """Once, after the last epoch (also after early stopping, or when nothing was left)."""


class _LossStep(nn.Module):
    """The model and its loss as one module, so that DistributedDataParallel's forward covers
    every call the loss makes into the model (the digit head is called outside VAE.forward)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, x: Tensor, y: Tensor, step: int) -> StepOutput:
        return self.loss_fn(self.model, x, y, step)


class Trainer:
    """Adam over `batches` for settings.epochs epochs, with optional cosine decay, gradient
    clipping, bf16 autocast, per-epoch validation, early stopping and an exactly resumable state.

    With `distributed` (one rank of a torchrun job, training.distributed) every rank runs this
    loop on its share of each batch: the model and loss run under DistributedDataParallel,
    which averages the gradients over the ranks, so every rank takes the same optimiser step.
    Rank 0 alone validates (the others receive its score) and shows progress; the epoch's mean
    losses are averaged over the ranks; callbacks run on every rank they are given to.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: SizedBatches,
        settings: TrainerSettings,
        validate: Callable[[nn.Module], float] | None = None,
        callbacks: Sequence[Callback] = (),
        data_generator: torch.Generator | None = None,
        distributed: Distributed | None = None,
    ) -> None:
        if settings.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {settings.epochs}")
        if len(batches) == 0:
            raise ValueError("batches is empty: give the trainer at least one batch per epoch")
        self.model = model
        self.loss_fn = loss_fn
        self.batches = batches
        self.settings = settings
        self.validate = validate
        self.callbacks = list(callbacks)
        # Its state is saved with the rest, so a resumed run sees the same batch order.
        self.data_generator = data_generator
        self.device = next(model.parameters()).device
        self.use_amp = settings.amp and self.device.type == "cuda"
        self.distributed = distributed
        # Data-parallel: the weight of this rank's share of global batch i (Batches.share_weight).
        self._share_weight: Callable[[int], float] | None = None
        if distributed is not None:
            self._share_weight = getattr(batches, "share_weight", None)
            if not callable(self._share_weight):
                raise TypeError(
                    "data-parallel training needs batches that give each rank's share_weight "
                    "(training.data.Batches)"
                )
        self._parallel_step = (
            None if distributed is None else distributed.wrap(_LossStep(model, loss_fn))
        )
        # Every rank's RNG states after the last finished epoch (distributed runs), for state_dict.
        self._rank_rng: list[dict[str, Tensor | None]] | None = None

        self.optimizer = torch.optim.Adam(
            model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
        total_steps = settings.epochs * len(batches)
        cosine = settings.lr_schedule == "cosine"

        def lr_factor(step: int) -> float:
            # Closed form of the step, so a resumed or lengthened run needs no stored curve.
            if not cosine:
                return 1.0
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)

        self.epoch = 0  # epochs finished
        self.step = 0  # optimiser steps taken
        self.best_score = -math.inf
        self.best_epoch = 0
        self.epochs_without_improvement = 0
        self.stopped_early = False
        self.train_seconds = 0.0
        self.history: list[dict[str, float]] = []

    # ---- the loop ---------------------------------------------------------------------------

    def fit(self) -> None:
        """Train from the current epoch to settings.epochs (or until early stopping)."""
        while self.epoch < self.settings.epochs and not self.stopped_early:
            self._run_epoch(self.epoch + 1)
        for callback in self.callbacks:
            callback.on_train_end(self)

    def _run_epoch(self, epoch: int) -> None:
        started = time.perf_counter()
        for callback in self.callbacks:
            callback.on_epoch_start(self, epoch)
        self.model.train()
        sums: dict[str, Tensor | float] = {}
        bar = tqdm(
            total=len(self.batches),
            desc=f"epoch {epoch}/{self.settings.epochs}",
            unit="batch",
            leave=False,
            dynamic_ncols=True,
            disable=not (self.settings.progress and sys.stderr.isatty() and self._is_main),
        )
        batches = 0
        with bar:
            for index, (x, y) in enumerate(self.batches):
                # Data-parallel: this rank's share of the batch, weighted so that the ranks'
                # average (DDP's, and the logged means') counts every image alike.
                weight = 1.0 if self._share_weight is None else self._share_weight(index)
                output = self._train_step(x, y, weight)
                batches += 1
                for name, value in {"loss": output.loss, **output.logs}.items():
                    # Summed on the device; read back only for the bar and at the epoch's end.
                    value = value.detach().double() if isinstance(value, Tensor) else value
                    value = value * weight if weight != 1.0 else value
                    sums[name] = sums[name] + value if name in sums else value
                for callback in self.callbacks:
                    callback.on_batch_end(self, output)
                bar.update()
                if not bar.disable and (batches % _POSTFIX_EVERY == 0):
                    bar.set_postfix({k: f"{float(v) / batches:.2f}" for k, v in sums.items()})
        if self.distributed is not None:
            sums = self._mean_over_ranks(sums)
        means = {name: float(total) / batches for name, total in sums.items()}
        train_loss = means.pop("loss")
        if not math.isfinite(train_loss):
            raise TrainingError(
                f"the training loss became {train_loss} in epoch {epoch}: lower --lr "
                f"(now {self.settings.lr:g}) or set --grad-clip, then start again"
            )
        val_score = self._validation_score()
        if val_score is not None and not math.isfinite(val_score):
            raise TrainingError(
                f"the {self.settings.validation_name} became {val_score} after epoch {epoch}: "
                f"lower --lr (now {self.settings.lr:g}) or set --grad-clip, then start again"
            )
        seconds = time.perf_counter() - started
        improved = val_score is None or val_score > self.best_score
        if improved:
            self.best_score = val_score if val_score is not None else -math.inf
            self.best_epoch = epoch
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        patience = self.settings.patience
        self.stopped_early = patience > 0 and self.epochs_without_improvement >= patience
        self.epoch = epoch
        self.train_seconds += seconds
        lr = float(self.optimizer.param_groups[0]["lr"])
        summary = EpochSummary(epoch, train_loss, means, val_score, seconds, lr, improved)
        self.history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                **{f"train_{k}": v for k, v in means.items()},
                **({} if val_score is None else {"val_score": val_score}),
                "seconds": seconds,
                "lr": lr,
            }
        )
        logger.info(self._summary_line(summary))
        if self.stopped_early:
            logger.info(
                "stopping early: no better %s for %d epochs (best %.2f at epoch %d)",
                self.settings.validation_name,
                patience,
                self.best_score,
                self.best_epoch,
            )
        if self.distributed is not None:
            # Before the callbacks: a checkpoint written there holds every rank's stream.
            self._rank_rng = self.distributed.gather(_rng_state(self.device))
        for callback in self.callbacks:
            callback.on_epoch_end(self, summary)

    @property
    def _is_main(self) -> bool:
        return self.distributed is None or self.distributed.is_main

    def _validation_score(self) -> float | None:
        if self.validate is None:
            return None
        if self.distributed is None:
            return float(self.validate(self.model))
        # Every rank holds the same weights: rank 0 scores them, the others take its number.
        score = float(self.validate(self.model)) if self.distributed.is_main else math.nan
        return self.distributed.broadcast_float(score)

    def _mean_over_ranks(self, sums: dict[str, Tensor | float]) -> dict[str, Tensor | float]:
        """The epoch's per-rank sums averaged over the ranks (each ran as many batches)."""
        assert self.distributed is not None
        names = list(sums)
        values = torch.stack(
            [torch.as_tensor(sums[name], dtype=torch.float64, device=self.device) for name in names]
        )
        return dict(zip(names, self.distributed.mean(values), strict=True))

    def _train_step(self, x: Tensor, y: Tensor, weight: float = 1.0) -> StepOutput:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            if self._parallel_step is None:
                output = self.loss_fn(self.model, x, y, self.step)
            else:
                output = self._parallel_step(x, y, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        (output.loss * weight if weight != 1.0 else output.loss).backward()
        if self.settings.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return output

    def _summary_line(self, summary: EpochSummary) -> str:
        parts = [
            f"epoch {summary.epoch:>3}/{self.settings.epochs}",
            f"train loss {summary.train_loss:.2f}",
            *(f"{name} {value:.2f}" for name, value in summary.train_logs.items()),
        ]
        if summary.val_score is not None:
            best = " *" if summary.improved else ""
            parts.append(f"{self.settings.validation_name} {summary.val_score:.2f}{best}")
        parts += [f"lr {summary.lr:.2e}", f"{summary.seconds:.1f}s"]
        return "  ".join(parts)

    # ---- resumable state --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights that a resumed run needs to continue bit for bit; tensors
        and plain Python values only, so torch.load(..., weights_only=True) reads it back."""
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return {
            "epoch": self.epoch,
            "step": self.step,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "epochs_without_improvement": self.epochs_without_improvement,
            "stopped_early": self.stopped_early,
            "train_seconds": self.train_seconds,
            "history": [dict(entry) for entry in self.history],
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": cuda_rng,
            "data_rng": None if self.data_generator is None else self.data_generator.get_state(),
            # Distributed runs: each rank's own stream (reparameterisation noise differs per rank).
            **({} if self.distributed is None else {"rank_rng": self._rank_rng}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict() taken after some epoch (the model's weights are loaded apart)."""
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.best_score = float(state["best_score"])
        self.best_epoch = int(state["best_epoch"])
        self.epochs_without_improvement = int(state["epochs_without_improvement"])
        self.stopped_early = bool(state["stopped_early"])
        self.train_seconds = float(state["train_seconds"])
        self.history = [dict(entry) for entry in state["history"]]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["cpu_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.data_generator is not None and state["data_rng"] is not None:
            self.data_generator.set_state(state["data_rng"])
        if self.distributed is not None:
            self._restore_rank_rng(state.get("rank_rng"))

    def _restore_rank_rng(self, saved: list[dict[str, Tensor | None]] | None) -> None:
        assert self.distributed is not None
        rank, world_size = self.distributed.rank, self.distributed.world_size
        if saved is not None and len(saved) == world_size:
            own = saved[rank]
            cpu = own["cpu"]
            assert cpu is not None
            torch.set_rng_state(cpu)
            if own["cuda"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(own["cuda"], self.device)
            self._rank_rng = saved
            return
        if rank == 0:
            logger.warning(
                "resuming on %d processes a run saved by %s: it continues, but not bit for bit "
                "(each process's random stream is seeded anew)",
                world_size,
                "one process" if saved is None else f"{len(saved)} processes",
            )
        # Distinct streams per rank, derived from the restored one.
        torch.manual_seed(int(torch.randint(0, 2**62, ())) + rank)


def _rng_state(device: torch.device) -> dict[str, Tensor | None]:
    """This process's global random streams: the CPU's and, training on a GPU, that GPU's."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}
