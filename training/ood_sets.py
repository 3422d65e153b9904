"""Held-out anomaly test sets: near-distribution inputs that are not digits, and far ones.

Every set is generated deterministically from a seed and a split of real digits, in MNIST's own
format (white ink on black, the glyph scaled into a 20 x 20 box and centred by its centre of
mass in 28 x 28, as LeCun et al. prepared MNIST). They are tests, never training data: the
anomaly score is fitted on real digits alone.

Two disjoint versions exist, so that choosing the score cannot tune it on what it is judged by:
- "dev": built from the validation split, fonts DEV_FONTS and seeds of their own; what the
  score's statistics were chosen on.
- "test": built from the test split, the other fonts, other seeds; what the README reports.

Near-distribution sets (close to digits in pixels, but no digit):
- glyphs-font: letters and symbols that do not read as a digit, typeset in several fonts.
- glyphs-strokes: the same kind of letters drawn as jittered pen strokes, as a hand would.
- scribbles: tangled pen scribbles (a smooth random walk with many turns).
- rotated-mirrored: digits turned 180 degrees (2, 3, 4, 5, 7 only: 0, 1, 6, 8, 9 read as
  digits that way), mirrored (2, 3, 4, 5, 6, 7, 9) or turned 90 degrees (2, 3, 4, 5, 6, 7, 9).
- two-digits: two digits side by side in one frame.
- partial-digits: digits cut by a random line through their centre of mass, the other side
  erased and the rest left where it was (1s left out: half a 1 is still a 1).

Far sets: blank, constant grey, uniform noise, sparse noise, natural-photo patches, inverted
digits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

Part = Literal["dev", "test"]
PARTS: tuple[Part, ...] = ("dev", "test")
NEAR_SETS = (
    "glyphs-font",
    "glyphs-strokes",
    "scribbles",
    "rotated-mirrored",
    "two-digits",
    "partial-digits",
)
FAR_SETS = ("blank", "constant", "uniform-noise", "sparse-noise", "photo-patches", "inverted")

# Characters that do not read as a digit in any common hand or font. Left out on purpose:
# O o Q D C c (0), I l i j L | ! 7-like T J (1, 7), Z z ? (2), S s $ (5), b G (6), B & (8),
# g q a (9), y u (4 in some hands).
GLYPHS = "AEFHKMNPRUVWXYefhkmnprtvwx#@%+=*"
# Two disjoint families of matplotlib's bundled fonts, so dev and test share no typeface.
DEV_FONTS = (
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSansMono.ttf",
    "STIXGeneralItalic.ttf",
)
TEST_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono-Bold.ttf",
    "STIXGeneral.ttf",
    "DejaVuSans-Oblique.ttf",
)
# Pen skeletons of letters in a unit box (x right, y down): lists of strokes, each a polyline.
STROKE_LETTERS: dict[str, list[list[tuple[float, float]]]] = {
    "A": [[(0.0, 1.0), (0.5, 0.0), (1.0, 1.0)], [(0.22, 0.6), (0.78, 0.6)]],
    "E": [[(0.9, 0.0), (0.1, 0.0), (0.1, 1.0), (0.9, 1.0)], [(0.1, 0.5), (0.7, 0.5)]],
    "F": [[(0.9, 0.0), (0.1, 0.0), (0.1, 1.0)], [(0.1, 0.5), (0.7, 0.5)]],
    "H": [[(0.1, 0.0), (0.1, 1.0)], [(0.9, 0.0), (0.9, 1.0)], [(0.1, 0.5), (0.9, 0.5)]],
    "K": [[(0.15, 0.0), (0.15, 1.0)], [(0.85, 0.0), (0.15, 0.55)], [(0.35, 0.4), (0.9, 1.0)]],
    "M": [[(0.0, 1.0), (0.1, 0.0), (0.5, 0.6), (0.9, 0.0), (1.0, 1.0)]],
    "N": [[(0.1, 1.0), (0.1, 0.0), (0.9, 1.0), (0.9, 0.0)]],
    "P": [
        [(0.15, 1.0), (0.15, 0.0), (0.7, 0.0), (0.85, 0.15), (0.85, 0.35), (0.7, 0.5), (0.15, 0.5)]
    ],
    "R": [
        [(0.15, 1.0), (0.15, 0.0), (0.7, 0.0), (0.85, 0.15), (0.85, 0.35), (0.7, 0.5), (0.15, 0.5)],
        [(0.45, 0.5), (0.9, 1.0)],
    ],
    "V": [[(0.0, 0.0), (0.5, 1.0), (1.0, 0.0)]],
    "W": [[(0.0, 0.0), (0.25, 1.0), (0.5, 0.35), (0.75, 1.0), (1.0, 0.0)]],
    "X": [[(0.0, 0.0), (1.0, 1.0)], [(1.0, 0.0), (0.0, 1.0)]],
    "Y": [[(0.0, 0.0), (0.5, 0.5), (1.0, 0.0)], [(0.5, 0.5), (0.5, 1.0)]],
    "k": [[(0.2, 0.0), (0.2, 1.0)], [(0.8, 0.4), (0.2, 0.75)], [(0.4, 0.65), (0.85, 1.0)]],
    "h": [[(0.2, 0.0), (0.2, 1.0)], [(0.2, 0.6), (0.5, 0.42), (0.8, 0.55), (0.8, 1.0)]],
    "#": [
        [(0.35, 0.0), (0.25, 1.0)],
        [(0.75, 0.0), (0.65, 1.0)],
        [(0.0, 0.33), (1.0, 0.33)],
        [(0.0, 0.67), (1.0, 0.67)],
    ],
    "+": [[(0.5, 0.0), (0.5, 1.0)], [(0.0, 0.5), (1.0, 0.5)]],
    "*": [[(0.5, 0.0), (0.5, 1.0)], [(0.07, 0.25), (0.93, 0.75)], [(0.93, 0.25), (0.07, 0.75)]],
}
_SEEDS = {"dev": 1_000, "test": 2_000}  # base seeds of the two parts; each set adds its own
_RENDER = 112  # pen drawings are rendered at 4x and scaled down, for anti-aliased strokes
_MIRRORED = (2, 3, 4, 5, 6, 7, 9)
_TURNED_180 = (2, 3, 4, 5, 7)


@dataclass(frozen=True)
class OODSet:
    """One anomaly test set: images (N, 1, 28, 28) uint8, white ink on black."""

    name: str
    kind: Literal["near", "far"]
    images: Tensor
    description: str


def mnist_format(ink: np.ndarray) -> np.ndarray:
    """Any white-on-black drawing (H, W) float in [0, 1] -> (28, 28) float in [0, 1] the way
    MNIST was made: crop to the ink, scale the longer side to 20 pixels keeping the aspect
    ratio, and place it so its centre of mass is the centre of the 28 x 28 frame."""
    rows, cols = np.nonzero(ink > 0.02)
    if len(rows) == 0:
        return np.zeros((28, 28), dtype=np.float32)
    crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = crop.shape
    scale = 20.0 / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = Image.fromarray((crop * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
    glyph = np.asarray(small, dtype=np.float32) / 255.0
    frame = np.zeros((28, 28), dtype=np.float32)
    total = glyph.sum()
    gy, gx = np.indices(glyph.shape)
    cy = (gy * glyph).sum() / total if total > 0 else glyph.shape[0] / 2
    cx = (gx * glyph).sum() / total if total > 0 else glyph.shape[1] / 2
    top = round(float(14 - cy))
    left = round(float(14 - cx))
    top = min(max(top, 0), 28 - glyph.shape[0])
    left = min(max(left, 0), 28 - glyph.shape[1])
    frame[top : top + glyph.shape[0], left : left + glyph.shape[1]] = glyph
    return frame


def _to_uint8(frames: list[np.ndarray]) -> Tensor:
    stacked = np.clip(np.stack(frames), 0.0, 1.0)
    return torch.from_numpy(np.round(stacked * 255).astype(np.uint8))[:, None]


def font_dir() -> Path:
    """matplotlib's bundled TrueType fonts (DejaVu, STIX): on every machine with the project."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def glyphs_font(fonts: tuple[str, ...], n: int, rng: np.random.Generator) -> Tensor:
    """n non-digit characters, each in a random font of `fonts`, slightly rotated."""
    loaded = [ImageFont.truetype(str(font_dir() / name), size=64) for name in fonts]
    frames = []
    for _ in range(n):
        char = GLYPHS[rng.integers(len(GLYPHS))]
        font = loaded[rng.integers(len(loaded))]
        canvas = Image.new("L", (_RENDER, _RENDER), 0)
        ImageDraw.Draw(canvas).text(
            (_RENDER / 2, _RENDER / 2), char, fill=255, font=font, anchor="mm"
        )
        canvas = canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR)
        frames.append(mnist_format(np.asarray(canvas, dtype=np.float32) / 255.0))
    return _to_uint8(frames)


