"""Fuzzing the image-decoding path, and decompression bombs in every container we accept.

Hypothesis mutates real PNG, JPEG, GIF, TIFF, BMP and WebP files (bit flips, byte changes,
truncations, spliced slices, size fields in the header set huge); every result must be
decoded or refused with our own 413/415 within a time bound, through `decode_image` and
through a real endpoint. The runs are derandomized, so CI tries the same inputs every time.
"""

from __future__ import annotations

import contextlib
import io
import struct
import threading
import time
import zlib
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import pytest
import torch
from app_testing import files, png_chunk
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from app.errors import PayloadTooLarge, UnsupportedImage
from app.service.imaging import decode_image

T = TypeVar("T")
MAX_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 4096 * 4096  # the service's default
# Generous for a shared 2-core CI machine: a decode takes milliseconds; a hang never ends.
TIME_BOUND_S = 10.0
HUGE_SIDES = (0, 1, 4097, 65535, 2**31 - 1, 2**32 - 1)
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,  # timed by `within`, which also survives a hang
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def digit_image(mode: str = "L", size: int = 28) -> Image.Image:
    """A white 7 on black, in `mode`: real structure for the codecs to compress."""
    image = Image.new("L", (size, size))
    draw = ImageDraw.Draw(image)
    scale = size / 28
    draw.line([(6 * scale, 6 * scale), (22 * scale, 6 * scale)], fill=255, width=int(3 * scale))
    draw.line([(22 * scale, 6 * scale), (11 * scale, 23 * scale)], fill=255, width=int(3 * scale))
    return image.convert(mode)


def digit_image_16bit() -> Image.Image:
    """The digit at 16-bit depth, full range (a plain convert would keep it at 0..255)."""
    return Image.fromarray(np.asarray(digit_image(), dtype=np.uint16) * 257)


