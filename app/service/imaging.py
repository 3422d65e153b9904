"""Image codecs: uploaded bytes -> MNIST-style tensors, and tensors -> PNG/GIF bytes."""

import base64
import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.utils import make_grid

from app.errors import PayloadTooLarge, ServiceError, UnsupportedImage

IMAGE_SIDE = 28
# Only the formats a client plausibly sends. Pillow can open many more, but some shell
# out (EPS runs Ghostscript) and the rest are decoder attack surface without a use.
ACCEPTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
_ACCEPTED_TEXT = "PNG, JPEG, BMP, GIF, WebP or TIFF"
GRID_PADDING = 2

# Pillow's warnings are about inputs we either reject ourselves or decode anyway, so they
# add nothing; under `-W error` they would also turn a decodable image into a failure.
# `warnings.catch_warnings()` alone is not thread-safe: concurrent decodes in a threadpool
# restore each other's filter lists. So the first decode in installs the filters and the
# last one out restores them.
_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_guard: warnings.catch_warnings | None = None


@contextmanager
def _pillow_warnings_ignored() -> Iterator[None]:
    """Ignore warnings raised inside Pillow (or attributed to this module) while active."""
    global _quiet_depth, _quiet_guard
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_guard = warnings.catch_warnings()
            _quiet_guard.__enter__()
            warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
            # Pillow warns with stacklevel=2 in places, which blames the caller: us.
            warnings.filterwarnings("ignore", module=rf"{__name__}$")
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _quiet_guard is not None:
                _quiet_guard.__exit__(None, None, None)
                _quiet_guard = None


def decode_image(
    data: bytes, *, max_bytes: int, max_pixels: int, invert: bool = False
) -> torch.Tensor:
    """Decode one uploaded image into a float32 (1, 28, 28) tensor in [0, 1], like MNIST.

    Alpha is flattened onto black (MNIST's background), every bit depth is scaled by its
    own range, the first frame of an animation is used, and the image is resized to 28x28
    without keeping its aspect ratio. `invert=True` turns dark ink on white paper into
    MNIST's white-on-black.
    """
    if not data:
        raise UnsupportedImage(f"the image is empty (0 bytes); send a {_ACCEPTED_TEXT} file")
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            f"the image is {len(data)} bytes, over the {max_bytes}-byte limit; "
            "send a smaller file (a 28x28 PNG is under 1 kB)"
        )
    with _pillow_warnings_ignored():
        gray = _decode_gray(data, max_pixels)
    pixels = _resize_to_mnist(gray)
    return 1.0 - pixels if invert else pixels


def decode_images(
    blobs: list[bytes], *, max_bytes: int, max_pixels: int, invert: bool, field: str
) -> torch.Tensor:
    """Several uploads as one (N, 1, 28, 28) batch; an error names the upload (`field` #i)
    when there are several."""
    images = []
    for index, data in enumerate(blobs):
        try:
            images.append(
                decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, invert=invert)
            )
        except (UnsupportedImage, PayloadTooLarge) as exc:
            if len(blobs) > 1:
                exc.detail = f"'{field}' #{index}: {exc.detail}"
            raise
    return torch.stack(images)


def decode_base64_image(
    encoded: str, *, max_bytes: int, max_pixels: int, invert: bool = False
) -> torch.Tensor:
    """Like `decode_image`, for base64 text or a data URL (`data:image/png;base64,...`)."""
    payload = encoded.strip()
    if payload[:5].lower() == "data:":
        header, comma, payload = payload.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise UnsupportedImage(
                "the data URL is not base64-encoded; send data:image/png;base64,<data>"
            )
    # Line-wrapped (MIME) and URL-safe base64 are both common in the wild.
    payload = "".join(payload.split()).translate(str.maketrans("-_", "+/"))
    # Refuse before decoding: 4 base64 characters carry 3 bytes, less up to 2 of padding.
    if len(payload) // 4 * 3 - 2 > max_bytes:
        raise PayloadTooLarge(
            f"the base64 image decodes to over the {max_bytes}-byte limit; send a smaller file"
        )
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except ValueError as exc:  # binascii.Error, and non-ASCII text
        raise UnsupportedImage(
            f"the image is not valid base64 ({exc}); send standard base64 of a "
            f"{_ACCEPTED_TEXT} file, optionally as a data:image/...;base64, URL"
        ) from exc
    return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, invert=invert)


