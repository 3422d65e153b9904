"""OpenTelemetry tracing (app/tracing.py, app/http/trace_context.py, the batcher's spans): the
span tree of real HTTP requests, read from the SDK's in-memory exporter of a server running in
this process; and the OTEL_* variables as `python -m app` reads them."""

from __future__ import annotations

import http.server
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import httpx2
import pytest
import torch
import uvicorn
from app_testing import (
    REPO,
    clean_environment,
    free_port,
    png_of,
    post_uploads_together,
    start_app,
    stop_app,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id

from app.main import create_app
from app.settings import Settings
from app.tracing import TracingError, exporter_names, exporters, provider_from_env

pytestmark = pytest.mark.slow

BATCH_WAIT_MS = 600  # long enough that two requests sent at once share one forward pass


class Traced:
    """A live server whose spans land in `exporter`."""

    def __init__(self, base: str, exporter: InMemorySpanExporter) -> None:
        self.base = base
        self.exporter = exporter

    def trace(self, trace_id: int, until: str, count: int = 1) -> list[ReadableSpan]:
        """The finished spans of `trace_id`, once `count` spans named `until` are among them
        (the server span ends after its response is sent)."""
        deadline = time.monotonic() + 10
        while True:
            spans = [
                span
                for span in self.exporter.get_finished_spans()
                if span.context is not None and span.context.trace_id == trace_id
            ]
            if sum(span.name == until for span in spans) >= count:
                return spans
            assert time.monotonic() < deadline, [span.name for span in spans]
            time.sleep(0.05)


@pytest.fixture(scope="module")
def traced(trained_checkpoint: Path) -> Iterator[Traced]:
    """The app under uvicorn on a loopback port, in a thread, tracing into memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = Settings(
        checkpoints=str(trained_checkpoint), device="cpu", max_batch_wait_ms=BATCH_WAIT_MS
    )
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, tracer_provider=provider),
        host="127.0.0.1",
        port=port,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        try:
            if httpx2.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx2.TransportError:
            pass
        time.sleep(0.1)
    yield Traced(base, exporter)
    server.should_exit = True
    thread.join(30)
    provider.shutdown()


def traceparent() -> tuple[int, int, str]:
    """A client's new trace id, its span id and the W3C header carrying both (sampled)."""
    trace_id, span_id = secrets.randbits(128), secrets.randbits(64)
    return trace_id, span_id, f"00-{format_trace_id(trace_id)}-{format_span_id(span_id)}-01"


def named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def only(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    (span,) = named(spans, name)
    return span


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def test_a_request_continues_the_client_trace_through_every_stage(traced: Traced) -> None:
    trace_id, client_span, header = traceparent()
    response = httpx2.post(
        f"{traced.base}/sample?n=3&digit=7",
        headers={"traceparent": header, "X-Request-ID": "traced-sample"},
        timeout=30,
    )
    assert response.status_code == 200
    spans = traced.trace(trace_id, until="POST /sample")

    server = only(spans, "POST /sample")
    assert server.kind == SpanKind.SERVER
    assert server.parent is not None and server.parent.is_remote
    assert server.parent.span_id == client_span  # the client's span is the server span's parent
    assert server.attributes is not None
    assert server.attributes["http.route"] == "/sample"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["vae.request_id"] == "traced-sample"
    # The response names the trace and the server span (W3C traceresponse).
    assert response.headers["traceresponse"] == (
        f"00-{format_trace_id(trace_id)}-{format_span_id(span_id(server))}-01"
    )

    queue, batch, encode = (only(spans, n) for n in ("queue wait", "batch", "encode response"))
    model_pass = only(spans, "model pass")
    assert {parent_id(queue), parent_id(batch), parent_id(encode)} == {span_id(server)}
    assert parent_id(model_pass) == span_id(batch)
    assert batch.attributes is not None and model_pass.attributes is not None
    assert batch.attributes["vae.batch.size"] == 3
    assert batch.attributes["vae.batch.requests"] == 1
    assert [link.context.span_id for link in batch.links] == [span_id(server)]
    assert model_pass.attributes["vae.images"] == 3
    # The stages nest in time: the queue wait (the batch wait included) ends as the batch starts,
    # and the model pass lies within the batch, the batch within the request.
    assert queue.end_time is not None and batch.start_time is not None
    assert queue.end_time <= batch.start_time
    assert (queue.end_time - queue.start_time) / 1e9 >= BATCH_WAIT_MS / 1000 * 0.9  # type: ignore[operator]
    for inner, outer in ((model_pass, batch), (batch, server), (encode, server)):
        assert outer.start_time <= inner.start_time  # type: ignore[operator]
        assert inner.end_time <= outer.end_time  # type: ignore[operator]


def test_one_batch_span_links_every_request_it_served(
    traced: Traced, mnist_test: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Two uploads sent at once (1 and 2 images): one batch of 3 images, linked to both."""
    images, _ = mnist_test
    uploads = [[png_of(images[0])], [png_of(images[1]), png_of(images[2])]]
    clients = [traceparent() for _ in uploads]
    statuses = post_uploads_together(
        traced.base, uploads, [{"traceparent": header} for _, _, header in clients]
    )
    assert statuses == [200, 200]
    traces = [traced.trace(trace_id, until="POST /anomaly-score") for trace_id, _, _ in clients]
    servers = [only(spans, "POST /anomaly-score") for spans in traces]
    for spans, server, upload in zip(traces, servers, uploads, strict=True):
        decode = only(spans, "decode upload")
        assert parent_id(decode) == span_id(server)
        assert decode.attributes is not None and decode.attributes["vae.images"] == len(upload)
        assert parent_id(only(spans, "queue wait")) == span_id(server)
        assert parent_id(only(spans, "encode response")) == span_id(server)
    (batch,) = [span for spans in traces for span in named(spans, "batch")]
    assert batch.attributes is not None
    assert batch.attributes["vae.batch.size"] == 3
    assert batch.attributes["vae.batch.requests"] == 2
    # One batch, two requests: it links to both server spans, and its parent is one of them.
    assert {link.context.span_id for link in batch.links} == {span_id(s) for s in servers}
    assert parent_id(batch) in {span_id(s) for s in servers}
    (model_pass,) = [span for spans in traces for span in named(spans, "model pass")]
    assert parent_id(model_pass) == span_id(batch)


def test_without_traceparent_each_request_starts_a_trace(traced: Traced) -> None:
    answers = [httpx2.get(f"{traced.base}/healthz", timeout=10) for _ in range(2)]
    trace_ids = [answer.headers["traceresponse"].split("-")[1] for answer in answers]
    assert len(set(trace_ids)) == 2
    spans = traced.trace(int(trace_ids[0], 16), until="GET /healthz")
    assert only(spans, "GET /healthz").parent is None


def test_tracing_is_off_unless_an_exporter_is_named() -> None:
    assert exporter_names({}) == []
    assert exporter_names({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert exporter_names({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}) == []
    assert provider_from_env({}) is None
    assert exporter_names({"OTEL_TRACES_EXPORTER": "console,otlp"}) == ["console", "otlp"]
    assert len(exporters({"OTEL_TRACES_EXPORTER": "console,otlp"})) == 2
    with pytest.raises(TracingError, match=r"'nope'.*installed: .*console"):
        exporters({"OTEL_TRACES_EXPORTER": "nope"})
    with pytest.raises(TracingError, match="not an OTLP protocol"):
        exporters({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})


def console_spans(text: str) -> list[dict[str, Any]]:
    """The spans the console exporter printed (indented JSON objects) among the log lines."""
    decoder = json.JSONDecoder()
    spans, position = [], text.find("{\n")
    while position >= 0:
        span, end = decoder.raw_decode(text, position)
        spans.append(span)
        position = text.find("{\n", end)
    return spans


def test_the_readme_console_exporter_command(trained_checkpoint: Path, tmp_path: Path) -> None:
    """OTEL_TRACES_EXPORTER=console OTEL_SERVICE_NAME=vae-digits python -m app, as the README
    runs it: a request's spans are printed, in the client's trace, under that service name."""
    app = start_app(
        tmp_path / "server.log",
        ready_within_s=120,
        settings={"checkpoints": str(trained_checkpoint), "device": "cpu"},
        environment={"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "vae-digits"},
    )
    try:
        trace_id = traced_sample(app.base)
    finally:
        stop_app(app, graceful=True)  # the shutdown flushes what is left
    spans = [
        span
        for span in console_spans(app.log.read_text())
        if span["context"]["trace_id"] == f"0x{format_trace_id(trace_id)}"
    ]
    names = {span["name"] for span in spans}
    assert {"POST /sample", "queue wait", "batch", "model pass", "encode response"} <= names
    assert {span["resource"]["attributes"]["service.name"] for span in spans} == {"vae-digits"}


def traced_sample(base: str) -> int:
    """POST /sample?digit=7 under a fresh client trace (it must answer 200); the trace id."""
    trace_id, _, header = traceparent()
    answer = httpx2.post(f"{base}/sample?digit=7", headers={"traceparent": header}, timeout=30)
    assert answer.status_code == 200
    return trace_id


class Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: keeps each POST /v1/traces body (protobuf) in `received`."""

    received: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/traces":
            self.received.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return None


def test_the_readme_otlp_command_exports_to_a_collector(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    """OTEL_TRACES_EXPORTER=otlp OTEL_EXPORTER_OTLP_ENDPOINT=http://HOST:PORT python -m app: the
    spans reach an OTLP/HTTP receiver as protobuf, in the client's trace."""
    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    app = start_app(
        tmp_path / "server.log",
        ready_within_s=120,
        settings={"checkpoints": str(trained_checkpoint), "device": "cpu"},
        environment={"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint},
    )
    try:
        trace_id = traced_sample(app.base)
    finally:
        stop_app(app, graceful=True)  # the shutdown flushes what is left
        collector.shutdown()
        collector.server_close()
    names = set()
    for body in Collector.received:
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    if int.from_bytes(span.trace_id, "big") == trace_id:
                        names.add(span.name)
    assert {"POST /sample", "queue wait", "batch", "model pass", "encode response"} <= names


def test_an_unknown_exporter_stops_startup(trained_checkpoint: Path) -> None:
    env = {**clean_environment(), "OTEL_TRACES_EXPORTER": "nope"}
    env["VAE_CHECKPOINTS"] = str(trained_checkpoint)
    done = subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "error: OTEL_TRACES_EXPORTER='nope'" in done.stderr
