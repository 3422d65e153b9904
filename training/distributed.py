"""Data-parallel training under torchrun: the process group, DDP, and what the ranks share.

`torchrun --nproc-per-node N -m training ...` starts N copies of the training command; each
finds its rank in the environment torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) and joins one process group: NCCL when it trains on a GPU, gloo on the CPU. The
model is wrapped in DistributedDataParallel, which all-reduces the gradients; everything else
the ranks must agree on (the validation score, the epoch's mean losses, who failed) goes
through the few collectives below. Outside torchrun none of this is used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from training.config import ConfigError, resolve_device

logger = logging.getLogger(__name__)

T = TypeVar("T")

# What torchrun (and torch.distributed's other launchers) set in each process it starts.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is one of the ranks torchrun started."""
    environ = os.environ if environ is None else environ
    return all(name in environ for name in RANK_VARIABLES)


def environment_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank under torchrun, 0 otherwise (readable before the process
    group exists: for logging and for printing errors once)."""
    environ = os.environ if environ is None else environ
    return int(environ.get("RANK", "0")) if launched_by_torchrun(environ) else 0


def environment_world_size(environ: Mapping[str, str] | None = None) -> int:
    """How many processes torchrun started in all (1 outside torchrun)."""
    environ = os.environ if environ is None else environ
    return int(environ.get("WORLD_SIZE", "1")) if launched_by_torchrun(environ) else 1


def rank_seed(seed: int, rank: int) -> int:
    """The seed of `rank`'s own random stream (reparameterisation noise, the digit head's
    shifts): distinct per rank, and the same for the same run seed and rank."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


class PeerFailed(Exception):
    """Rank 0 failed a step the other ranks were waiting on. It reports the error itself; the
    others stop with the same exit code and say nothing, so the error is printed once."""


def device_for_rank(requested: str, local_rank: int, local_world_size: int) -> torch.device:
    """The device of the process with `local_rank` on its node: its own GPU, cuda:LOCAL_RANK,
    when `requested` is auto (with a GPU this torch build runs on) or cuda; else the CPU."""
    if requested.startswith("cuda:"):
        raise ConfigError(
            f"--device {requested} under torchrun: each process trains on its own GPU, "
            "cuda:LOCAL_RANK; pass --device cuda (or auto) and choose the GPUs with "
            "CUDA_VISIBLE_DEVICES"
        )
    device = resolve_device(requested)
    if device.type == "cpu":
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"torchrun started {local_world_size} processes on this node but only {count} "
            f"GPU(s) are visible: use --nproc-per-node {count} (or --device cpu)"
        )
    return resolve_device(f"cuda:{local_rank}")


@dataclass
class Distributed:
    """This process's place in the process group, and the collectives training needs."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @classmethod
    def start(cls, requested_device: str, environ: Mapping[str, str] | None = None) -> Distributed:
        """Join the process group torchrun set up, on the device this rank trains on."""
        environ = os.environ if environ is None else environ
        rank, local_rank = int(environ["RANK"]), int(environ["LOCAL_RANK"])
        world_size = int(environ["WORLD_SIZE"])
        local_world_size = int(environ.get("LOCAL_WORLD_SIZE", world_size))
        device = device_for_rank(requested_device, local_rank, local_world_size)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group(backend, device_id=device)
        else:
            dist.init_process_group(backend)
        if rank == 0:
            logger.info(
                "data-parallel training on %d processes (%s, rank 0 on %s)",
                world_size,
                backend,
                device,
            )
        return cls(rank, local_rank, world_size, device, backend)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that validates, logs, writes checkpoints and evaluates."""
        return self.rank == 0

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` in DistributedDataParallel: rank 0's weights broadcast to every rank now,
        gradients averaged over the ranks in every backward pass."""
        return DistributedDataParallel(
            module, device_ids=[self.device] if self.device.type == "cuda" else None
        )

    def mean(self, values: Tensor) -> Tensor:
        """The element-wise mean of `values` (1-D, float) over the ranks."""
        reduced = values.to(self.device, torch.float64).clone()
        dist.all_reduce(reduced)
        return reduced / self.world_size

    def broadcast_float(self, value: float) -> float:
        """Rank 0's `value`, on every rank."""
        shared = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(shared, src=0)
        return float(shared.item())

    def gather(self, value: Any) -> list[Any]:
        """Every rank's picklable `value`, in rank order, on every rank."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        dist.barrier()

    def from_main(self, step: Callable[[], T]) -> T:
        """Run `step` on rank 0 alone and hand its (picklable) result to every rank. When it
        raises, rank 0 re-raises and the other ranks raise PeerFailed."""
        box: list[Any] = [None]
        failure: Exception | None = None
        if self.is_main:
            try:
                box[0] = ("ok", step())
            except Exception as exc:  # re-raised below, once the others know
                failure = exc
                box[0] = ("failed", type(exc).__name__)
        dist.broadcast_object_list(box, src=0)
        if failure is not None:
            raise failure
        outcome, result = box[0]
        if outcome != "ok":
            raise PeerFailed(f"rank 0 failed ({result}); it reported why")
        return result

    def local_main_first(self, step: Callable[[], T]) -> T:
        """`step` on each node's local rank 0 first, then on the node's other ranks (a download
        into a folder the node's ranks share happens once)."""
        if self.local_rank == 0:
            result = step()
            self.barrier()
            return result
        self.barrier()
        return step()