def _decode_gray(data: bytes, max_pixels: int) -> np.ndarray:
    """The first frame of `data` as a float32 (H, W) array in [0, 1]."""
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
            # Image.open has read only the header: check the size before any pixel exists.
            _check_pixel_count(image.size, max_pixels)
            if image.format == "JPEG":
                # DCT scaling decodes at down to 1/8 size, plenty for a 28x28 result.
                image.draft("L", (IMAGE_SIDE * 4, IMAGE_SIDE * 4))
            image.load()
            # Phone photos are often stored sideways with an EXIF rotation tag.
            return _to_unit_gray(ImageOps.exif_transpose(image))
    except ServiceError:
        raise
    except Image.DecompressionBombError as exc:
        # Image.open runs Pillow's own hard check (twice Image.MAX_IMAGE_PIXELS) before
        # ours can; that is the same refusal, just with Pillow's limit.
        raise PayloadTooLarge(
            f"the image is over Pillow's decompression-bomb limit ({exc}); "
            "downscale it (28x28 is enough) and retry"
        ) from exc
    except Image.UnidentifiedImageError as exc:
        raise UnsupportedImage(
            f"the {len(data)} bytes starting {data[:8]!r} are not a {_ACCEPTED_TEXT} "
            "image; send one of those formats"
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:
        # Decoders fed hostile bytes fail with nearly any exception type (OSError,
        # SyntaxError, EOFError, struct.error, ValueError, IndexError...). All of them
        # mean the client's file is broken, never that the server is.
        raise UnsupportedImage(
            f"the image could not be decoded ({type(exc).__name__}: {str(exc)[:200]}); "
            f"it may be truncated or corrupt: send a complete {_ACCEPTED_TEXT} file"
        ) from exc


def _check_pixel_count(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise UnsupportedImage(f"the image is {width}x{height} and has no pixels")
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"the image is {width}x{height} = {width * height} pixels, over the "
            f"{max_pixels}-pixel limit; downscale it (28x28 is enough) and retry"
        )


def _to_unit_gray(image: Image.Image) -> np.ndarray:
    """Any Pillow mode as float32 (H, W) gray levels in [0, 1], alpha flattened onto black."""
    mode = image.mode
    if mode.startswith("I;16"):
        return np.asarray(image, dtype=np.float32) / 65535.0
    if mode == "I":
        return _scale_int32(np.asarray(image, dtype=np.float64))
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        values = np.where(np.isfinite(values), values, 0.0)
        # Float images hold either [0, 1] or [0, 255]; anything brighter than 1 is the latter.
        full_scale = 255.0 if values.max(initial=0.0) > 1.0 else 1.0
        return np.clip(values / full_scale, 0.0, 1.0).astype(np.float32)
    if mode == "LAB":
        image = image.getchannel("L")  # lightness is already the gray level
    elif image.has_transparency_data:
        black = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, image.convert("RGBA"))
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def _scale_int32(values: np.ndarray) -> np.ndarray:
    """Scale a 32-bit integer image by the smallest common bit depth that holds its peak.

    Pillow uses mode "I" as a container for 8-, 16- and 32-bit data alike, and the file's
    true bit depth is gone by then; the peak value is the best evidence left.
    """
    peak = values.max(initial=0.0)
    full_scale = next(scale for scale in (255.0, 65535.0, 2.0**31 - 1) if peak <= scale)
    return np.clip(values / full_scale, 0.0, 1.0).astype(np.float32)


def _resize_to_mnist(gray: np.ndarray) -> torch.Tensor:
    """(H, W) in [0, 1] -> (1, 28, 28) float32 tensor, antialiased."""
    image = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32))  # mode "F"
    if image.size != (IMAGE_SIDE, IMAGE_SIDE):
        # reducing_gap box-filters most of a large downscale cheaply; Lanczos finishes it.
        image = image.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.LANCZOS, reducing_gap=3.0)
    pixels = torch.from_numpy(np.array(image, dtype=np.float32))
    return pixels.clamp_(0.0, 1.0).unsqueeze(0)  # Lanczos overshoots a little at edges


def encode_png(image: torch.Tensor) -> bytes:
    """(1, H, W) or (H, W) floats in [0, 1] -> 8-bit grayscale PNG; NaN becomes black."""
    return _png_bytes(_to_uint8(_as_2d(image, "encode_png")))


# What the routes call image batches, (N, 1, 28, 28) floats in [0, 1], without importing torch.
Images = torch.Tensor


def gradient_png() -> bytes:
    """A constant 28x28 grey ramp: the benchmark floor's response."""
    return encode_png(torch.linspace(0.0, 1.0, IMAGE_SIDE * IMAGE_SIDE).view(1, 28, 28))


def pairs_grid_png(inputs: torch.Tensor, outputs: torch.Tensor) -> bytes:
    """(N, 1, H, W) twice -> one PNG, a row per pair: the input, then its output."""
    return make_grid_png(torch.stack([inputs, outputs], dim=1).flatten(0, 1), 2)


def neighbours_grid_png(
    queries: torch.Tensor, rows: list[list[torch.Tensor]], columns: int
) -> bytes:
    """One row per query (N, 1, H, W): the query, then its row's images, black where a row has
    fewer than `columns` - 1."""
    tiles = torch.zeros(len(rows), columns, *queries.shape[1:])
    for q, row in enumerate(rows):
        tiles[q, 0] = queries[q]
        for column, image in enumerate(row, start=1):
            tiles[q, column] = image
    return make_grid_png(tiles.flatten(0, 1), columns)


