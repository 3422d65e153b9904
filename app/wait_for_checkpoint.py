"""`python -m app.wait_for_checkpoint`: wait until the checkpoint to serve exists, then exit 0
or exec the given command: for pods whose checkpoint a separate training Job writes.

A checkpoint save is atomic (the folder appears whole), so `config.json` in the first folder of
VAE_CHECKPOINTS means the whole checkpoint is there. On Kubernetes the api pods run this as an
init container; KServe's runtime, which has no init containers of its own, runs it with
`--then python -m app`. Giving up after the deadline exits 1 with what to do.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m app.wait_for_checkpoint", description=__doc__)
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=float(os.environ.get("WAIT_FOR_CHECKPOINT_S", "3600")),
        help="give up after this long (default: $WAIT_FOR_CHECKPOINT_S, else 3600)",
    )
    parser.add_argument("--poll-s", type=float, default=10.0, help="how often to look")
    parser.add_argument(
        "--then",
        nargs=argparse.REMAINDER,
        default=[],
        help="the command to exec once the checkpoint is there (the rest of the line)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    folders = os.environ.get("VAE_CHECKPOINTS", "")
    if not folders.strip():
        print("error: VAE_CHECKPOINTS is not set: nothing to wait for", file=sys.stderr)
        return 2
    config = Path(folders.split(",")[0].strip()) / "config.json"
    deadline = time.monotonic() + args.timeout_s
    while not config.is_file():
        if time.monotonic() >= deadline:
            print(
                f"error: no checkpoint at {config} after {args.timeout_s:.0f} s: run the "
                "training Job (deploy/README.md)",
                file=sys.stderr,
            )
            return 1
        print(f"waiting for {config}: the training Job writes it", flush=True)
        time.sleep(min(args.poll_s, max(deadline - time.monotonic(), 0.0)))
    print(f"found {config}", flush=True)
    if args.then:
        os.execvp(args.then[0], args.then)
    return 0


if __name__ == "__main__":
    sys.exit(main())
