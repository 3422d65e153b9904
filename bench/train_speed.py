"""Training speed: the project's loop against a seed-style one on CPU, and GPU epochs when CUDA
is at hand (full-MNIST-sized, from mnist-5k tiled to 60k images: full MNIST cannot be
downloaded where this runs, and the work per epoch is the same)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from models import VAE
from training.config import TrainConfig
from training.data import Batches, Split, load_dataset, to_float
from training.objective import VAEObjective, negative_elbo
from training.trainer import StepOutput, Trainer, TrainerSettings

FULL_MNIST_TRAIN = 60_000
GPU_VARIANTS: tuple[tuple[str, bool, bool], ...] = (
    # (label, bf16 autocast, torch.compile)
    ("eager fp32", False, False),
    ("eager bf16", True, False),
    ("compiled fp32", False, True),
    ("compiled bf16", True, True),
)
IWAE_K = 100  # the default preset's evaluation k; label-marginalised: 10 x k decodes per image


def _settings(config: TrainConfig, epochs: int, amp: bool = False) -> TrainerSettings:
    return TrainerSettings(
        epochs=epochs,
        lr=config.lr,
        weight_decay=config.weight_decay,
        lr_schedule=config.lr_schedule,
        grad_clip=config.grad_clip,
        amp=amp,
        progress=False,
    )


class ProjectLoop:
    """The project's Trainer over device-resident Batches (no validation), one epoch a call."""

    def __init__(self, split: Split, config: TrainConfig, epochs: int) -> None:
        torch.manual_seed(config.seed)
        model = VAE(config.model_config()).to(split.images.device)
        batches = Batches(
            split,
            config.batch_size,
            generator=torch.Generator().manual_seed(config.seed),
            binarize=config.binarize,
        )
        objective = VAEObjective(
            config.beta, config.kl_warmup_epochs, len(batches), config.free_bits
        )
        # Built for every epoch this loop will run, so the learning-rate schedule is the real one.
        self.trainer = Trainer(model, objective, batches, _settings(config, epochs))

    def epoch(self) -> float:
        trainer = self.trainer
        trainer.settings = replace(trainer.settings, epochs=trainer.epoch + 1)
        trainer.fit()
        return float(trainer.history[-1]["seconds"])


class SeedStyleMNIST(Dataset[tuple[Tensor, int]]):
    """What torchvision.datasets.MNIST does per item: a PIL image, then ToTensor."""

    def __init__(self, split: Split) -> None:
        from torchvision import transforms

        self.images = split.images[:, 0].numpy()
        self.labels = split.labels.tolist()
        self.transform = transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = Image.fromarray(np.ascontiguousarray(self.images[index]))  # mode "L"
        tensor: Tensor = self.transform(image)
        return tensor, self.labels[index]


class SeedStyleLoop:
    """A plain loop: Dataset + DataLoader (shuffled, same batch size), the same model and loss,
    Adam; one epoch a call."""

    def __init__(self, split: Split, config: TrainConfig) -> None:
        torch.manual_seed(config.seed)
        self.model = VAE(config.model_config())
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.loader = DataLoader(SeedStyleMNIST(split), batch_size=config.batch_size, shuffle=True)
        self.beta = config.beta

    def epoch(self) -> float:
        started = time.perf_counter()
        self.model.train()
        for x, y in self.loader:
            loss = negative_elbo(self.model(x, y), self.beta).loss
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return time.perf_counter() - started


def cpu(epochs: int, images: int | None = None, threads: int = 1) -> dict[str, Any]:
    """The default preset on mnist-5k on CPU: the project's loop vs a seed-style loop, one
    warm-up epoch each, then `epochs` epochs of each in turn (side by side, so a burst of other
    work on a shared machine hits both). `threads` torch threads for both: with more threads
    than idle cores, OpenMP's barriers time the neighbours rather than the loops. `images`
    trims the split (the smoke test's tiny scale)."""
    config = TrainConfig.from_preset("default", progress=False)
    train = load_dataset(config.dataset).train
    if images is not None:
        train = Split(train.images[:images], train.labels[:images])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        project_loop = ProjectLoop(train, config, epochs + 1)
        seed_loop = SeedStyleLoop(train, config)
        project_loop.epoch()
        seed_loop.epoch()
        project, seed = [], []
        for _ in range(epochs):
            project.append(project_loop.epoch())
            seed.append(seed_loop.epoch())
    finally:
        torch.set_num_threads(before)
    project_s, seed_s = statistics.median(project), statistics.median(seed)
    return {
        "dataset": f"{config.dataset} train split ({len(train)} images)",
        "batch_size": config.batch_size,
        "torch_threads": threads,
        "epochs_measured": epochs,
        "project_epoch_s": project_s,
        "seed_style_epoch_s": seed_s,
        "speedup": seed_s / project_s,
        "project_epochs_s": project,
        "seed_style_epochs_s": seed,
    }


