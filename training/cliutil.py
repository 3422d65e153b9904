"""Pieces shared by the training CLIs: one-line errors and their exit code."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

# Bad input (flags, paths, data, checkpoints) exits with 2, like argparse's own usage errors.
EXIT_BAD_INPUT = 2


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `error: ...` line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def report_error(error: Exception, rank: int = 0) -> int:
    """Print `error: <message>` on stderr as one line (`rank N: error: ...` from a torchrun
    rank other than 0); return the bad-input exit code."""
    message = " ".join(str(error).split()) or type(error).__name__
    prefix = f"rank {rank}: " if rank else ""
    print(f"{prefix}error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT
