"""Which GPU this torch build can run on: CUDA being visible is not enough.

A torch build carries GPU kernels for a list of compute capabilities (torch.cuda.get_arch_list).
On an older GPU `torch.cuda.is_available()` is still true, and the first kernel fails with "no
kernel image is available". The CUDA 12.8 builds (the Docker base image's torch 2.8) start at
7.0 (Volta): Maxwell (5.x) and Pascal (6.x) GPUs cannot run them.
"""

from __future__ import annotations

import torch

# What the Docker image's torch (2.8, CUDA 12.8) needs; the docs quote it.
MIN_COMPUTE_CAPABILITY = (7, 0)


def build_runs_on(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a build with kernels for `arch_list` (e.g. ['sm_70', ..., 'compute_120']) runs on
    a GPU of `capability`: a binary kernel (sm_XY) runs on the same major version with an equal
    or newer minor one, PTX (compute_XY) is compiled for any equal or newer GPU."""
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        if not number.isdigit() or len(number) < 2:
            continue  # e.g. sm_90a: kernels for that one GPU only, with a plain sm_90 beside them
        built = (int(number[:-1]), int(number[-1]))
        if kind == "sm" and built[0] == capability[0] and built[1] <= capability[1]:
            return True
        if kind == "compute" and built <= capability:
            return True
    return False


def _run_probe_kernel(device: torch.device) -> None:
    """A tiny computation on the device, read back: fails where no kernel can run there."""
    value = torch.arange(8, device=device, dtype=torch.float32).mul(2).sum().item()
    if value != 56.0:
        raise RuntimeError(f"a test kernel on {device} computed {value}, not 56")


def cuda_problem(index: int = 0) -> str | None:
    """Why CUDA device `index` cannot run this torch build, in words (None when it can): its
    compute capability has no kernels in the build, or a tiny kernel fails on it."""
    device = torch.device("cuda", index)
    try:
        name = torch.cuda.get_device_name(index)
        capability = torch.cuda.get_device_capability(index)
    except Exception as exc:  # a broken driver raises various types
        return f"GPU {index} cannot be queried ({type(exc).__name__}: {exc})"
    described = f"GPU {index} ({name}, compute capability {capability[0]}.{capability[1]})"
    arch_list = torch.cuda.get_arch_list()
    if arch_list and not build_runs_on(capability, arch_list):
        return (
            f"{described} is not supported by this torch build, which has kernels for "
            f"{', '.join(arch_list)}; use a GPU of compute capability "
            f"{MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} or newer, or a torch "
            "built for this one"
        )
    try:
        _run_probe_kernel(device)
    except Exception as exc:  # CUDA errors surface as RuntimeError or torch.AcceleratorError
        return f"{described} failed a test kernel ({type(exc).__name__}: {exc})"
    return None


def auto_device() -> tuple[torch.device, str | None]:
    """The first GPU when this torch build runs on it, else the CPU; with why the CPU was
    chosen although CUDA is visible (None otherwise), for a log line."""
    if not torch.cuda.is_available():
        return torch.device("cpu"), None
    problem = cuda_problem(0)
    if problem is not None:
        return torch.device("cpu"), problem
    return torch.device("cuda"), None