class _CompiledObjective:
    """VAEObjective's loss through torch.compile of the model, labels given one-hot so that no
    data-dependent check breaks the graph."""

    def __init__(self, model: VAE, beta: float) -> None:
        self.forward: Callable[..., Any] = torch.compile(model)
        self.beta = beta
        self.num_classes = model.config.num_classes

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, step: int) -> StepOutput:
        labels = None if self.num_classes is None else F.one_hot(y, self.num_classes).float()
        return StepOutput(loss=negative_elbo(self.forward(x, labels), self.beta).loss)


def tiled(split: Split, size: int, device: torch.device) -> Split:
    """`split` repeated to `size` images, on `device`."""
    rows = torch.arange(size) % len(split)
    return Split(split.images[rows], split.labels[rows]).to(device)


def gpu_epochs(
    split: Split, config: TrainConfig, amp: bool, compile_model: bool, epochs: int
) -> list[float]:
    torch.manual_seed(config.seed)
    model = VAE(config.model_config()).to(split.images.device)
    batches = Batches(split, config.batch_size, generator=torch.Generator().manual_seed(0))
    objective: Any = (
        _CompiledObjective(model, config.beta)
        if compile_model
        else VAEObjective(config.beta, 0.0, len(batches), config.free_bits)
    )
    trainer = Trainer(model, objective, batches, _settings(config, epochs + 1, amp=amp))
    trainer.fit()  # the epoch's last step reads the loss back, so the time includes the GPU's
    return [entry["seconds"] for entry in trainer.history[1:]]


def iwae_throughput(model: VAE, images: Tensor, amp: bool, batch_size: int) -> float:
    """Images per second of the label-marginalised IWAE bound with k = IWAE_K."""
    device = images.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        model.log_likelihood(images[:batch_size], k=IWAE_K)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for start in range(0, len(images), batch_size):
            model.log_likelihood(images[start : start + batch_size], k=IWAE_K)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return len(images) / (time.perf_counter() - started)


def gpu(
    epochs: int,
    device: torch.device | None = None,
    size: int = FULL_MNIST_TRAIN,
    batch_sizes: tuple[int, ...] = (128, 1024),
    variants: tuple[tuple[str, bool, bool], ...] = GPU_VARIANTS,
    iwae_images: int | None = None,
) -> dict[str, Any]:
    """Full-MNIST-sized epochs with the data resident on the GPU; not measured without CUDA.

    `device`, `size` and `iwae_images` exist so the code can be checked on a CPU at a small
    scale.
    """
    if device is None:
        if not torch.cuda.is_available():
            return {"measured": False, "reason": "not measured here (no GPU in this session)"}
        device = torch.device("cuda")
    base = TrainConfig.from_preset("default", progress=False)
    data = load_dataset(base.dataset)
    train = tiled(data.train, size, device)
    rows: list[dict[str, Any]] = []
    for batch_size in batch_sizes:
        config = TrainConfig.from_preset("default", progress=False, batch_size=batch_size)
        for label, amp, compile_model in variants:
            seconds = gpu_epochs(train, config, amp, compile_model, epochs)
            rows.append(
                {
                    "variant": label,
                    "batch_size": batch_size,
                    "amp_bf16": amp,
                    "compiled": compile_model,
                    "epoch_s": statistics.median(seconds),
                    "images_s": size / statistics.median(seconds),
                    "epochs_s": seconds,
                }
            )
    model = VAE(base.model_config()).to(device).eval()
    test = to_float(data.test.images[:iwae_images].to(device))
    iwae = {
        f"{'bf16' if amp else 'fp32'}": iwae_throughput(
            model, test, amp, batch_size=min(500, len(test))
        )
        for amp in (False, True)
    }
    return {
        "measured": True,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "data": f"mnist-5k train split ({len(data.train)} images) tiled to {size} images, "
        "resident on the device (full MNIST, 60,000 training images, cannot be downloaded here)",
        "epochs_measured": epochs,
        "epochs": rows,
        "iwae_k": IWAE_K,
        "iwae_images_s": iwae,
    }