def _draw_strokes(
    strokes: list[list[tuple[float, float]]], width: float, rng: np.random.Generator
) -> np.ndarray:
    """Polylines in a unit box -> a white-on-black drawing, slanted and jittered like a hand."""
    canvas = Image.new("L", (_RENDER, _RENDER), 0)
    draw = ImageDraw.Draw(canvas)
    slant = rng.uniform(-0.3, 0.3)
    aspect = rng.uniform(0.7, 1.2)
    margin = _RENDER * 0.2
    span = _RENDER - 2 * margin
    for stroke in strokes:
        points = []
        for x, y in stroke:
            jx, jy = rng.normal(0.0, 0.04, size=2)
            px = (x + jx - 0.5) * aspect + 0.5 + slant * (0.5 - y)
            points.append((margin + px * span, margin + (y + jy) * span))
        draw.line(points, fill=255, width=round(width), joint="curve")
    return np.asarray(canvas, dtype=np.float32) / 255.0


def glyphs_strokes(n: int, rng: np.random.Generator) -> Tensor:
    """n letters and symbols of STROKE_LETTERS drawn with a jittered pen of random width."""
    names = sorted(STROKE_LETTERS)
    frames = []
    for _ in range(n):
        strokes = STROKE_LETTERS[names[rng.integers(len(names))]]
        frames.append(mnist_format(_draw_strokes(strokes, rng.uniform(7, 13), rng)))
    return _to_uint8(frames)


