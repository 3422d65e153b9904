"""How good a conditional VAE's prior samples are: digit accuracy and a Frechet distance.

Both numbers are read through a classifier's eyes. N samples per digit are drawn from the prior
at temperature 1 with a fixed seed; a classifier names their digits (accuracy per class and
mean), and the Frechet distance compares the Gaussian fitted to the classifier's penultimate
features of the samples with the one fitted to those of the real test digits (lower = closer;
the FID recipe, Heusel et al. 2017, with a small MNIST classifier in place of Inception).

The adversarial run's own classifier C was trained alongside the generator it judges, so its
verdicts are not independent. The headline numbers therefore come from a reference classifier
of the same architecture trained on the real training digits only, once per output folder
(cached in train_state/reference_classifier.safetensors), and used for both VAEs compared.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from models import VAE
from models.adversarial import Classifier, CriticConfig
from training.data import NUM_CLASSES, Batches, MNISTData, Split, to_float

logger = logging.getLogger(__name__)

REFERENCE_FILE = "reference_classifier.safetensors"
# Ten epochs of Adam with cosine decay and random shifts of up to 2 pixels: ~96% test accuracy
# on mnist-5k (95% without the shifts) in ~10 s on one CPU core. The point is an independent
# judge, not the best classifier.
REFERENCE_EPOCHS = 10
REFERENCE_BATCH_SIZE = 64
REFERENCE_LR = 2e-3
REFERENCE_MAX_SHIFT = 2
_BATCH = 500  # images per forward pass when sampling and classifying


@torch.no_grad()
def samples_per_class(
    model: VAE, per_class: int, seed: int, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """per_class prior samples of each digit, one seeded generator for all: images
    (C * per_class, 1, 28, 28) in [0, 1] and their digits (C * per_class,)."""
    classes = model.config.num_classes
    if classes is None:
        raise ValueError("sample quality per digit needs a conditional VAE")
    model.eval()
    generator = torch.Generator(model.device).manual_seed(seed)
    labels = torch.arange(classes, device=model.device).repeat_interleave(per_class)
    images = [
        model.sample(len(chunk), chunk, temperature, generator).images.float()
        for chunk in labels.split(_BATCH)
    ]
    return torch.cat(images), labels


@torch.no_grad()
def classify(classifier: Classifier, images: Tensor) -> tuple[Tensor, Tensor]:
    """Predicted digits (N,) and penultimate features (N, F) of images (N, 1, 28, 28)."""
    classifier.eval()
    outputs = [classifier(batch) for batch in images.split(_BATCH)]
    digits = torch.cat([o.logits.argmax(1) for o in outputs])
    return digits, torch.cat([o.features for o in outputs])


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature rows a (N, F) and b (M, F):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64. The symmetric
    form needs only eigh of symmetric matrices, so no scipy and no complex parts."""
    a, b = a.double(), b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov_a)
    root_a = eigenvectors @ torch.diag(eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return float(distance.clamp_min(0))


def first_per_class(labels: Tensor, per_class: int) -> Tensor:
    """Row numbers of the first per_class examples of each digit (fewer where there are fewer)."""
    return torch.cat([(labels == digit).nonzero()[:per_class, 0] for digit in range(NUM_CLASSES)])


def per_class_accuracy(predicted: Tensor, labels: Tensor, classes: int) -> list[float]:
    hits = (predicted == labels).double()
    return [float(hits[labels == digit].mean()) for digit in range(classes)]


def quality(
    classifier: Classifier, images: Tensor, labels: Tensor, real_features: Tensor
) -> dict[str, Any]:
    """Accuracy (mean and per digit) of classifier on labelled images, and their Frechet
    distance to the real images whose features are given."""
    predicted, features = classify(classifier, images)
    per_class = per_class_accuracy(predicted, labels, classifier.config.num_classes)
    return {
        "accuracy": sum(per_class) / len(per_class),
        "per_class_accuracy": per_class,
        "frechet_distance": frechet_distance(features, real_features),
    }


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Each image of x (B, 1, H, W) moved by whole pixels, up to max_shift along each axis;
    the uncovered border is background (0)."""
    offsets = torch.randint(-max_shift, max_shift + 1, (len(x), 2), generator=generator)
    theta = torch.zeros(len(x), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    # With align_corners=False one pixel is 2 / size in grid coordinates, so an integer offset
    # is an exact shift and the bilinear sampling copies pixels unchanged.
    theta[:, 0, 2] = offsets[:, 0] * 2.0 / x.shape[-1]
    theta[:, 1, 2] = offsets[:, 1] * 2.0 / x.shape[-2]
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def train_classifier(train: Split, seed: int, device: torch.device) -> Classifier:
    """A Classifier trained on real digits alone: REFERENCE_EPOCHS of Adam, seeded, without
    touching the caller's random state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        torch.manual_seed(seed)
        classifier = Classifier(CriticConfig(num_classes=NUM_CLASSES)).to(device)
        optimizer = torch.optim.Adam(classifier.parameters(), lr=REFERENCE_LR)
        generator = torch.Generator().manual_seed(seed)
        batches = Batches(train, REFERENCE_BATCH_SIZE, generator=generator)
        total_steps = REFERENCE_EPOCHS * len(batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps))
        )
        classifier.train()
        for _ in range(REFERENCE_EPOCHS):
            for x, y in batches:
                x = random_shift(x, REFERENCE_MAX_SHIFT, generator)
                loss = F.cross_entropy(classifier(x).logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    return classifier.eval()


def reference_classifier(
    cache_dir: Path, data: MNISTData, seed: int, device: torch.device
) -> tuple[Classifier, dict[str, Any]]:
    """The reference classifier of this dataset and seed: loaded from cache_dir when trained
    there before with the same recipe, else trained and cached. Returns it with its record
    (recipe and test accuracy)."""
    recipe = {
        "dataset": data.name,
        "split": data.split_info["sizes"],
        "seed": seed,
        "epochs": REFERENCE_EPOCHS,
        "batch_size": REFERENCE_BATCH_SIZE,
        "lr": REFERENCE_LR,
        "max_shift": REFERENCE_MAX_SHIFT,
        "critic_config": CriticConfig(num_classes=NUM_CLASSES).to_dict(),
    }
    path = cache_dir / REFERENCE_FILE
    classifier = _load_cached(path, recipe, device)
    if classifier is None:
        logger.info("training the reference classifier on the real training digits")
        classifier = train_classifier(data.train, seed, device)
        _save(classifier, path, recipe)
    predicted, _ = classify(classifier, to_float(data.test.images))
    test_accuracy = float((predicted == data.test.labels).double().mean())
    return classifier, {**recipe, "trained_on": "train split", "test_accuracy": test_accuracy}


def _load_cached(path: Path, recipe: dict[str, Any], device: torch.device) -> Classifier | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        if json.loads(metadata.get("recipe", "null")) != json.loads(json.dumps(recipe)):
            return None
        classifier = Classifier(CriticConfig.from_dict(recipe["critic_config"]))
        classifier.load_state_dict(state)
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        logger.warning("retraining the reference classifier: cannot use %s (%s)", path, exc)
        return None
    return classifier.to(device).eval()


def _save(classifier: Classifier, path: Path, recipe: dict[str, Any]) -> None:
    """Write via a temporary file and a rename, so a crash never leaves half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in classifier.state_dict().items()}
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file(state, temporary, metadata={"recipe": json.dumps(recipe)})
        # mkstemp makes the file private; it belongs with the checkpoint, which others read.
        umask = os.umask(0)
        os.umask(umask)
        Path(temporary).chmod(0o644 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@torch.no_grad()
def compare_sample_quality(
    adversarial: VAE,
    plain: VAE,
    adversary_classifier: Classifier,
    data: MNISTData,
    per_class: int,
    seed: int,
    cache_dir: Path,
) -> dict[str, Any]:
    """Sample quality of the adversarial VAE and the plain one, judged by the adversarial run's
    own classifier C and by the independent reference classifier; the metrics.json section."""
    device = adversarial.device
    reference, reference_record = reference_classifier(cache_dir, data, seed, device)
    test_images = to_float(data.test.images)
    train_images = to_float(data.train.images[first_per_class(data.train.labels, per_class)])
    judges = {"reference_classifier": reference, "adversary_classifier": adversary_classifier}
    real_features = {name: classify(judge, test_images)[1] for name, judge in judges.items()}
    report: dict[str, Any] = {
        "samples_per_class": per_class,
        "temperature": 1.0,
        "seed": seed,
        "compared_with": "test split",
        "reference_classifier": reference_record,
        # The floor: real training digits, as many of each as there are samples, against the
        # test digits (the estimate is biased upwards for small samples, so compare like sizes).
        "train_split_frechet_distance": {
            name: frechet_distance(classify(judge, train_images)[1], real_features[name])
            for name, judge in judges.items()
        },
    }
    for name, model in (("adversarial", adversarial), ("plain", plain)):
        images, labels = samples_per_class(model, per_class, seed)
        report[name] = {
            judge_name: quality(judge, images, labels, real_features[judge_name])
            for judge_name, judge in judges.items()
        }
    ours, theirs = (
        report["adversarial"]["reference_classifier"],
        report["plain"]["reference_classifier"],
    )
    report["adversarial_beats_plain"] = {
        "accuracy": ours["accuracy"] > theirs["accuracy"],
        "frechet_distance": ours["frechet_distance"] < theirs["frechet_distance"],
    }
    return report
