"""Test hooks (VAE_ENABLE_TEST_HOOKS only; see app.http.middleware.FaultInjectionMiddleware):
faults a request asks for with X-Test-Fault, carried into the forward pass of its batch."""

from __future__ import annotations

import time
from contextvars import ContextVar

import torch
from torch import Tensor

# The fault a request asks for travels with its job as one more input column, one value per
# image, so the batcher can batch, split and retry it like any other input.
FAULT_INPUT = "fault"
FAULT_RAISE = -1.0
FAULT_OOM = -2.0
MAX_FAULT_DELAY_S = 60.0
# The fault of the request being handled: None when test hooks are off, 0.0 for no fault.
requested_fault: ContextVar[float | None] = ContextVar("requested_fault", default=None)


class InjectedFault(RuntimeError):
    """The forward-pass failure that the `raise` test fault asks for."""


def parse_fault(value: str) -> float:
    """An X-Test-Fault header value (`raise`, `oom`, `slow=<seconds>`) as a fault code."""
    text = value.strip().lower()
    if text == "raise":
        return FAULT_RAISE
    if text == "oom":
        return FAULT_OOM
    kind, _, seconds = text.partition("=")
    if kind == "slow":
        try:
            delay = float(seconds)
        except ValueError:
            delay = -1.0
        if 0.0 < delay <= MAX_FAULT_DELAY_S:
            return delay
    raise ValueError(
        f"X-Test-Fault {value!r} is not a fault; use raise, oom or "
        f"slow=<seconds, 0 < s <= {MAX_FAULT_DELAY_S:g}>"
    )


def inject_fault(codes: Tensor) -> None:
    """Misbehave as the batch's faulty jobs ask: sleep the longest delay, then raise."""
    delay = float(codes.clamp(min=0.0).max()) if codes.numel() else 0.0
    if delay > 0.0:
        time.sleep(delay)
    if bool((codes == FAULT_RAISE).any()):
        raise InjectedFault("test fault: this forward pass was asked to raise (X-Test-Fault)")
    if bool((codes == FAULT_OOM).any()):
        raise torch.OutOfMemoryError("test fault: simulated out of memory (X-Test-Fault)")
