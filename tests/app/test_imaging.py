"""Tests for app.service.imaging: decoding every accepted format and mode, limits, and encoders."""

import base64
import io
import struct
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from app_testing import png_chunk
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from app.errors import PayloadTooLarge, UnsupportedImage
from app.service.imaging import (
    ACCEPTED_FORMATS,
    decode_base64_image,
    decode_image,
    encode_gif,
    encode_png,
    heatmap_png,
    make_grid_png,
    to_base64,
)

MAX_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 4096 * 4096
ONE_LEVEL = 1 / 255 + 1e-6


def decode(
    data: bytes, *, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS, invert: bool = False
) -> torch.Tensor:
    return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, invert=invert)


def frame_count(gif: Image.Image) -> int:
    return int(getattr(gif, "n_frames", 1))


def save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def square_digit(size: int = 28) -> Image.Image:
    """Black canvas with a white square in the middle third: easy to check after resizing."""
    canvas = np.zeros((size, size), dtype=np.uint8)
    canvas[size // 3 : 2 * size // 3, size // 3 : 2 * size // 3] = 255
    return Image.fromarray(canvas)


def png_header_only(width: int, height: int, idat: bytes) -> bytes:
    """A 1-bit grayscale PNG claiming width x height, with whatever IDAT payload is given."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def huge_black_png() -> bytes:
    """A valid 20000x20000 black PNG: 400 M pixels, about 50 kB on disk."""
    side = 20_000
    row = b"\x00" * (1 + side // 8)  # filter byte + 1 bit per pixel
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return png_header_only(side, side, idat)


# --- round trips and formats -------------------------------------------------------------


def test_png_round_trip_keeps_pixels_within_one_level() -> None:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 28, 28, generator=generator)
    decoded = decode(encode_png(image))
    assert decoded.shape == (1, 28, 28)
    assert decoded.dtype == torch.float32
    assert (decoded - image).abs().max() <= ONE_LEVEL


def test_encode_png_accepts_2d_and_gives_8bit_grayscale() -> None:
    data = encode_png(torch.full((28, 28), 0.5))
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        assert image.mode == "L"
        assert image.size == (28, 28)
        assert np.asarray(image).max() == 128  # 127.5 rounds half to even


def test_encode_png_clamps_and_maps_nan_to_black() -> None:
    values = torch.tensor([[float("nan"), -3.0, 7.0, float("inf")]])
    with Image.open(io.BytesIO(encode_png(values))) as image:
        assert np.asarray(image).tolist() == [[0, 0, 255, 255]]


def test_encode_png_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"\(1, H, W\) or \(H, W\)"):
        encode_png(torch.zeros(3, 28, 28))


@pytest.mark.parametrize("fmt", ACCEPTED_FORMATS)
def test_every_accepted_format_decodes(fmt: str) -> None:
    params = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode(save(square_digit(), fmt, **params))
    # JPEG is lossy: compare against the drawn square with a loose tolerance.
    tolerance = 0.15 if fmt == "JPEG" else ONE_LEVEL
    expected = torch.from_numpy(np.asarray(square_digit(), dtype=np.float32) / 255).unsqueeze(0)
    assert decoded.shape == (1, 28, 28)
    assert (decoded - expected).abs().max() <= tolerance


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_multi_frame_images_use_the_first_frame(fmt: str) -> None:
    white = Image.new("L", (28, 28), 255)
    black = Image.new("L", (28, 28), 0)
    decoded = decode(save(white, fmt, save_all=True, append_images=[black, black]))
    assert decoded.min() == pytest.approx(1.0)


def test_large_jpeg_is_downscaled_correctly() -> None:
    decoded = decode(save(square_digit(1000).convert("RGB"), "JPEG", quality=95))
    assert decoded[0, 14, 14] > 0.9
    assert decoded[0, 2, 2] < 0.1


def test_exif_rotation_is_applied() -> None:
    canvas = np.zeros((28, 28), dtype=np.uint8)
    canvas[:, :14] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 3  # "rotate 180 degrees to display"
    decoded = decode(save(Image.fromarray(canvas), "JPEG", exif=exif.tobytes(), quality=95))
    assert decoded[0, :, 20:].mean() > 0.9  # the white half is now on the right
    assert decoded[0, :, :8].mean() < 0.1


# --- modes -------------------------------------------------------------------------------


def test_rgb_uses_luma() -> None:
    decoded = decode(save(Image.new("RGB", (28, 28), (255, 0, 0)), "PNG"))
    assert decoded.mean().item() == pytest.approx(0.299, abs=2 / 255)


def test_rgba_transparent_background_becomes_black() -> None:
    image = Image.new("RGBA", (28, 28), (255, 255, 255, 0))  # white but fully transparent
    image.paste((255, 255, 255, 255), (10, 10, 18, 18))
    image.paste((255, 255, 255, 128), (0, 0, 4, 4))
    decoded = decode(save(image, "PNG"))
    assert decoded[0, 20:, 20:].max() == 0.0
    assert decoded[0, 12, 12] == pytest.approx(1.0)
    assert decoded[0, 1, 1] == pytest.approx(128 / 255, abs=ONE_LEVEL)


def test_la_alpha_is_flattened_onto_black() -> None:
    image = Image.new("LA", (28, 28), (255, 0))
    image.paste((200, 255), (10, 10, 18, 18))
    decoded = decode(save(image, "PNG"))
    assert decoded[0, 0, 0] == 0.0
    assert decoded[0, 12, 12] == pytest.approx(200 / 255, abs=ONE_LEVEL)


def test_palette_image_with_transparent_index_becomes_black() -> None:
    image = Image.new("P", (28, 28), 1)
    image.putpalette([0, 0, 0, 255, 255, 255, 128, 128, 128])
    image.paste(2, (10, 10, 18, 18))
    decoded = decode(save(image, "GIF", transparency=1))
    assert decoded[0, 0, 0] == 0.0  # index 1 is white but transparent
    assert decoded[0, 12, 12] == pytest.approx(128 / 255, abs=ONE_LEVEL)


def test_palette_image_without_transparency_uses_its_colors() -> None:
    image = Image.new("P", (28, 28), 1)
    image.putpalette([0, 0, 0, 255, 255, 255])
    assert decode(save(image, "PNG")).min() == pytest.approx(1.0)


def test_one_bit_image() -> None:
    image = square_digit().convert("1")
    decoded = decode(save(image, "PNG"))
    assert set(decoded.unique().tolist()) == {0.0, 1.0}
    assert decoded[0, 14, 14] == 1.0


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_image_is_scaled_by_its_range_not_clipped(fmt: str) -> None:
    values = np.zeros((28, 28), dtype=np.uint16)
    values[:, :14] = 65535
    values[:, 14:] = 32768
    data = save(Image.fromarray(values), fmt)
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.mode == "I;16"
    decoded = decode(data)
    assert decoded[0, :, :14].min() == pytest.approx(1.0)
    assert decoded[0, :, 14:].max() == pytest.approx(0.5, abs=1e-4)


@pytest.mark.parametrize(
    ("peak", "expected"), [(200, 200 / 255), (40_000, 40_000 / 65535), (2**30, 0.5)]
)
def test_32bit_integer_image_is_scaled_by_the_depth_its_values_need(
    peak: int, expected: float
) -> None:
    image = Image.fromarray(np.full((28, 28), peak, dtype=np.int32))
    assert image.mode == "I"
    assert decode(save(image, "TIFF")).max().item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(("peak", "expected"), [(0.75, 0.75), (191.25, 0.75), (1e9, 1.0)])
def test_float_image_is_read_as_unit_or_byte_range(peak: float, expected: float) -> None:
    values = np.full((28, 28), peak, dtype=np.float32)
    values[0, 0] = np.nan  # must not poison the scale
    decoded = decode(save(Image.fromarray(values), "TIFF"))
    assert decoded[0, 0, 0] == 0.0
    assert decoded[0, 5, 5].item() == pytest.approx(expected, abs=1e-4)


def test_cmyk_jpeg_decodes() -> None:
    decoded = decode(save(Image.new("CMYK", (28, 28), (0, 0, 0, 0)), "JPEG"))
    assert decoded.min() > 0.9  # no ink is white paper


# --- resizing and inversion --------------------------------------------------------------


def test_large_image_is_resized_to_28x28_with_antialiasing() -> None:
    canvas = np.zeros((280, 280), dtype=np.uint8)
    canvas[:, :140] = 255
    canvas[::2, 140:] = 255  # thin stripes average to gray, not aliasing to 0 or 1
    decoded = decode(save(Image.fromarray(canvas), "PNG"))
    assert decoded.shape == (1, 28, 28)
    assert decoded[0, :, :10].min() == pytest.approx(1.0, abs=0.01)
    assert decoded[0, :, 16:].mean().item() == pytest.approx(0.5, abs=0.02)


def test_non_square_image_is_stretched_to_28x28() -> None:
    assert decode(save(Image.new("L", (100, 30), 255), "PNG")).shape == (1, 28, 28)


def test_invert_turns_black_on_white_into_white_on_black() -> None:
    data = save(Image.new("L", (28, 28), 255), "PNG")
    assert decode(data, invert=True).max() == 0.0
    image = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(1))
    inverted = decode(encode_png(image), invert=True)
    assert (inverted - (1 - image)).abs().max() <= ONE_LEVEL


# --- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello, this is plainly text and not an image\n", "PNG, JPEG"),
        (bytes(range(256)) * 4, "PNG, JPEG"),
    ],
)
def test_non_images_are_unsupported(data: bytes, message: str) -> None:
    with pytest.raises(UnsupportedImage, match=message) as caught:
        decode(data)
    assert caught.value.status_code == 415
    assert caught.value.reason == "bad_image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP"])
def test_truncated_image_is_unsupported(fmt: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    data = save(Image.fromarray(noise), fmt)
    with pytest.raises(UnsupportedImage, match=r"truncated or corrupt|not a PNG"):
        decode(data[: len(data) // 2])


def test_corrupt_png_data_is_unsupported() -> None:
    with pytest.raises(UnsupportedImage, match="truncated or corrupt"):
        decode(png_header_only(28, 28, b"not zlib at all"))


def test_formats_pillow_reads_but_we_do_not_accept_are_unsupported() -> None:
    with pytest.raises(UnsupportedImage, match="PNG, JPEG, BMP, GIF, WebP or TIFF"):
        decode(save(square_digit(), "PCX"))


def test_too_many_bytes_is_payload_too_large() -> None:
    data = save(square_digit(), "PNG")
    with pytest.raises(PayloadTooLarge, match=f"{len(data)} bytes") as caught:
        decode(data, max_bytes=len(data) - 1)
    assert caught.value.status_code == 413
    assert decode(data, max_bytes=len(data)).shape == (1, 28, 28)


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    # The pixel data is garbage: decoding it would fail as UnsupportedImage, so a
    # PayloadTooLarge proves the size was refused before any pixel was read.
    data = png_header_only(3000, 3000, b"garbage")
    with pytest.raises(PayloadTooLarge, match="3000x3000 = 9000000 pixels"):
        decode(data, max_pixels=1_000_000)


def test_our_pixel_check_runs_before_pillows_bomb_warning() -> None:
    # 100 M pixels is over Image.MAX_IMAGE_PIXELS (a warning, an error under pytest's
    # filterwarnings) but under twice it, so our check must be the one that refuses.
    data = png_header_only(10_000, 10_000, b"garbage")
    with pytest.raises(PayloadTooLarge, match="10000x10000"):
        decode(data)


def test_decompression_bomb_is_refused_quickly(huge_black_png: bytes) -> None:
    assert len(huge_black_png) < 200_000
    started = time.perf_counter()
    with pytest.raises(PayloadTooLarge, match="decompression-bomb limit"):
        decode(huge_black_png)
    assert time.perf_counter() - started < 1.0


def test_concurrent_decodes_leave_warning_filters_as_they_were() -> None:
    good = save(square_digit(), "PNG")
    bomb = png_header_only(10_000, 10_000, b"garbage")
    before = list(warnings.filters)

    def decode_one(index: int) -> str:
        try:
            decode(good if index % 2 else bomb)
        except PayloadTooLarge:
            return "refused"
        return "decoded"

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(decode_one, range(200)))
    assert outcomes.count("decoded") == outcomes.count("refused") == 100
    assert warnings.filters == before


_IMAGE_PREFIXES = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"\xff\xd8\xff",
    b"BM",
    b"II*\x00",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
]


@settings(max_examples=200, deadline=None)
@given(prefix=st.sampled_from(_IMAGE_PREFIXES), body=st.binary(max_size=2048))
def test_random_bytes_only_raise_our_refusals(prefix: bytes, body: bytes) -> None:
    try:
        decoded = decode(prefix + body, max_bytes=4096, max_pixels=1_000_000)
    except (UnsupportedImage, PayloadTooLarge):
        return
    assert decoded.shape == (1, 28, 28)


# --- base64 ------------------------------------------------------------------------------


def test_base64_raw_and_data_url_decode_the_same() -> None:
    data = save(square_digit(), "PNG")
    raw = base64.b64encode(data).decode()
    expected = decode(data)
    for text in (
        raw,
        f"data:image/png;base64,{raw}",
        f"DATA:image/png;BASE64,{raw}",
        "\n".join(raw[i : i + 76] for i in range(0, len(raw), 76)),  # MIME line wrapping
        base64.urlsafe_b64encode(data).decode().rstrip("="),
    ):
        decoded = decode_base64_image(text, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
        assert torch.equal(decoded, expected)


def test_base64_invert_is_passed_through() -> None:
    text = to_base64(save(Image.new("L", (28, 28), 255), "PNG"))
    decoded = decode_base64_image(text, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, invert=True)
    assert decoded.max() == 0.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not base64 at all!", "not valid base64"),
        ("abcde", "not valid base64"),
        ("ÿÿÿÿ", "not valid base64"),
        ("data:image/png,rawbytes", "not base64-encoded"),
        ("data:image/png;base64", "not base64-encoded"),
        ("", "empty"),
        (base64.b64encode(b"just text").decode(), "PNG, JPEG"),
    ],
)
def test_bad_base64_is_unsupported(text: str, message: str) -> None:
    with pytest.raises(UnsupportedImage, match=message):
        decode_base64_image(text, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)


def test_base64_over_the_byte_limit_is_refused_before_decoding() -> None:
    text = "A" * 4000  # 3000 bytes once decoded
    with pytest.raises(PayloadTooLarge):
        decode_base64_image(text, max_bytes=1000, max_pixels=MAX_PIXELS)


def test_to_base64_round_trips() -> None:
    assert base64.b64decode(to_base64(b"\x00\xffpng")) == b"\x00\xffpng"


# --- grids, GIFs, heatmaps ---------------------------------------------------------------


def test_grid_layout_matches_torchvision_padding_2() -> None:
    images = torch.ones(10, 1, 28, 28)
    with Image.open(io.BytesIO(make_grid_png(images, nrow=5))) as grid:
        assert grid.mode == "L"
        assert grid.size == (5 * 30 + 2, 2 * 30 + 2)  # (width, height) = 152 x 62
        pixels = np.asarray(grid)
    assert pixels[:2].max() == 0 and pixels[:, :2].max() == 0  # outer padding is black
    assert pixels[2:30, 2:30].min() == 255  # first tile
    assert pixels[30:32].max() == 0  # padding between rows
    assert pixels[32:60, 122:150].min() == 255  # last tile


def test_grid_with_a_short_last_row_pads_with_black() -> None:
    with Image.open(io.BytesIO(make_grid_png(torch.ones(3, 1, 28, 28), nrow=2))) as grid:
        assert grid.size == (62, 62)
        assert np.asarray(grid)[32:60, 32:60].max() == 0


@pytest.mark.parametrize("shape", [(10, 28, 28), (0, 1, 28, 28), (2, 3, 28, 28)])
def test_grid_rejects_a_tensor_that_is_not_n_1_h_w(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="N, 1, H, W"):
        make_grid_png(torch.zeros(shape), nrow=5)


def test_grid_rejects_nrow_below_one() -> None:
    with pytest.raises(ValueError, match="nrow >= 1"):
        make_grid_png(torch.zeros(2, 1, 28, 28), nrow=0)


@pytest.mark.parametrize("fill", [0.0, 0.6, 1.0])
def test_gif_keeps_identical_frames(fill: float) -> None:
    data = encode_gif(torch.full((3, 1, 28, 28), fill), duration_ms=80)
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.format == "GIF"
        assert frame_count(gif) == 3
        assert gif.info["loop"] == 0
        assert gif.info["duration"] == 80


def test_gif_frames_keep_their_pixels_and_order() -> None:
    frames = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    frames[2] = frames[1]  # a held frame in the middle
    with Image.open(io.BytesIO(encode_gif(frames))) as gif:
        assert frame_count(gif) == 5
        for index in range(5):
            gif.seek(index)
            pixels = torch.from_numpy(np.asarray(gif.convert("L"), dtype=np.float32) / 255)
            assert (pixels - frames[index, 0]).abs().max() <= ONE_LEVEL


def test_gif_of_one_frame_and_of_a_grid_size() -> None:
    with Image.open(io.BytesIO(encode_gif(torch.zeros(1, 1, 62, 152)))) as gif:
        assert frame_count(gif) == 1
        assert gif.size == (152, 62)


def test_gif_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="N, 1, H, W"):
        encode_gif(torch.zeros(3, 28, 28))
    with pytest.raises(ValueError, match="duration_ms"):
        encode_gif(torch.zeros(2, 1, 28, 28), duration_ms=-1)


def test_heatmap_is_normalised_to_its_max() -> None:
    errors = torch.zeros(1, 28, 28)
    errors[0, 0, 0] = 4.0
    errors[0, 0, 1] = 2.0
    errors[0, 0, 2] = float("nan")
    with Image.open(io.BytesIO(heatmap_png(errors))) as heatmap:
        pixels = np.asarray(heatmap)
    assert heatmap.size == (28, 28)
    assert pixels[0, :3].tolist() == [255, 128, 0]
    assert pixels[1:].max() == 0


def test_all_zero_heatmap_is_black() -> None:
    with Image.open(io.BytesIO(heatmap_png(torch.zeros(1, 28, 28)))) as heatmap:
        assert np.asarray(heatmap).max() == 0
