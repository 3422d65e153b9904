"""`python -m bench`: run the benchmark sections side by side, print and write the results."""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import machine, report, serving, train_speed
from models import CheckpointError

SECTIONS = ("serving", "peers", "batching", "workers", "startup", "training")
BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = BENCH_DIR / ".cache"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the service and training side by side on this machine; print a "
        "table and write bench/results/<name>.json and .md. Loopback traffic only.",
    )
    parser.add_argument(
        "sections",
        nargs="*",
        metavar="SECTION",
        help=f"sections to run (default: all of {', '.join(SECTIONS)}); serving includes the "
        "floor and the naive baseline",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="checkpoint folder to serve (default: train the default preset into "
        f"{CACHE_DIR.name}/default once)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny durations and counts (a smoke test of the suite, not a measurement)",
    )
    parser.add_argument("--duration", type=float, help="seconds per case per round")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per case")
    parser.add_argument("--name", help="results file name (default: latest, or quick)")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"results folder (default: bench/{RESULTS_DIR.name}, or bench/{CACHE_DIR.name}/"
        f"{RESULTS_DIR.name} for --quick, whose numbers are not measurements)",
    )
    return parser


def default_checkpoint(log: Any) -> Path:
    """bench/.cache/default, trained with the default preset on first use, and again when the
    default preset's model has changed since."""
    from models import VAEConfig
    from models.checkpoint import read_metadata
    from training.config import TrainConfig

    def architecture(config: VAEConfig) -> dict[str, Any]:
        # decoder_temperature is fitted after training, not chosen by the preset.
        return {k: v for k, v in config.to_dict().items() if k != "decoder_temperature"}

    target = CACHE_DIR / "default"
    wanted = architecture(TrainConfig.from_preset("default").model_config())
    if (target / "config.json").is_file():
        try:
            cached = architecture(VAEConfig.from_dict(read_metadata(target)["model"]))
        except (CheckpointError, TypeError, ValueError):
            cached = None
        if cached == wanted:
            return target
        log(f"{target} holds another model than the default preset's now: retraining it")
    from training.cli import main as train

    log(f"training the default preset into {target} (once)")
    # The serving benchmarks need the model, not its judged sample quality or a tight IWAE.
    argv = ["--preset", "default", "--out", str(target), "--no-progress", "--no-sample-quality"]
    if train([*argv, "--iwae-k", "1"]):
        raise SystemExit(f"error: training the default checkpoint into {target} failed")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}: choose from {', '.join(SECTIONS)}")
    sections = args.sections or list(SECTIONS)
    scale = serving.QUICK if args.quick else serving.FULL
    if args.duration is not None:
        scale = replace(scale, duration_s=args.duration)
    if args.rounds is not None:
        scale = replace(scale, rounds=args.rounds)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    results: dict[str, Any] = {
        **run_record("python -m bench", argv),
        "scale": asdict(scale),
        "quick": args.quick,
    }
    log(machine.header(results["machine"]))
    needs_server = any(s in sections for s in SECTIONS if s != "training")
    checkpoint = None
    if needs_server:
        checkpoint = args.checkpoint or default_checkpoint(log)
        results["checkpoint"] = str(checkpoint)
    if checkpoint is not None:
        pool = serving.Pool(checkpoint)
        try:
            if "serving" in sections:
                results["serving"] = serving.serving(pool, scale, log)
            if "peers" in sections:
                results["peers"] = run_peers(pool, checkpoint, scale, log)
            if "batching" in sections:
                results["batching"] = serving.batching(pool, scale, log)
            if "workers" in sections:
                results["workers"] = serving.workers(pool, scale, log)
                results["workers_choice"] = report.choose_workers(results)
        finally:
            pool.close()
        results["server_startups_s"] = pool.startups
        if "startup" in sections:
            results["startup"] = serving.startup_and_soak(checkpoint, scale, log)
    if "training" in sections:
        log("training: CPU epochs, project loop vs seed-style loop")
        results["training"] = {"cpu": train_speed.cpu(scale.train_epochs, scale.train_images)}
        log("training: GPU section")
        results["training"]["gpu"] = train_speed.gpu(scale.train_epochs)
    results["machine"]["load_average_at_end"] = machine.load_average()
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["targets"] = report.targets(results)
    text = report.markdown(results)
    name = args.name or ("quick" if args.quick else "latest")
    out = args.out or (CACHE_DIR / RESULTS_DIR.name if args.quick else RESULTS_DIR)
    written = write_results(out, name, results, text)
    print(text)
    log(f"wrote {written}.json and .md")
    return 0


def run_peers(
    pool: serving.Pool, checkpoint: Path, scale: serving.Scale, log: Any
) -> dict[str, Any]:
    """The peers section beside the pool's server with the default settings."""
    from bench.peers.section import peers

    with pool.servers({"project": {}}) as started:
        log("peers: the project beside LitServe and Triton on the same checkpoint and work")
        return peers(started["project"], checkpoint, serving.peer_inputs(checkpoint), scale, log)


def run_record(prog: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """What every results file starts with: the command that made it, when, and where."""
    arguments = list(argv if argv is not None else sys.argv[1:])
    return {
        "command": shlex.join([*prog.split(), *arguments]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine.describe(),
    }


def write_results(out: Path, name: str, results: dict[str, Any], text: str) -> Path:
    """`out`/`name`.json (NaN and infinity as null) and `out`/`name`.md; returns `out`/`name`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(_finite(results), indent=2) + "\n")
    (out / f"{name}.md").write_text(text)
    return out / name


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: those become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
