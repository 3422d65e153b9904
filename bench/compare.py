"""`python -m bench.compare BASE [NEW]`: two versions of the service side by side.

Each git revision is checked out into a temporary worktree and served by its own `python -m
app` on the same checkpoint, with the same settings; NEW defaults to this working tree. The
rounds of each case alternate between the two servers, so load from other jobs falls on both
alike: the ratio is what to read. Writes bench/results/compare-<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import machine
from bench.cli import BENCH_DIR, RESULTS_DIR, default_checkpoint, run_record, write_results
from bench.peers.section import GOALS
from bench.peers.section import build_cases as peer_cases
from bench.server import Server
from bench.serving import DEFAULT_ENV, FULL, Case, build_cases, digit_pngs, interleaved, peer_inputs

REPO_DIR = BENCH_DIR.parent
DEFAULT_CASES = ("sample_c1", "sample_c32", "floor_c32")


@contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """`revision` in a detached temporary worktree, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="vae-bench-compare-") as parent:
        folder = Path(parent) / "tree"
        subprocess.run(
            ["git", "-C", str(REPO_DIR), "worktree", "add", "--detach", "--quiet", str(folder),
             revision],
            check=True,
        )  # fmt: skip
        try:
            yield folder
        finally:
            subprocess.run(
                ["git", "-C", str(REPO_DIR), "worktree", "remove", "--force", str(folder)],
                check=False,
            )


def describe(revision: str | None) -> str:
    if revision is None:
        return "working tree"
    done = subprocess.run(
        ["git", "-C", str(REPO_DIR), "log", "-1", "--format=%h %s", revision],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def markdown(result: dict[str, Any]) -> str:
    base, new = result["base"], result["new"]
    lines = [
        f"Measured with `{result['command']}` on {result['date']}: "
        f"{machine.header(result['machine'])}.",
        "",
        f"base: {base} · new: {new} · {result['rounds']} interleaved rounds of "
        f"{result['duration_s']} s per case and server.",
        "",
    ]
    checkpoints = result.get("checkpoints", {})
    if checkpoints.get("base") != checkpoints.get("new"):
        lines += [
            f"Each serves its own checkpoint: base `{checkpoints['base']}`, new "
            f"`{checkpoints['new']}`.",
            "",
        ]
    lines += [
        "| case | base req/s | new req/s | new / base | base p50 / p99 ms | new p50 / p99 ms "
        "| base / new server CPU us/req |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in result["cases"].items():
        b, n = row["base"], row["new"]
        lines.append(
            f"| {name} | {b['req_s']:,.1f} | {n['req_s']:,.1f} | {row['ratio']:.2f}x "
            f"| {b['p50_ms']:.2f} / {b['p99_ms']:.2f} | {n['p50_ms']:.2f} / {n['p99_ms']:.2f} "
            f"| {b['server_cpu_us_per_req'] or 0:,.0f} / {n['server_cpu_us_per_req'] or 0:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument("base", help="git revision to compare against")
    parser.add_argument("new", nargs="?", help="git revision (default: this working tree)")
    parser.add_argument("--case", action="append", help="serving case (repeat); default: "
                        + ", ".join(DEFAULT_CASES))  # fmt: skip
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=FULL.duration_s)
    parser.add_argument("--checkpoint", type=Path, help="served by both (default: bench's own)")
    parser.add_argument(
        "--base-checkpoint",
        type=Path,
        help="served by BASE instead: for a revision that cannot load NEW's checkpoints (a "
        "model change), each side serves one trained by its own code",
    )
    parser.add_argument("--name", help="results file: compare-<name> (default: the revisions)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0:
        parser.error("--rounds and --duration must be positive")
    cases = build_cases(digit_pngs(16))
    # The peers section's v2 work as the project is asked for it, built (from the checkpoint's
    # model) only when asked for: v2_anomaly_json_c8, ...
    v2_cases = [f"v2_{name}" for name, (peer, _) in GOALS.items() if peer == "triton"]
    names = args.case or list(DEFAULT_CASES)
    unknown = [n for n in names if n not in cases and n not in v2_cases]
    if unknown:
        known = ", ".join([*cases, *v2_cases])
        parser.error(f"unknown case(s) {', '.join(unknown)}: choose from {known}")
    checkpoint = args.checkpoint or default_checkpoint(print)
    if any(name in v2_cases for name in names):
        for peer_case in peer_cases(checkpoint.resolve().name, *peer_inputs(checkpoint)):
            name = f"v2_{peer_case.name}"
            cases[name] = Case(name, peer_case.what, [peer_case.project], peer_case.concurrency)
    scale = replace(FULL, rounds=args.rounds, duration_s=args.duration)
    record = run_record("python -m bench.compare", argv)
    with ExitStack() as stack:
        base_dir = stack.enter_context(checkout(args.base))
        new_dir = stack.enter_context(checkout(args.new)) if args.new else REPO_DIR
        base_checkpoint = args.base_checkpoint or checkpoint
        base = stack.enter_context(Server(base_checkpoint, DEFAULT_ENV, cwd=base_dir))
        new = stack.enter_context(Server(checkpoint, DEFAULT_ENV, cwd=new_dir))
        plan = []
        for name in names:
            plan += [(base, cases[name], f"base {name}"), (new, cases[name], f"new {name}")]
        pooled = interleaved(plan, scale, print)
    rows: dict[str, Any] = {}
    for name in names:
        b, n = pooled[f"base {name}"].summary(), pooled[f"new {name}"].summary()
        ratio = n["req_s"] / b["req_s"] if b["req_s"] else float("nan")
        rows[name] = {"base": b, "new": n, "ratio": ratio}
    record["machine"]["load_average_at_end"] = machine.load_average()
    result = {
        **record,
        "base": describe(args.base),
        "new": describe(args.new),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "checkpoints": {"base": str(args.base_checkpoint or checkpoint), "new": str(checkpoint)},
        "cases": rows,
    }
    name = args.name or f"{args.base}-{args.new or 'worktree'}".replace("/", "_")
    text = markdown(result)
    written = write_results(args.out, f"compare-{name}", result, text)
    print(text)
    print(f"wrote {written}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
