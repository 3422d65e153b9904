"""The held-out anomaly sets: deterministic, in MNIST's format, dev and test kept apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data import load_dataset
from training.ood_sets import (
    DEV_FONTS,
    FAR_SETS,
    NEAR_SETS,
    TEST_FONTS,
    font_dir,
    mnist_format,
    ood_sets,
)


@pytest.fixture(scope="module")
def splits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_dataset("mnist-5k")
    return data.val.images, data.val.labels, data.test.images, data.test.labels


def test_sets_are_the_same_on_every_call(splits: tuple[torch.Tensor, ...]) -> None:
    _, _, images, labels = splits
    first = ood_sets(images, labels, "test", n=40)
    second = ood_sets(images, labels, "test", n=40)
    assert [s.name for s in first] == [*NEAR_SETS, *FAR_SETS]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.images, b.images), a.name


def test_every_set_is_mnist_shaped_uint8_and_not_empty(splits: tuple[torch.Tensor, ...]) -> None:
    _, _, images, labels = splits
    for ood in ood_sets(images, labels, "test", n=30):
        assert ood.images.dtype == torch.uint8 and ood.images.shape == (30, 1, 28, 28)
        if ood.name != "blank":
            assert int(ood.images.flatten(1).amax(1).min()) > 0, ood.name
        # Images within a set differ (the generator moves on): no set is one image repeated.
        assert len({bytes(image.numpy()) for image in ood.images}) > 1 or ood.name == "blank"


def test_near_sets_are_centred_like_mnist(splits: tuple[torch.Tensor, ...]) -> None:
    """Glyphs, strokes, scribbles and two-digit frames are scaled into 20 x 20 and centred by
    mass, as MNIST's digits are (partial digits keep their place on purpose)."""
    _, _, images, labels = splits
    ys, xs = np.indices((28, 28))
    for ood in ood_sets(images, labels, "test", n=30):
        if ood.name not in ("glyphs-font", "glyphs-strokes", "scribbles", "two-digits"):
            continue
        ink = ood.images[:, 0].double().numpy()
        total = ink.sum((1, 2))
        cy, cx = (ink * ys).sum((1, 2)) / total, (ink * xs).sum((1, 2)) / total
        assert np.abs(cy - 14).max() < 1.6 and np.abs(cx - 14).max() < 1.6, ood.name
        rows = (ink > 0).any(2)
        heights = rows.shape[1] - rows[:, ::-1].argmax(1) - rows.argmax(1)
        assert heights.max() <= 22, ood.name


def test_dev_and_test_share_no_font_and_no_image(splits: tuple[torch.Tensor, ...]) -> None:
    val_images, val_labels, test_images, test_labels = splits
    assert not set(DEV_FONTS) & set(TEST_FONTS)
    for name in DEV_FONTS + TEST_FONTS:
        assert (font_dir() / name).is_file(), name
    dev = {s.name: s.images for s in ood_sets(val_images, val_labels, "dev", n=50)}
    test = {s.name: s.images for s in ood_sets(test_images, test_labels, "test", n=50)}
    for name in NEAR_SETS:
        shared = {bytes(i.numpy()) for i in dev[name]} & {bytes(i.numpy()) for i in test[name]}
        assert not shared, name


def test_turned_digits_are_only_those_that_read_as_no_digit(
    splits: tuple[torch.Tensor, ...],
) -> None:
    """Each rotated-mirrored image is one of the allowed transforms of a real test digit."""
    _, _, images, labels = splits
    (turned,) = [s for s in ood_sets(images, labels, "test", n=60) if s.name == "rotated-mirrored"]
    allowed = set()
    for image, label in zip(images, labels.tolist(), strict=True):
        if label in (2, 3, 4, 5, 7):
            allowed.add(bytes(torch.rot90(image[0], 2).contiguous().numpy()))
        if label in (2, 3, 4, 5, 6, 7, 9):
            allowed.add(bytes(torch.flip(image[0], (1,)).contiguous().numpy()))
            for k in (1, 3):
                allowed.add(bytes(torch.rot90(image[0], k).contiguous().numpy()))
    assert all(bytes(image[0].numpy()) in allowed for image in turned.images)


def test_mnist_format_centres_the_mass_and_fits_20_pixels() -> None:
    drawing = np.zeros((100, 60), dtype=np.float32)
    drawing[10:90, 20:30] = 1.0  # a tall bar, off-centre
    frame = mnist_format(drawing)
    rows, _ = np.nonzero(frame > 0.05)
    assert rows.max() - rows.min() + 1 == 20
    ys, xs = np.indices(frame.shape)
    assert (
        abs((frame * ys).sum() / frame.sum() - 14) < 1
        and abs((frame * xs).sum() / frame.sum() - 14) < 1
    )
    assert mnist_format(np.zeros((5, 5), dtype=np.float32)).sum() == 0


def test_a_bad_part_or_count_is_refused(splits: tuple[torch.Tensor, ...]) -> None:
    _, _, images, labels = splits
    with pytest.raises(ValueError, match="part must be"):
        ood_sets(images, labels, "train", n=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be positive"):
        ood_sets(images, labels, "test", n=0)