def save(image: Image.Image | list[Image.Image], fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    if isinstance(image, list):
        image[0].save(buffer, format=fmt, save_all=True, append_images=image[1:], **params)
    else:
        image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


SEEDS: dict[str, bytes] = {
    "png-gray": save(digit_image(), "PNG"),
    "png-rgba-interlaced": save(digit_image("RGBA"), "PNG", interlace=1),
    "png-16bit": save(digit_image_16bit(), "PNG"),
    "png-palette": save(digit_image("P"), "PNG", transparency=0),
    "jpeg-gray": save(digit_image(), "JPEG", quality=90),
    "jpeg-rgb-progressive": save(digit_image("RGB", 64), "JPEG", progressive=True),
    "gif": save(digit_image("P"), "GIF"),
    "gif-animated": save([digit_image("P"), digit_image("P").rotate(90)], "GIF", loop=0),
    "tiff-raw": save(digit_image(), "TIFF"),
    "tiff-lzw": save(digit_image("RGB"), "TIFF", compression="tiff_lzw"),
    "tiff-packbits": save(digit_image(), "TIFF", compression="packbits"),
    "tiff-deflate-16bit": save(digit_image_16bit(), "TIFF", compression="tiff_adobe_deflate"),
    "bmp": save(digit_image(), "BMP"),
    "webp": save(digit_image(), "WEBP", lossless=True),
}


def png_with_size(data: bytes, width: int, height: int) -> bytes:
    """`data` (a PNG) with IHDR's width and height replaced, and its CRC made right again."""
    assert data[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + data[24:29]
    return data[:8] + png_chunk(b"IHDR", ihdr) + data[33:]


def gif_with_size(data: bytes, width: int, height: int) -> bytes:
    """`data` (a GIF) with the logical screen and the first image descriptor resized."""
    out = bytearray(data)
    width, height = width & 0xFFFF, height & 0xFFFF  # GIF sizes are 16-bit
    out[6:10] = struct.pack("<HH", width, height)
    descriptor = out.find(b"\x2c", 13)
    if descriptor > 0:
        out[descriptor + 5 : descriptor + 9] = struct.pack("<HH", width, height)
    return bytes(out)


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """`data` (a JPEG) with the frame header's (SOF0/SOF2) sizes replaced."""
    out = bytearray(data)
    width, height = width & 0xFFFF, height & 0xFFFF
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        start = out.find(marker)
        if start > 0:
            out[start + 5 : start + 9] = struct.pack(">HH", height, width)
    return bytes(out)


def tiff_with_size(data: bytes, width: int, height: int) -> bytes:
    """`data` (a little-endian TIFF) with ImageWidth and ImageLength in the first IFD replaced."""
    assert data[:4] == b"II*\x00"
    out = bytearray(data)
    (ifd,) = struct.unpack_from("<I", out, 4)
    (count,) = struct.unpack_from("<H", out, ifd)
    for index in range(count):
        entry = ifd + 2 + 12 * index
        tag, _ = struct.unpack_from("<HH", out, entry)
        if tag in (256, 257):
            value = width if tag == 256 else height
            # Rewritten as a LONG, whatever type it had, so that any 32-bit size fits.
            struct.pack_into("<HHII", out, entry, tag, 4, 1, value & 0xFFFFFFFF)
    return bytes(out)


RESIZERS: dict[str, Callable[[bytes, int, int], bytes]] = {
    "png": png_with_size,
    "gif": gif_with_size,
    "jpeg": jpeg_with_size,
    "tiff": tiff_with_size,
}


@st.composite
def mutated_images(draw: st.DrawFn) -> tuple[str, bytes]:
    """A seed file with one to four mutations applied."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "byte", "truncate", "splice", "huge"]))
        position = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[position] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF]))
        elif kind == "truncate":
            del data[position:]
        elif kind == "splice":
            # A slice of any seed (the same file's chunks or another format's) pasted in.
            donor = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
            start = draw(st.integers(0, len(donor) - 1))
            piece = donor[start : start + draw(st.integers(1, 256))]
            if draw(st.booleans()):
                data[position:position] = piece
            else:
                data[position : position + len(piece)] = piece
        else:
            resize = RESIZERS.get(name.split("-")[0])
            if resize is not None:
                width, height = (draw(st.sampled_from(HUGE_SIDES)) for _ in range(2))
                # An earlier mutation may have broken the header this needs.
                with contextlib.suppress(AssertionError, struct.error):
                    data = bytearray(resize(bytes(data), width, height))
    return name, bytes(data)


def within(seconds: float, call: Callable[[], T]) -> T:
    """call() run on a daemon thread: its result, or a failure after `seconds` (a hang)."""
    outcome: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            error.append(exc)

    worker = threading.Thread(target=target, daemon=True)
    started = time.perf_counter()
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s: a hang"
    if error:
        raise error[0]
    assert time.perf_counter() - started < seconds
    return outcome[0]


def decode(data: bytes) -> torch.Tensor:
    return decode_image(data, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)


def test_every_seed_decodes() -> None:
    for name, data in SEEDS.items():
        pixels = decode(data)
        assert pixels.shape == (1, 28, 28), name
        assert pixels.max() > 0.5, name


@settings(FUZZ, max_examples=400)
@given(mutated_images())
def test_mutated_images_decode_or_are_refused_in_time(case: tuple[str, bytes]) -> None:
    _, data = case

    def attempt() -> torch.Tensor | None:
        try:
            return decode(data)
        except (UnsupportedImage, PayloadTooLarge):
            return None

    pixels = within(TIME_BOUND_S, attempt)
    if pixels is not None:
        assert pixels.shape == (1, 28, 28)
        assert pixels.dtype == torch.float32
        assert bool(torch.isfinite(pixels).all())
        assert float(pixels.min()) >= 0.0
        assert float(pixels.max()) <= 1.0


@pytest.mark.slow
@settings(FUZZ, max_examples=120)
@given(mutated_images())
def test_mutated_uploads_get_200_or_4xx_in_time(
    client: TestClient, case: tuple[str, bytes]
) -> None:
    # `client` raises any server-side exception, so a 500 cannot hide behind a status code.
    _, data = case
    response = within(
        TIME_BOUND_S, lambda: client.post("/encode", files=files(data), params={"digit": 7})
    )
    assert response.status_code in (200, 413, 415), response.text
    assert response.headers["content-type"] == "application/json"
    if response.status_code == 200:
        assert len(response.json()["items"]) == 1


# Decompression bombs: a few hundred bytes that declare billions of pixels. Each must be
# refused from the header alone (no pixel buffer allocated), so it costs no time or memory.
def png_bomb(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


BOMBS: dict[str, bytes] = {
    "png-100k-square": png_bomb(100_000, 100_000),
    "png-over-our-limit": png_bomb(4097, 4096),
    "png-one-huge-side": png_bomb(2**31 - 1, 1),
    "gif-64k-square": gif_with_size(SEEDS["gif"], 65535, 65535),
    "gif-over-our-limit": gif_with_size(SEEDS["gif"], 8192, 4096),
    "tiff-100k-square": tiff_with_size(SEEDS["tiff-raw"], 100_000, 100_000),
    "tiff-deflate-over-our-limit": tiff_with_size(SEEDS["tiff-deflate-16bit"], 8192, 8192),
    "jpeg-64k-square": jpeg_with_size(SEEDS["jpeg-gray"], 65535, 65535),
    "jpeg-over-our-limit": jpeg_with_size(SEEDS["jpeg-rgb-progressive"], 8192, 4096),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_decompression_bomb_is_refused_from_its_header(name: str) -> None:
    data = BOMBS[name]
    assert len(data) < 4096
    started = time.perf_counter()
    with pytest.raises(PayloadTooLarge, match=r"pixel|decompression-bomb"):
        decode(data)
    assert time.perf_counter() - started < 1.0


def test_a_dense_image_at_the_pixel_limit_decodes_in_bounded_time() -> None:
    # The largest image the limit lets through (16 Mpixel, 16 kB as PNG): decoded, not refused.
    side = 4096
    rows = b"".join(b"\x00" + bytes(side) for _ in range(side))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows, 9))
        + png_chunk(b"IEND", b"")
    )
    assert len(data) < 64 * 1024
    pixels = within(TIME_BOUND_S, lambda: decode(data))
    assert float(pixels.max()) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BOMBS))
def test_decompression_bomb_upload_is_413(client: TestClient, name: str) -> None:
    response = client.post("/anomaly-score", files=files(BOMBS[name]))
    assert response.status_code == 413, response.text
    assert "downscale" in response.json()["detail"]


def test_bomb_helpers_change_only_the_size() -> None:
    for resize, seed in (
        (png_with_size, "png-gray"),
        (gif_with_size, "gif"),
        (jpeg_with_size, "jpeg-gray"),
        (tiff_with_size, "tiff-raw"),
    ):
        with Image.open(io.BytesIO(resize(SEEDS[seed], 300, 200))) as image:
            assert image.size == (300, 200), seed
    assert np.asarray(Image.open(io.BytesIO(png_bomb(3, 2)))).shape == (2, 3)
