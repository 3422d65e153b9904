"""`python -m bench.variants [CHECKPOINT]`: the model's decoder and encoder as eager PyTorch,
TorchScript, torch.compile and ONNX Runtime, on the CPU, by batch size: microseconds per image
and the largest difference from eager's output. What the service would run instead of eager
only if it were faster with the same images (within float tolerance).

Each variant is timed in turn, round after round, so load from other jobs falls on all of them.
ONNX Runtime is optional (`pip install onnxruntime onnx`); without it its rows are skipped.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.cli import default_checkpoint
from models import VAE

BATCH_SIZES = (1, 8, 16, 32, 64)
ROUNDS = 3
SECONDS_PER_TIMING = 0.3
Run = Callable[[Tensor, Tensor], Tensor]


class _Decoder(nn.Module):
    """z (B, L), one-hot labels (B, C) -> logits (B, 1, 28, 28): what /sample runs."""

    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        return self.decoder(z, labels)


class _Encoder(nn.Module):
    """x (B, 1, 28, 28), one-hot labels (B, C) -> posterior mean (B, L): what scoring runs."""

    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.encoder = model.encoder

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        return self.encoder(x, labels)[0]


def _onnx(module: nn.Module, example: tuple[Tensor, Tensor]) -> Run | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    with tempfile.TemporaryDirectory(prefix="vae-onnx-") as folder:
        path = Path(folder) / "model.onnx"
        _export(module, example, path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(path.read_bytes(), options)

    def run(a: Tensor, b: Tensor) -> Tensor:
        (out,) = session.run(None, {"a": a.numpy(), "b": b.numpy()})
        return torch.from_numpy(out)

    return run


def _export(module: nn.Module, example: tuple[Tensor, Tensor], path: Path) -> None:
    torch.onnx.export(
        module,
        example,
        path,
        input_names=["a", "b"],
        output_names=["out"],
        dynamic_axes={"a": {0: "batch"}, "b": {0: "batch"}, "out": {0: "batch"}},
        dynamo=False,
    )


def variants(module: nn.Module, example: tuple[Tensor, Tensor]) -> dict[str, Run]:
    module = module.eval()
    runs: dict[str, Run] = {"eager": module}
    runs["torchscript"] = torch.jit.freeze(torch.jit.trace(module, example))
    compiled = torch.compile(module, dynamic=True)
    runs["torch.compile"] = compiled
    onnx = _onnx(module, example)
    if onnx is not None:
        runs["onnxruntime"] = onnx
    return runs


def _time(run: Run, a: Tensor, b: Tensor) -> float:
    run(a, b)
    repeats, started = 0, time.perf_counter()
    while time.perf_counter() - started < SECONDS_PER_TIMING:
        run(a, b)
        repeats += 1
    return (time.perf_counter() - started) / repeats


def measure(checkpoint: Path) -> dict[str, Any]:
    model = VAE.from_pretrained(checkpoint).eval()
    classes = model.config.num_classes or 1
    generator = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {}
    with torch.inference_mode():
        for part, module, shape in (
            ("decoder", _Decoder(model), (model.config.latent_dim,)),
            ("encoder", _Encoder(model), (1, 28, 28)),
        ):
            example = (torch.rand(2, *shape, generator=generator), torch.eye(classes)[:2])
            runs = variants(module, example)
            inputs = {
                size: (
                    torch.randn(size, *shape, generator=generator),
                    torch.eye(classes)[torch.arange(size) % classes],
                )
                for size in BATCH_SIZES
            }
            seconds: dict[str, dict[int, list[float]]] = {n: {s: [] for s in inputs} for n in runs}
            difference = {name: 0.0 for name in runs}
            for a, b in inputs.values():
                reference = runs["eager"](a, b)
                for name, run in runs.items():
                    got = run(a, b)
                    difference[name] = max(difference[name], float((got - reference).abs().max()))
            for _ in range(ROUNDS):
                for size, (a, b) in inputs.items():
                    for name, run in runs.items():
                        seconds[name][size].append(_time(run, a, b))
            out[part] = {
                name: {
                    "us_per_image": {s: min(v) / s * 1e6 for s, v in seconds[name].items()},
                    "max_abs_difference": difference[name],
                }
                for name in runs
            }
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = []
    for part, rows in result.items():
        lines += [
            f"**{part}**, microseconds per image (best of {ROUNDS} rounds), torch threads "
            f"{torch.get_num_threads()}",
            "",
            "| variant | " + " | ".join(f"batch {s}" for s in BATCH_SIZES) + " | max abs diff |",
            "|---|" + "---|" * (len(BATCH_SIZES) + 1),
        ]
        for name, row in rows.items():
            cells = [f"{row['us_per_image'][s]:.0f}" for s in BATCH_SIZES]
            diff = f"{row['max_abs_difference']:.1e}"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {diff} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.variants", description=__doc__)
    parser.add_argument("checkpoint", nargs="?", type=Path)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(markdown(measure(args.checkpoint or default_checkpoint(print))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
