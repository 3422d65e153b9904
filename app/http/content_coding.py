"""Content codings on the v2 routes, as tritonclient uses them: gzip or deflate request bodies
(`request_compression_algorithm`) inflated within the body limit, and responses compressed
when Accept-Encoding asks (`response_compression_algorithm`)."""

from __future__ import annotations

import zlib

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.gzip import GZipResponder, IdentityResponder
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# zlib's window bits for each coding: gzip's header and trailer, or deflate's zlib wrapper
# (HTTP's "deflate" is the zlib format, RFC 9110 8.4.1.2, as tritonclient sends it).
GZIP_BITS = 16 + zlib.MAX_WBITS
WINDOW_BITS = {"gzip": GZIP_BITS, "x-gzip": GZIP_BITS, "deflate": zlib.MAX_WBITS}
# Inflated bytes handed on per message: a body of zeros inflates ~1000-fold, so one 64 KiB
# chunk of it must never be inflated whole.
INFLATE_CHUNK = 64 * 1024
# Responses smaller than this go uncompressed (Starlette's GZipMiddleware's default).
MINIMUM_SIZE = 500
# zlib's fastest level: 16 images as JSON (272 KB) shrink to 49% in 3.7 ms at it, to 46% in
# 22 ms at zlib's default (6) and 33 ms at GZipMiddleware's (9); in binary (50 KB of floats)
# they shrink by 2% at any level.
COMPRESS_LEVEL = 1
THREAD_MINIMUM_SIZE = 128 * 1024  # larger responses are compressed off the event loop


class ContentCodingMiddleware:
    """For paths under `prefix`: inflates a gzip or deflate body (415 for other codings, 413
    once it inflates past `limit` bytes, 400 when it is not valid data of its coding), and
    compresses the response in the coding Accept-Encoding prefers, gzip or deflate."""

    def __init__(self, app: ASGIApp, *, prefix: str, limit: int, setting: str) -> None:
        self.app = app
        self.prefix = prefix
        self.limit = limit
        self.setting = setting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (
            path == self.prefix or path.startswith(self.prefix + "/")
        ):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        coding = headers.get("content-encoding", "identity").strip().lower()
        if coding != "identity":
            # The app sees the inflated body, whose length the client could not say.
            stripped = {b"content-encoding", b"content-length"}
            scope = {**scope, "headers": [h for h in scope["headers"] if h[0] not in stripped]}
            receive = Inflater(receive, coding, self.limit, self.setting).receive
        await _responder(self.app, headers.get("accept-encoding", ""))(scope, receive, send)


def _responder(app: ASGIApp, accept_encoding: str) -> ASGIApp:
    accepted = accepted_codings(accept_encoding)
    if "gzip" in accepted:
        return GZipResponder(app, MINIMUM_SIZE, compresslevel=COMPRESS_LEVEL)
    if "deflate" in accepted:
        return DeflateResponder(app, MINIMUM_SIZE)
    return app


def accepted_codings(accept_encoding: str) -> set[str]:
    """The codings an Accept-Encoding header accepts (a q-value of 0 refuses one)."""
    accepted = set()
    for item in accept_encoding.lower().split(","):
        name, *options = (part.strip() for part in item.split(";"))
        refused = False
        for option in options:
            key, _, value = option.partition("=")
            if key.strip() == "q":
                try:
                    refused = float(value) <= 0
                except ValueError:
                    refused = True
        if name and not refused:
            accepted.add(name)
    return accepted


class DeflateResponder(IdentityResponder):
    """Starlette's GZipResponder with the zlib format instead of gzip's."""

    content_encoding = "deflate"

    def __init__(self, app: ASGIApp, minimum_size: int) -> None:
        super().__init__(app, minimum_size)
        self.compressor = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, zlib.MAX_WBITS)

    async def apply_compression(self, body: bytes, *, more_body: bool) -> bytes:
        if len(body) >= THREAD_MINIMUM_SIZE:
            return await run_in_threadpool(self._compress, body, more_body)
        return self._compress(body, more_body)

    def _compress(self, body: bytes, more_body: bool) -> bytes:
        flush = zlib.Z_SYNC_FLUSH if more_body else zlib.Z_FINISH
        return self.compressor.compress(body) + self.compressor.flush(flush)


class Inflater:
    """A receive() that hands on the inflated body, at most INFLATE_CHUNK bytes at a time, so
    that a small body inflating to gigabytes costs no more memory than the limit allows."""

    def __init__(self, receive: Receive, coding: str, limit: int, setting: str) -> None:
        self._receive = receive
        self._coding = coding
        self._limit = limit
        self._setting = setting
        self._inflate = zlib.decompressobj(WINDOW_BITS.get(coding, zlib.MAX_WBITS))
        self._tail = b""  # received bytes not inflated yet
        self._more = True  # the client has more of the body to send
        self._inflated = 0
        self._done = False

    async def receive(self) -> Message:
        """The next part of the inflated body; raised inside the app's body read, the errors
        are answered (and counted) by the app's handlers."""
        if self._coding not in WINDOW_BITS:
            raise HTTPException(
                415,
                f"Content-Encoding {self._coding!r} is not taken here; send the body as it is, "
                "or compressed with gzip or deflate",
                headers={"Connection": "close"},  # the body is never read
            )
        if self._done:  # after the body, receive() only reports a disconnect
            return await self._receive()
        while True:
            if not self._tail and self._more:
                message = await self._receive()
                if message["type"] != "http.request":
                    return message
                self._tail = message.get("body", b"")
                self._more = message.get("more_body", False)
            try:
                chunk = self._inflate.decompress(self._tail, INFLATE_CHUNK)
            except zlib.error as exc:
                raise self._invalid(str(exc)) from None
            self._tail = self._inflate.unconsumed_tail
            self._inflated += len(chunk)
            if self._inflated > self._limit:
                raise HTTPException(
                    413,
                    f"request body over {self._limit} bytes once inflated from {self._coding} "
                    f"({self._setting}); send less",
                    headers={"Connection": "close"},  # the rest is never read
                )
            if chunk:
                return {"type": "http.request", "body": chunk, "more_body": True}
            if not self._more and not self._tail:  # all of it received and inflated
                if not self._inflate.eof:
                    raise self._invalid("it ends before the end of its compressed data")
                if self._inflate.unused_data:
                    raise self._invalid("it has bytes after the end of its compressed data")
                self._done = True
                return {"type": "http.request", "body": b"", "more_body": False}

    def _invalid(self, problem: str) -> HTTPException:
        return HTTPException(
            400,
            f"the body is not valid {self._coding} data ({problem}); send it as "
            "Content-Encoding says, or without Content-Encoding",
            headers={"Connection": "close"},  # the rest is never read
        )