def make_grid_png(images: torch.Tensor, nrow: int) -> bytes:
    """(N, 1, H, W) -> one grayscale PNG, `nrow` tiles a row, 2 px of black around each."""
    _check_frames(images, "make_grid_png")
    if nrow < 1:
        raise ValueError(f"make_grid_png needs nrow >= 1, got {nrow}")
    grid = make_grid(
        images.detach().to("cpu", torch.float32),
        nrow=nrow,
        padding=GRID_PADDING,
        pad_value=0.0,
    )
    return _png_bytes(_to_uint8(grid[0]))  # one-channel input comes back as 3 equal channels


def encode_gif(frames: torch.Tensor, duration_ms: int = 100) -> bytes:
    """(N, 1, H, W) floats in [0, 1] -> a grayscale GIF of exactly N frames, looping forever.

    Pillow's animated-GIF writer always merges identical consecutive frames (a held pose
    in an interpolation would vanish), so each frame is encoded alone by Pillow and the
    frames are joined here.
    """
    _check_frames(frames, "encode_gif")
    if duration_ms < 0:
        raise ValueError(f"encode_gif needs duration_ms >= 0, got {duration_ms}")
    delay_cs = min(round(duration_ms / 10), 0xFFFF)  # GIF delays are 16-bit centiseconds
    disposal = 2  # restore to background: each frame stands alone
    control = b"\x21\xf9\x04" + bytes([disposal << 2]) + delay_cs.to_bytes(2, "little")
    control += b"\x00\x00"  # no transparent index; block terminator
    loop_forever = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"

    gif = bytearray()
    shared_table = b""
    for index, pixels in enumerate(_to_uint8(frames[:, 0])):
        buffer = io.BytesIO()
        # optimize=False keeps the full 256-gray palette, identical for every frame.
        Image.fromarray(pixels).save(buffer, format="GIF", optimize=False)
        screen, table, image_block = _split_single_frame_gif(buffer.getvalue())
        if index == 0:
            gif += b"GIF89a" + screen + table + loop_forever
            shared_table = table
        elif table != shared_table:
            raise RuntimeError("Pillow wrote GIF frames with different palettes; cannot join")
        gif += control + image_block
    gif += b";"
    return bytes(gif)


def _split_single_frame_gif(gif: bytes) -> tuple[bytes, bytes, bytes]:
    """A one-frame GIF -> (logical screen descriptor, global color table, image block)."""
    screen = gif[6:13]
    flags = screen[4]
    table_end = 13 + (3 << ((flags & 0x07) + 1) if flags & 0x80 else 0)
    position = table_end
    while gif[position] == 0x21:  # extensions: dropped, encode_gif writes its own
        position = _skip_sub_blocks(gif, position + 2)
    if gif[position] != 0x2C:
        raise RuntimeError(f"unexpected GIF block 0x{gif[position]:02x} from Pillow")
    start = position
    descriptor_flags = gif[position + 9]
    position += 10
    if descriptor_flags & 0x80:  # local color table
        position += 3 << ((descriptor_flags & 0x07) + 1)
    position = _skip_sub_blocks(gif, position + 1)  # +1: the LZW minimum code size
    return screen, gif[13:table_end], gif[start:position]


def _skip_sub_blocks(data: bytes, position: int) -> int:
    """Index just past a chain of GIF data sub-blocks starting at `position`."""
    while data[position] != 0:
        position += data[position] + 1
    return position + 1


def to_base64(data: bytes) -> str:
    """Bytes -> standard base64 text, for JSON responses."""
    return base64.b64encode(data).decode("ascii")


def heatmap_png(error_map: torch.Tensor) -> bytes:
    """(1, H, W) or (H, W) non-negative per-pixel errors -> grayscale PNG, brightest = max.

    An all-zero map is all black; NaN, infinite and negative errors count as zero.
    """
    errors = _as_2d(error_map, "heatmap_png").detach().to("cpu", torch.float32)
    errors = errors.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0.0)
    peak = errors.max()
    if peak > 0:
        errors = errors / peak
    return _png_bytes(_to_uint8(errors))


def _as_2d(image: torch.Tensor, caller: str) -> torch.Tensor:
    if image.dim() == 3 and image.shape[0] == 1:
        return image[0]
    if image.dim() == 2:
        return image
    raise ValueError(f"{caller} expects a (1, H, W) or (H, W) tensor, got {tuple(image.shape)}")


def _check_frames(images: torch.Tensor, caller: str) -> None:
    if images.dim() != 4 or images.shape[0] == 0 or images.shape[1] != 1:
        raise ValueError(
            f"{caller} expects an (N, 1, H, W) tensor with N >= 1, got {tuple(images.shape)}"
        )


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Floats in [0, 1] -> uint8, rounded and clamped; NaN becomes 0."""
    values = pixels.detach().to("cpu", torch.float32).nan_to_num(nan=0.0)
    return values.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).contiguous().numpy()


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # 2-D uint8 -> mode "L"
    return buffer.getvalue()
