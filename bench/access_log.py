"""`python -m bench.access_log`: what the access log costs, off, as text and as JSON, side by side.

Three servers of the same checkpoint, VAE_ACCESS_LOG=off, text and json, each at VAE_LOG_LEVEL
info (the service's default, where access lines are written; the other benchmarks run at
warning, so without them) and writing its log to a file, as under a container runtime. The
rounds of each case alternate between the servers, so load from other jobs falls on all alike.
Then, in this process, the CPU one line costs in each mode, which the load of a shared machine
blurs far less. Writes bench/results/access-log.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.config
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from app.http.access_log import AccessLogMiddleware
from app.http.request_context import log_config
from bench import machine
from bench.cli import RESULTS_DIR, default_checkpoint, run_record, write_results
from bench.server import Server
from bench.serving import DEFAULT_ENV, FULL, build_cases, digit_pngs, interleaved

MODES = ("off", "text", "json")
DEFAULT_CASES = ("sample_c32",)
LINE_REQUESTS, LINE_REPEATS = 20_000, 3
# The request the in-process measure answers: /sample as the load generator sends it.
SCOPE: dict[str, Any] = {
    "type": "http",
    "http_version": "1.1",
    "method": "POST",
    "path": "/sample",
    "query_string": b"n=1&digit=7",
    "headers": [],
    "client": ("127.0.0.1", 50000),
}


async def _answer(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _answer_and_log_as_uvicorn(scope: Any, receive: Any, send: Any) -> None:
    await _answer(scope, receive, send)
    # The call uvicorn's protocol makes for each response when its access log is on.
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1:50000", "POST", "/sample?n=1&digit=7", "1.1", 200
    )


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b""}


async def _discard(message: Any) -> None:
    return None


def line_costs_us(requests: int = LINE_REQUESTS) -> dict[str, float]:
    """CPU microseconds per request, in this process, of an empty ASGI answer (off), the same
    with uvicorn's access line (text) and through AccessLogMiddleware (json): each mode with the
    service's logging config (its request id filter and formats), lines written to a file. The
    best of LINE_REPEATS runs."""
    apps = {
        "off": _answer,
        "text": _answer_and_log_as_uvicorn,
        "json": AccessLogMiddleware(_answer),
    }
    costs: dict[str, float] = {}
    with tempfile.TemporaryFile("w") as lines:
        for mode, app in apps.items():
            logging.config.dictConfig(log_config("info", mode))
            for name in ("uvicorn.access", "app.access"):
                for handler in logging.getLogger(name).handlers:
                    if isinstance(handler, logging.StreamHandler):
                        handler.setStream(lines)

            async def answer_all(app: Any = app) -> None:
                for _ in range(requests):
                    await app(dict(SCOPE), _receive, _discard)

            runs = []
            for _ in range(LINE_REPEATS):
                started = time.process_time()
                asyncio.run(answer_all())
                runs.append((time.process_time() - started) / requests * 1e6)
            costs[mode] = min(runs)
    return costs


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Measured with `{result['command']}` on {result['date']}: "
        f"{machine.header(result['machine'])}.",
        "",
        f"{result['rounds']} interleaved rounds of {result['duration_s']} s per case and server; "
        "VAE_LOG_LEVEL=info, each server's log to a file.",
        "",
        "| case | VAE_ACCESS_LOG | req/s | / off | p50 / p99 ms | server CPU us/req |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in result["cases"].items():
        for mode in MODES:
            row = rows[mode]
            lines.append(
                f"| {name} | {mode} | {row['req_s']:,.1f} | {row['ratio_to_off']:.2f}x "
                f"| {row['p50_ms']:.2f} / {row['p99_ms']:.2f} "
                f"| {row['server_cpu_us_per_req'] or 0:,.0f} |"
            )
    costs = result["line_cost_us"]
    lines += [
        "",
        f"In-process, CPU per request over an empty answer ({costs['off']:.1f} us), best of "
        f"{LINE_REPEATS} x {LINE_REQUESTS:,}: text +{costs['text'] - costs['off']:.1f} us, "
        f"json +{costs['json'] - costs['off']:.1f} us.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.access_log", description=__doc__)
    parser.add_argument("--case", action="append", help="serving case (repeat); default: "
                        + ", ".join(DEFAULT_CASES))  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=FULL.duration_s)
    parser.add_argument("--checkpoint", type=Path, help="served (default: bench's own)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--line-requests", type=int, default=LINE_REQUESTS, help="of the in-process measure"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or args.line_requests < 1:
        parser.error("--rounds and --duration must be positive")
    cases = build_cases(digit_pngs(16))
    names = args.case or list(DEFAULT_CASES)
    unknown = [name for name in names if name not in cases]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}: choose from {', '.join(cases)}")
    checkpoint = args.checkpoint or default_checkpoint(print)
    scale = replace(FULL, rounds=args.rounds, duration_s=args.duration)
    record = run_record("python -m bench.access_log", argv)
    with ExitStack() as stack:
        servers = {}
        for mode in MODES:
            env = {**DEFAULT_ENV, "VAE_LOG_LEVEL": "info", "VAE_ACCESS_LOG": mode}
            servers[mode] = stack.enter_context(Server(checkpoint, env))
        plan = [(servers[mode], cases[name], f"{mode} {name}") for name in names for mode in MODES]
        pooled = interleaved(plan, scale, print)
    rows: dict[str, Any] = {}
    for name in names:
        off = pooled[f"off {name}"].summary()["req_s"]
        rows[name] = {}
        for mode in MODES:
            summary = pooled[f"{mode} {name}"].summary()
            ratio = summary["req_s"] / off if off else float("nan")
            rows[name][mode] = {**summary, "ratio_to_off": ratio}
    costs = line_costs_us(args.line_requests)
    record["machine"]["load_average_at_end"] = machine.load_average()
    result = {
        **record,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "checkpoint": str(checkpoint),
        "cases": rows,
        "line_cost_us": costs,
    }
    text = markdown(result)
    written = write_results(args.out, "access-log", result, text)
    print(text)
    print(f"wrote {written}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
