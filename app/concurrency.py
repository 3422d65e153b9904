"""Requests in progress in one worker process, over HTTP and gRPC together, capped at
VAE_MAX_CONCURRENCY (with a reserve for probes and scrapes)."""

from __future__ import annotations


class RequestSlots:
    """The count both servers of a worker share, so that the cap bounds the memory that all
    requests in flight can hold, whichever protocol they came by."""

    def __init__(self, limit: int, reserve: int) -> None:
        self.limit = limit
        self.reserve = reserve
        self.in_progress = 0

    def enter(self, *, operations: bool) -> bool:
        """Take a slot (True), or refuse (False): `operations` requests (health, metrics) may
        go `reserve` past the limit."""
        if self.in_progress >= self.limit + (self.reserve if operations else 0):
            return False
        self.in_progress += 1
        return True

    def leave(self) -> None:
        self.in_progress -= 1

    def refusal(self) -> str:
        return (
            f"the server is at its limit of {self.limit} requests in progress "
            "(VAE_MAX_CONCURRENCY); retry shortly"
        )
