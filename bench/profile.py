"""`python -m bench.profile`: py-spy samples of the server while one case's load runs.

Writes the collapsed stacks (for flamegraph tools) and a flame graph to bench/.cache/profile/,
and prints the functions that hold the most samples, inclusive and self.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench.cli import CACHE_DIR, default_checkpoint
from bench.loadgen import closed_loop
from bench.server import Server
from bench.serving import build_cases, digit_pngs

PROFILE_DIR = CACHE_DIR / "profile"
# Leaf frames of threads that wait: py-spy's idle detection does not always see them as idle.
WAITING = (
    "Condition.wait (",
    "EpollSelector.select (",
    "_worker (concurrent/futures/thread.py:81)",
)


def summarize(collapsed: Path, top: int) -> str:
    """The `top` functions by inclusive and by self samples, from py-spy's raw format."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")[1:]  # the first frame names the thread
        if frames and frames[-1].startswith(WAITING):
            continue
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        if frames:
            own[frames[-1]] += count
    lines = [f"{total} samples (threads not waiting)", "", "inclusive:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(top)]
    lines += ["", "self:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--case", default="sample_c32", help="a serving case name")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--gil", action="store_true", help="only sample the thread holding the GIL")
    parser.add_argument("--native", action="store_true", help="include native (C/C++) frames")
    parser.add_argument(
        "--env", action="append", default=[], metavar="VAE_X=V", help="server setting"
    )
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        parser.error("py-spy is not installed: pip install -e '.[bench]'")
    cases = build_cases(digit_pngs(16))
    if args.case not in cases:
        parser.error(f"unknown case {args.case!r}: choose from {', '.join(cases)}")
    case = cases[args.case]
    checkpoint = args.checkpoint or default_checkpoint(print)
    env = dict(item.split("=", 1) for item in args.env)
    env.setdefault("VAE_ENABLE_BENCH_ROUTES", "true")
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    collapsed = PROFILE_DIR / f"{args.case}.txt"
    with Server(checkpoint, env) as server:
        record = [
            py_spy, "record", "--pid", str(server.pid), "--rate", str(args.rate),
            "--duration", str(int(args.seconds)), "--nonblocking", "--threads",
        ]  # fmt: skip
        record += ["--gil"] if args.gil else []
        record += ["--native"] if args.native else []
        flame = subprocess.Popen(
            [*record, "--format", "flamegraph", "-o", str(collapsed.with_suffix(".svg"))]
        )
        raw = subprocess.Popen([*record, "--format", "raw", "-o", str(collapsed)])
        result: list[float] = []

        def load() -> None:
            run = closed_loop(
                server.port,
                case.requests,
                concurrency=case.concurrency,
                duration_s=args.seconds,
                max_requests=10**9,
            )
            result.append(asyncio.run(run).summary()["req_s"])

        worker = threading.Thread(target=load)
        worker.start()
        worker.join()
        raw.wait(60)
        flame.wait(60)
    print(f"{args.case}: {result[0]:.0f} req/s while profiled")
    print(summarize(collapsed, args.top))
    print(f"\nwrote {collapsed} and {collapsed.with_suffix('.svg')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