def scribbles(n: int, rng: np.random.Generator) -> Tensor:
    """n pen scribbles: a random walk whose heading turns smoothly, 25-44 segments long."""
    frames = []
    for _ in range(n):
        steps = int(rng.integers(25, 45))
        heading = rng.uniform(0, 2 * math.pi)
        turn = 0.0
        x, y = 0.5, 0.5
        points = [(x, y)]
        for _ in range(steps):
            turn = 0.6 * turn + rng.normal(0.0, 0.9)
            heading += turn
            x = min(max(x + 0.12 * math.cos(heading), 0.0), 1.0)
            y = min(max(y + 0.12 * math.sin(heading), 0.0), 1.0)
            points.append((x, y))
        # Stretched to fill the unit box, so the pen width is relative to the whole scribble.
        xs, ys = np.array(points).T
        side = max(float(np.ptp(xs)), float(np.ptp(ys)), 1e-6)
        box = [((px - xs.min()) / side, (py - ys.min()) / side) for px, py in points]
        frames.append(mnist_format(_draw_strokes([box], rng.uniform(5, 9), rng)))
    return _to_uint8(frames)


def _pick(labels: Tensor, allowed: tuple[int, ...], n: int, rng: np.random.Generator) -> list[int]:
    rows = [i for i, label in enumerate(labels.tolist()) if label in allowed]
    return [rows[i] for i in rng.integers(len(rows), size=n)]


def rotated_mirrored(images: Tensor, labels: Tensor, n: int, rng: np.random.Generator) -> Tensor:
    """n digits turned or mirrored into shapes that are no digit (see the module docstring)."""
    out = []
    kinds = rng.integers(3, size=n)
    picks = {
        0: iter(_pick(labels, _TURNED_180, n, rng)),
        1: iter(_pick(labels, _MIRRORED, n, rng)),
        2: iter(_pick(labels, _MIRRORED, n, rng)),
    }
    for kind in kinds.tolist():
        image = images[next(picks[kind]), 0]
        if kind == 0:
            image = torch.rot90(image, 2)
        elif kind == 1:
            image = torch.flip(image, dims=(1,))
        else:
            image = torch.rot90(image, 1 if rng.integers(2) else 3)
        out.append(image)
    return torch.stack(out)[:, None].contiguous()


def two_digits(images: Tensor, n: int, rng: np.random.Generator) -> Tensor:
    """n frames holding two real digits side by side, overlapping a little, scaled as one."""
    frames = []
    for _ in range(n):
        a, b = (
            images[int(i), 0].float().numpy() / 255.0 for i in rng.integers(len(images), size=2)
        )
        overlap = int(rng.integers(2, 7))
        canvas = np.zeros((28, 56 - overlap), dtype=np.float32)
        canvas[:, :28] = a
        canvas[:, 28 - overlap :] = np.maximum(canvas[:, 28 - overlap :], b)
        frames.append(mnist_format(canvas))
    return _to_uint8(frames)


