"""The decode stage for uploads: multipart `file` fields -> image tensors, every limit enforced."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.errors import InvalidInput, PayloadTooLarge, UnsupportedImage
from app.http.state import service
from app.service.imaging import Images, decode_images
from app.settings import Settings
from app.tracing import span

FIELD = "file"


def multipart_body(many: bool) -> dict[str, Any]:
    """OpenAPI description of the multipart body (the form is parsed by hand, with limits)."""
    binary = {"type": "string", "format": "binary"}
    file_schema = (
        {"type": "array", "items": binary, "minItems": 1, "description": "one or more images"}
        if many
        else {**binary, "description": "one image"}
    )
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [FIELD],
                        "properties": {FIELD: file_schema},
                    }
                }
            },
        }
    }


async def read_images(
    request: Request, settings: Settings, *, invert: bool, many: bool = True
) -> Images:
    """The uploaded images as (N, 1, 28, 28) floats in [0, 1]; traced as `decode upload` (the
    body's arrival, its parts and the image decoding)."""
    with span(service(request).tracer, "decode upload") as traced:
        images = await _read_images(request, settings, invert=invert, many=many)
        if traced is not None:
            traced.set_attribute("vae.images", len(images))
    return images


async def _read_images(request: Request, settings: Settings, *, invert: bool, many: bool) -> Images:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidInput(
            f"send images as multipart/form-data with field '{FIELD}' "
            f"(e.g. curl -F {FIELD}=@digit.png); got content-type {content_type or 'none'!r}"
        )
    limit = settings.max_files if many else 1
    try:
        async with aclosing(request.stream()) as stream:
            parser = _CompleteMultiPartParser(
                request.headers, stream, max_files=limit, max_fields=16, max_part_size=64 * 1024
            )
            form = await parser.parse()
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise PayloadTooLarge(
                f"too many files: at most {limit} per request (VAE_MAX_FILES)"
            ) from None
        raise InvalidInput(f"malformed multipart body: {exc.message}") from None
    try:
        blobs = await _read_parts(form.getlist(FIELD), settings)
    finally:
        # Uploads are spooled to temporary files: close them now, not at garbage collection.
        await form.close()
    return await run_in_threadpool(
        decode_images,
        blobs,
        max_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_image_pixels,
        invert=invert,
        field=FIELD,
    )


class _CompleteMultiPartParser(MultiPartParser):
    """Starlette's parser, refusing a body that ends before its closing boundary.

    python-multipart accepts such a body silently, and the file part it ended in is never
    finished, so its spooled temporary file leaks (an open descriptor per request).
    Raising from the stream makes the parser close every file it opened.
    """

    def __init__(
        self, headers: Headers, stream: AsyncGenerator[bytes, None], **limits: Any
    ) -> None:
        self.complete = False
        super().__init__(headers, self._until_complete(stream), **limits)

    def on_end(self) -> None:
        self.complete = True  # python-multipart calls this on the closing boundary

    async def _until_complete(
        self, stream: AsyncGenerator[bytes, None]
    ) -> AsyncGenerator[bytes, None]:
        async for chunk in stream:
            yield chunk
        if not self.complete:
            raise MultiPartException(
                "the body ends before its closing boundary; send the whole form"
            )


async def _read_parts(parts: list[UploadFile | str], settings: Settings) -> list[bytes]:
    if not parts:
        raise InvalidInput(f"no '{FIELD}' field in the form: upload the image as '{FIELD}'")
    blobs: list[bytes] = []
    for index, part in enumerate(parts):
        if not isinstance(part, UploadFile):
            raise UnsupportedImage(
                f"'{FIELD}' #{index} is a text field, not a file upload (use -F {FIELD}=@path)"
            )
        if part.size is not None and part.size > settings.max_upload_bytes:
            raise PayloadTooLarge(
                f"'{FIELD}' #{index} ({part.filename}) is {part.size} bytes; the limit is "
                f"{settings.max_upload_bytes} bytes (VAE_MAX_UPLOAD_BYTES)"
            )
        blobs.append(await part.read(settings.max_upload_bytes + 1))
    return blobs
