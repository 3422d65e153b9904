"""Hostile requests through the app in process: every one answered with a 4xx, quickly.

Bounded memory is checked over the wire, on a real server's peak RSS, in
test_robustness_server.py; here each request is built to cost the server as much as it can.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from app_testing import files, png_of
from fastapi.testclient import TestClient

pytestmark = pytest.mark.slow

BOUNDARY = "hostile"
MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
JSON = {"content-type": "application/json"}


def part_head(name: str = "file", filename: str = "a.png") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()


def chunks(head: bytes, filler: bytes, total: int, tail: bytes = b"") -> Iterator[bytes]:
    """`head`, then `filler` repeated up to `total` bytes, then `tail`: sent chunked, with no
    Content-Length for the server to refuse up front."""
    yield head
    sent = len(head)
    while sent < total:
        yield filler
        sent += len(filler)
    if tail:
        yield tail


def test_a_thousand_files_are_refused_with_413_quickly(client: TestClient) -> None:
    digit = png_of(torch.zeros(1, 28, 28))
    started = time.perf_counter()
    response = client.post("/anomaly-score", files=files(*[digit] * 1000))
    assert response.status_code == 413
    assert "at most 64" in response.json()["detail"]
    assert time.perf_counter() - started < 5


def test_a_part_without_its_closing_boundary_is_a_422(client: TestClient) -> None:
    body = part_head() + png_of(torch.zeros(1, 28, 28)) + b"\x00" * 4096  # and no --boundary--
    response = client.post("/encode", content=body, headers=MULTIPART)
    assert response.status_code == 422
    # Refused, and the part's spooled file closed (pytest fails on an unclosed-file warning).
    assert "closing boundary" in response.json()["detail"]


def test_an_endless_part_is_cut_off_at_the_body_limit(limits_client: TestClient) -> None:
    # limits_client: 3 files of 2000 bytes at most, so the multipart limit is about 1 MB.
    body = chunks(part_head(), b"\x00" * 65536, total=8 * 2**20)
    response = limits_client.post("/encode", content=body, headers=MULTIPART)
    assert response.status_code == 413
    assert "request body over" in response.json()["detail"]


def test_an_over_long_part_header_is_a_422(client: TestClient) -> None:
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            + "X-Padding: "
            + "a" * 2_000_000
            + "\r\n\r\n"
        ).encode()
        + png_of(torch.zeros(1, 28, 28))
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    response = client.post("/encode", content=body, headers=MULTIPART)
    assert response.status_code == 422
    assert "malformed multipart" in response.json()["detail"]


def test_many_text_fields_are_refused(client: TestClient) -> None:
    fields = b"".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n'.encode()
        for i in range(1000)
    )
    response = client.post(
        "/encode", content=fields + f"--{BOUNDARY}--\r\n".encode(), headers=MULTIPART
    )
    assert response.status_code == 422


def test_a_huge_json_body_is_413_from_its_content_length(client: TestClient) -> None:
    body = b'{"z": [[' + b"0.0," * 1_500_000 + b"0.0]]}"  # 6 MB, over the 4 MiB JSON limit
    response = client.post("/decode", content=body, headers=JSON)
    assert response.status_code == 413


def test_a_huge_chunked_json_body_is_413_while_it_streams(client: TestClient) -> None:
    body = chunks(b'{"z": [[', b"0.0," * 16384, total=64 * 2**20, tail=b"0.0]]}")
    started = time.perf_counter()
    response = client.post("/decode", content=body, headers=JSON)
    assert response.status_code == 413
    assert time.perf_counter() - started < 10  # refused at 4 MiB, not after 64


@pytest.mark.parametrize("depth", [100_000, 1_000_000])
def test_deeply_nested_json_is_a_4xx(client: TestClient, depth: int) -> None:
    body = b'{"z": ' + b"[" * depth + b"]" * depth + b"}"
    response = client.post("/decode", content=body, headers=JSON)
    assert response.status_code == 400
    assert "parsing the body" in response.json()["detail"]


def test_nested_objects_inside_a_valid_field_are_a_4xx(client: TestClient) -> None:
    depth = 200_000
    body = b'{"start": ' + b'{"z": ' * depth + b"1" + b"}" * depth + b', "end": {"digit": 1}}'
    response = client.post("/interpolate", content=body, headers=JSON)
    assert response.status_code == 400


def test_moderately_nested_json_gets_a_short_422(client: TestClient) -> None:
    depth = 500  # parses, then fails validation
    body = b'{"z": ' + b"[" * depth + b"]" * depth + b"}"
    response = client.post("/decode", content=body, headers=JSON)
    assert response.status_code == 422
    assert len(response.content) < 16_384


def test_a_json_body_of_many_bad_values_gets_a_short_422(client: TestClient) -> None:
    body = b'{"z": [[' + b'"x",' * 500_000 + b'"x"]]}'  # 2 MB of 500k errors
    response = client.post("/decode", content=body, headers=JSON)
    assert response.status_code == 422
    assert len(response.content) < 64 * 1024


def test_a_million_bad_values_are_refused_without_validating_them_all(
    client: TestClient,
) -> None:
    row = b"[" + b",".join([b'"x"'] * 1000) + b"]"
    body = b'{"z": [' + b",".join([row] * 1000) + b"]}"  # 4 MB, 1M bad values
    started = time.perf_counter()
    response = client.post("/decode", content=body, headers=JSON)
    assert response.status_code == 422
    assert len(response.json()["detail"]) == 1  # validation stopped at the first
    assert time.perf_counter() - started < 5  # 1M errors took about 9 s and 1 GB