def partial_digits(images: Tensor, labels: Tensor, n: int, rng: np.random.Generator) -> Tensor:
    """n digits (not 1) cut by a random line through their centre of mass, one side erased."""
    ys, xs = np.indices((28, 28))
    out = []
    for row in _pick(labels, (0, 2, 3, 4, 5, 6, 7, 8, 9), n, rng):
        image = images[row, 0].float().numpy() / 255.0
        total = image.sum()
        cy, cx = (ys * image).sum() / total, (xs * image).sum() / total
        angle = rng.uniform(0, 2 * math.pi)
        keep = (xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle) >= 0
        out.append(image * keep)
    return _to_uint8(out)


def photo_patches(n: int, rng: np.random.Generator) -> Tensor:
    """n grey 28 x 28 patches of scikit-learn's two sample photographs, at random scales."""
    from sklearn.datasets import load_sample_image

    photos = [
        np.asarray(Image.fromarray(load_sample_image(name)).convert("L"), dtype=np.float32) / 255.0
        for name in ("china.jpg", "flower.jpg")
    ]
    frames = []
    for _ in range(n):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(28, 160))
        top = int(rng.integers(photo.shape[0] - side))
        left = int(rng.integers(photo.shape[1] - side))
        patch = Image.fromarray(
            (photo[top : top + side, left : left + side] * 255).astype(np.uint8)
        )
        frames.append(np.asarray(patch.resize((28, 28), Image.Resampling.BILINEAR)) / 255.0)
    return _to_uint8(frames)


def far_sets(images: Tensor, n: int, rng: np.random.Generator) -> list[OODSet]:
    """The far-from-digits sets; `images` are real digits (N, 1, 28, 28) uint8 to invert."""
    grey = torch.from_numpy(rng.integers(0, 256, size=n)).to(torch.uint8)
    sparse = rng.random((n, 1, 28, 28)) < rng.uniform(0.02, 0.2, size=(n, 1, 1, 1))
    picked = images[torch.from_numpy(rng.integers(len(images), size=n))]
    return [
        OODSet("blank", "far", torch.zeros(n, 1, 28, 28, dtype=torch.uint8), "all black"),
        OODSet(
            "constant", "far", grey[:, None, None, None].expand(n, 1, 28, 28).clone(), "one grey"
        ),
        OODSet(
            "uniform-noise",
            "far",
            torch.from_numpy(rng.integers(0, 256, size=(n, 1, 28, 28))).to(torch.uint8),
            "independent uniform pixels",
        ),
        OODSet(
            "sparse-noise",
            "far",
            torch.from_numpy(sparse.astype(np.uint8) * 255),
            "2-20% of pixels white",
        ),
        OODSet("photo-patches", "far", photo_patches(n, rng), "grey natural-photo patches"),
        OODSet("inverted", "far", 255 - picked, "real digits, black on white"),
    ]


def ood_sets(images: Tensor, labels: Tensor, part: Part, n: int = 500) -> list[OODSet]:
    """Every anomaly test set of one part, n images each, from the real digits given (the
    validation split for "dev", the test split for "test"); the same inputs give the same
    sets on every machine."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    base = _SEEDS[part]
    fonts = DEV_FONTS if part == "dev" else TEST_FONTS
    images, labels = images.cpu(), labels.cpu()

    def rng(offset: int) -> np.random.Generator:
        return np.random.default_rng(base + offset)

    near = [
        OODSet(
            "glyphs-font", "near", glyphs_font(fonts, n, rng(1)), "letters and symbols, typeset"
        ),
        OODSet("glyphs-strokes", "near", glyphs_strokes(n, rng(2)), "letters drawn as strokes"),
        OODSet("scribbles", "near", scribbles(n, rng(3)), "tangled pen scribbles"),
        OODSet(
            "rotated-mirrored",
            "near",
            rotated_mirrored(images, labels, n, rng(4)),
            "digits turned or mirrored into no digit",
        ),
        OODSet("two-digits", "near", two_digits(images, n, rng(5)), "two digits in one frame"),
        OODSet(
            "partial-digits",
            "near",
            partial_digits(images, labels, n, rng(6)),
            "digits with one side erased",
        ),
    ]
    return near + far_sets(images, n, rng(7))
