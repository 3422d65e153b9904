"""Put on PYTHONPATH by tests/training/test_distributed.py for a real torchrun run: every rank
records the size of each training batch it iterates (Batches with shuffle, one list per epoch)
and writes them to $VAE_TEST_SHARES_DIR/rank<RANK>.json at exit, so the test sees what share of
every global batch each rank trained on."""

from __future__ import annotations

import atexit
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if os.environ.get("VAE_TEST_SHARES_DIR") and "RANK" in os.environ:
    import torch

    from training import data

    _epochs: list[dict[str, Any]] = []
    _iterate = data.Batches.__iter__

    def _recorded(self: data.Batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sizes: list[int] = []
        if self.shuffle:
            _epochs.append({"rank": self.rank, "world_size": self.world_size, "sizes": sizes})
        for x, y in _iterate(self):
            sizes.append(len(x))
            yield x, y

    def _write() -> None:
        out = Path(os.environ["VAE_TEST_SHARES_DIR"]) / f"rank{os.environ['RANK']}.json"
        out.write_text(json.dumps(_epochs))

    data.Batches.__iter__ = _recorded  # type: ignore[method-assign]
    atexit.register(_write)
