"""Per-model inference statistics as Triton's statistics extension counts them: requests that
succeeded or failed, time queued and computing, forward passes by batch size; per process."""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Duration:
    """A count and the nanoseconds they took together (Triton's $duration_stat)."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def describe(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class Compute:
    """The three stages of a forward pass: joining the batch's inputs, the pass itself (device
    copies included), slicing each request's outputs from the batch's."""

    input: Duration = field(default_factory=Duration)
    infer: Duration = field(default_factory=Duration)
    output: Duration = field(default_factory=Duration)

    def add(self, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.input.add(input_ns)
        self.infer.add(infer_ns)
        self.output.add(output_ns)

    def describe(self) -> dict[str, dict[str, int]]:
        return {
            "compute_input": self.input.describe(),
            "compute_infer": self.infer.describe(),
            "compute_output": self.output.describe(),
        }


@dataclass
class InferenceStats:
    """One served model's counters since it was loaded, in this process. Every update happens on
    the event loop's thread, so they need no lock; each is a few integer additions."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: Compute = field(default_factory=Compute)  # per request: its passes' times
    inference_count: int = 0  # rows (images, latents) of successful requests
    execution_count: int = 0  # forward passes that ran any of its requests
    last_inference_ms: int = 0
    batches: dict[int, Compute] = field(default_factory=dict)  # by batch size, per pass

    def finished(self, ns: int, *, rows: int | None) -> None:
        """A request ended after `ns`: successful with `rows` rows, or failed (rows None)."""
        if rows is None:
            self.fail.add(ns)
        else:
            self.success.add(ns)
            self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000

    def describe(self, name: str, version: str) -> dict[str, Any]:
        """Triton's $model_stat."""
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.describe(),
                "fail": self.fail.describe(),
                "queue": self.queue.describe(),
                **self.compute.describe(),
                "cache_hit": Duration().describe(),  # no response cache here
                "cache_miss": Duration().describe(),
            },
            "batch_stats": [
                {"batch_size": size, **compute.describe()}
                for size, compute in sorted(self.batches.items())
            ],
        }


# The statistics that the jobs a request submits now count into; None (REST requests): none.
recording: ContextVar[InferenceStats | None] = ContextVar("recording", default=None)


def record_pass(
    per_job: Iterable[InferenceStats | None],
    batch_size: int,
    input_ns: int,
    infer_ns: int,
    output_ns: int,
) -> None:
    """One forward pass of `batch_size` rows ran the jobs that count into `per_job`."""
    executed: dict[int, InferenceStats] = {}
    for stats in per_job:
        if stats is not None:
            stats.compute.add(input_ns, infer_ns, output_ns)
            executed[id(stats)] = stats
    for stats in executed.values():
        stats.execution_count += 1
        stats.batches.setdefault(batch_size, Compute()).add(input_ns, infer_ns, output_ns)
