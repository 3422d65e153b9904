"""bench/serving.py: a case the service lacks is skipped, a case the service breaks fails."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.loadgen import Request
from bench.server import Server, ServerError
from bench.serving import Case, _probe

SIMILAR = Case(
    "similar_1_c8", "POST /similar", [Request("POST", "/similar?k=8", b"x", "image/png")], 8
)


@pytest.fixture
def answering(request: pytest.FixtureRequest) -> Iterator[Server]:
    """A loopback HTTP server answering every POST with the status in the test's parameter,
    behind a bench Server (never started) that points at its port."""
    status: int = request.param

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = b'{"detail": "x"}'
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=http.serve_forever)
    thread.start()
    server = Server(Path("unused"))
    server.port = http.server_address[1]
    try:
        yield server
    finally:
        server.stop()
        http.shutdown()
        thread.join()
        http.server_close()


@pytest.mark.parametrize("answering", [200], indirect=True)
def test_an_answering_endpoint_is_measured(answering: Server) -> None:
    assert _probe(answering, SIMILAR) is None


@pytest.mark.parametrize(
    ("answering", "reason"),
    [(404, "no such endpoint"), (400, "no latent index")],
    indirect=["answering"],
)
def test_a_missing_endpoint_or_index_is_a_skip(answering: Server, reason: str) -> None:
    assert reason in (_probe(answering, SIMILAR) or "")


@pytest.mark.parametrize("answering", [500, 503, 422], indirect=True)
def test_a_failing_endpoint_fails_the_suite(answering: Server) -> None:
    with pytest.raises(
        ServerError, match=r"POST /similar\?k=8 answered \d{3} .*broken, not missing"
    ):
        _probe(answering, SIMILAR)
