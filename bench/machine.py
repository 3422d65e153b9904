"""What the numbers were measured on: cores, CPU model, GPU, library versions, load."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on a shared machine shows up here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe() -> dict[str, Any]:
    import fastapi
    import uvicorn

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cores": len(os.sched_getaffinity(0)),
        "cpu": cpu_model(),
        "gpu": gpu,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "platform": platform.platform(),
        "load_average_at_start": load_average(),
    }


def header(machine: dict[str, Any]) -> str:
    """One line naming the machine, for the top of the printed and markdown tables."""
    gpu = machine["gpu"] or "no GPU"
    return (
        f"{machine['cores']} CPU cores ({machine['cpu']}), {gpu}, torch {machine['torch']}, "
        f"Python {machine['python']}, uvicorn {machine['uvicorn']}; "
        f"load average at start {machine['load_average_at_start']}"
        + (
            f", at end {machine['load_average_at_end']}"
            if machine.get("load_average_at_end")
            else ""
        )
    )
