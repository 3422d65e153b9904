"""Content codings on the v2 routes (app/http/content_coding.py): bodies inflated a bounded
chunk at a time, refused past the limit, and responses compressed as Accept-Encoding asks.
tritonclient's own compressed requests and responses are in test_v2.py."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import serve
from fastapi.testclient import TestClient
from starlette.exceptions import HTTPException
from starlette.types import Message

from app.http.content_coding import INFLATE_CHUNK, Inflater, accepted_codings

LIMIT = 1_000_000


def inflate(compressed: bytes, coding: str, *, pieces: int, limit: int = LIMIT) -> list[bytes]:
    """The body as an Inflater hands it on, from `compressed` sent in `pieces` messages."""
    size = -(-len(compressed) // pieces)
    messages: list[Message] = [
        {"type": "http.request", "body": compressed[i : i + size], "more_body": True}
        for i in range(0, len(compressed), size)
    ]
    messages[-1]["more_body"] = False

    async def receive() -> Message:
        return messages.pop(0)

    async def read_all() -> list[bytes]:
        inflater = Inflater(receive, coding, limit, "VAE_MAX_JSON_BYTES")
        chunks = []
        while True:
            message = await inflater.receive()
            chunks.append(message["body"])
            if not message["more_body"]:
                return chunks

    return asyncio.run(read_all())


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
@pytest.mark.parametrize("pieces", [1, 7])
def test_bodies_inflate_a_bounded_chunk_at_a_time(coding: str, pieces: int) -> None:
    body = b"".join(b'{"values": [%d]}' % i for i in range(40_000))  # ~700 KB of JSON
    compressed = gzip.compress(body) if coding == "gzip" else zlib.compress(body)
    chunks = inflate(compressed, coding, pieces=pieces)
    assert b"".join(chunks) == body
    assert max(map(len, chunks)) <= INFLATE_CHUNK
    assert len(chunks) > len(body) // INFLATE_CHUNK  # handed on in pieces, never whole


def test_a_bomb_stops_at_the_limit() -> None:
    """100 MB of zeros in ~100 KB: refused once a chunk past the limit comes out."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = b"".join(compressor.compress(bytes(2**20)) for _ in range(100)) + compressor.flush()
    assert len(bomb) < 200_000
    with pytest.raises(HTTPException) as refused:
        inflate(bomb, "gzip", pieces=3)
    assert refused.value.status_code == 413
    assert "over 1000000 bytes once inflated from gzip (VAE_MAX_JSON_BYTES)" in refused.value.detail


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        ("gzip, deflate, br", {"gzip", "deflate", "br"}),
        ("deflate;q=0.5, gzip;q=0", {"deflate"}),
        ("GZIP ; q=1.0", {"gzip"}),
        ("gzip;q=nonsense, deflate", {"deflate"}),
        ("", set()),
    ],
)
def test_accept_encoding_with_q_values(header: str, accepted: set[str]) -> None:
    assert accepted_codings(header) == accepted


@pytest.fixture(scope="module")
def client(trained_checkpoint: Path) -> Iterator[TestClient]:
    yield from serve(checkpoints=str(trained_checkpoint), device="cpu")


def test_v2_responses_are_compressed_as_asked_and_rest_ones_are_not(client: TestClient) -> None:
    statistics = "/v2/models/stats"  # some kilobytes of JSON
    plain = client.get(statistics, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    for coding in ("gzip", "deflate"):
        response = client.get(statistics, headers={"Accept-Encoding": coding})
        assert response.headers["content-encoding"] == coding
        sent = int(response.headers["content-length"])  # as sent, compressed
        assert sent < len(plain.content) / 2
        assert response.json() == plain.json()  # decoded by the client
    small = client.get("/v2/health/ready", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in small.headers  # under 500 bytes: not worth it
    rest = client.get("/models", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in rest.headers  # the REST API is left as it was


def test_a_compressed_v2_body_is_read_as_its_json(client: TestClient) -> None:
    model = client.get("/models").json()["default"]
    body = b'{"inputs": [], "parameters": {"n": 2, "seed": 4}}'
    answers = [
        client.post(f"/v2/models/{model}-sample/infer", content=content, headers=headers)
        for content, headers in (
            (body, {}),
            (gzip.compress(body), {"Content-Encoding": "gzip"}),
            (zlib.compress(body), {"Content-Encoding": "deflate"}),
        )
    ]
    assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers]
    assert answers[0].json() == answers[1].json() == answers[2].json()
