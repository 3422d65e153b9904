"""Latent similarity search (POST /similar's search step): one exact search of a full-MNIST-sized
index, 60,000 x 32 random latents, on the CPU and on a GPU when there is one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from training.index import time_search

INDEX_ROWS = 60_000
LATENT_DIM = 32
K = 8


def similar_search(
    log: Callable[[str], None] = lambda message: None, *, repeats: int = 200
) -> dict[str, Any]:
    """Median milliseconds per search, by device, CPU threads, batch of queries and whether the
    search is restricted to one digit (conditional models) or spans all images."""
    cases = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    default_threads = torch.get_num_threads()
    try:
        for device in devices:
            for threads in sorted({1, default_threads}) if device == "cpu" else [default_threads]:
                torch.set_num_threads(threads)
                for queries in (1, 64):
                    for within_digit in (True, False):
                        seconds = time_search(
                            INDEX_ROWS,
                            LATENT_DIM,
                            k=K,
                            queries=queries,
                            within_digit=within_digit,
                            device=device,
                            repeats=repeats,
                        )
                        case = {
                            "device": device,
                            "threads": threads,
                            "queries": queries,
                            "search": "within a digit" if within_digit else "all images",
                            "median_ms": round(seconds * 1000, 4),
                        }
                        log(f"similar search {case}")
                        cases.append(case)
    finally:
        torch.set_num_threads(default_threads)
    return {"index": f"{INDEX_ROWS} x {LATENT_DIM}", "k": K, "cases": cases}


if __name__ == "__main__":
    import json

    print(json.dumps(similar_search(print), indent=2))
