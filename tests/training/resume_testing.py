"""What the resume tests share: a stand-in for Ctrl-C at a chosen point, and an exact
comparison of saved tensors."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from training.trainer import Callback, EpochSummary, Trainer


class Interrupt(Exception):
    """Stands in for Ctrl-C or a killed job."""


class InterruptAfter(Callback):
    """Stops a run at the end of epoch `epoch` (after its checkpoint is written)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, trainer: Trainer, summary: EpochSummary) -> None:
        if summary.epoch == self.epoch:
            raise Interrupt


def assert_same_tensors(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], where: str
) -> None:
    """Bit-for-bit equality of two name -> tensor mappings (state dicts, safetensors files)."""
    assert expected.keys() == found.keys(), where
    for name, value in expected.items():
        assert torch.equal(found[name], value), f"{where}: {name}"
