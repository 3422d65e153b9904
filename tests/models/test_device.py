"""Tests for models.device: a GPU is used only when this torch build can run on it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from models.device import auto_device, build_runs_on, cuda_problem

FakeGPU = Callable[..., None]  # the fake_gpu fixture (tests/conftest.py)

CUDA_12_6_ARCHES = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


@pytest.mark.parametrize(
    ("capability", "runs"),
    [
        ((5, 2), False),  # Maxwell
        ((6, 0), False),  # Pascal P100
        ((6, 1), False),  # Pascal GTX 1080
        ((7, 0), True),  # Volta V100: sm_70
        ((7, 5), True),  # Turing T4
        ((8, 9), True),  # Ada L4: the sm_86 kernels run on a newer minor version
        ((9, 0), True),  # Hopper
        ((10, 3), True),  # Blackwell B300: sm_100
        ((12, 1), True),  # sm_120
        ((13, 0), True),  # a future major version: only the compute_120 PTX, compiled for it
    ],
)
def test_the_image_torch_runs_on_compute_capability_7_and_newer(
    fake_gpu: FakeGPU, capability: tuple[int, int], runs: bool
) -> None:
    fake_gpu(capability)  # and the arch list of the image's torch build
    assert build_runs_on(capability, torch.cuda.get_arch_list()) is runs
    assert (cuda_problem(0) is None) is runs


def test_binary_kernels_need_the_same_major_version() -> None:
    assert build_runs_on((6, 1), CUDA_12_6_ARCHES)  # the CUDA 12.6 build still has sm_60
    assert not build_runs_on((10, 0), CUDA_12_6_ARCHES)  # sm_90 binaries do not run on 10.x
    assert not build_runs_on((7, 0), ["sm_75", "sm_80"])  # nor on an older minor version
    assert build_runs_on((9, 0), ["sm_90a", "compute_90"])


def test_a_pascal_gpu_is_named_with_the_requirement(fake_gpu: FakeGPU) -> None:
    fake_gpu((6, 1), name="NVIDIA GeForce GTX 1080")
    problem = cuda_problem(0)
    assert problem is not None
    assert "GPU 0 (NVIDIA GeForce GTX 1080, compute capability 6.1)" in problem
    assert "compute capability 7.0 or newer" in problem


def test_a_gpu_whose_test_kernel_fails_is_not_used(fake_gpu: FakeGPU) -> None:
    fake_gpu((8, 0), kernel_error="CUDA error: no kernel image is available for execution")
    problem = cuda_problem(0)
    assert problem is not None and "failed a test kernel" in problem
    assert "no kernel image is available" in problem
    assert auto_device() == (torch.device("cpu"), problem)


def test_auto_takes_a_supported_gpu(fake_gpu: FakeGPU) -> None:
    fake_gpu((8, 6))
    assert cuda_problem(0) is None
    assert auto_device() == (torch.device("cuda"), None)


def test_auto_falls_back_to_the_cpu_on_an_unsupported_gpu(fake_gpu: FakeGPU) -> None:
    fake_gpu((6, 0))
    device, problem = auto_device()
    assert device == torch.device("cpu")
    assert problem is not None and "compute capability 6.0" in problem


def test_auto_without_cuda_is_the_cpu_without_a_complaint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_device() == (torch.device("cpu"), None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a real GPU")
def test_this_machine_s_gpu_runs_the_test_kernel() -> None:
    assert cuda_problem(0) is None
    assert auto_device()[0].type == "cuda"
