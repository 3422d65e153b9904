"""Tests for training/distributed.py and data-parallel training: each rank's share of the data,
the trainer under DistributedDataParallel against one process, and `torchrun -m training` for
real (gloo on the CPU): one checkpoint, the single-process ELBO, a killed run resumed."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from resume_testing import assert_same_tensors
from torch import Tensor, nn

from models import load_checkpoint
from models.index import INDEX_FILE
from models.prior import PRIOR_FILE
from training.checkpoints import STATE_FILE
from training.cli import main
from training.config import ConfigError, TrainConfig
from training.data import Batches, DataError, Split, load_dataset
from training.distributed import (
    Distributed,
    device_for_rank,
    environment_rank,
    environment_world_size,
    launched_by_torchrun,
    rank_seed,
)
from training.run import CHECKPOINT_ENTRIES, check_for_torchrun
from training.trainer import StepOutput, Trainer, TrainerSettings

REPO = Path(__file__).resolve().parents[2]
TORCHRUN_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
# The test ELBO of `torchrun --nproc-per-node 2` against one process with the same global batch
# and seed: the runs differ only in their noise (each rank draws its own) and in the order
# floating-point sums are taken. Measured (2 CPU cores): one process -125.6, -125.9 and -132.6
# nats at seeds 0, 1 and 2; torchrun at seed 0 -124.0.
ELBO_TOLERANCE = 3.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- each rank's share of the data ----------------------------------------------------------


def id_split(count: int) -> Split:
    """A split whose label is each example's id and whose pixels are spread over 0..255."""
    ids = torch.arange(count)
    pixels = (ids * 37 % 256).to(torch.uint8).reshape(-1, 1, 1, 1).expand(-1, 1, 28, 28)
    return Split(pixels.contiguous(), ids)


def epochs_of(batches: Batches, epochs: int) -> list[list[tuple[Tensor, Tensor]]]:
    return [list(batches) for _ in range(epochs)]


@pytest.mark.parametrize(("count", "world_size"), [(100, 2), (103, 4), (96, 3)])
@pytest.mark.parametrize("binarize", [False, True])
def test_the_ranks_shares_make_up_the_global_batches(
    count: int, world_size: int, binarize: bool
) -> None:
    split = id_split(count)

    def batches(rank: int, ranks: int) -> Batches:
        generator = torch.Generator().manual_seed(5)
        return Batches(
            split, 12, generator=generator, binarize=binarize, rank=rank, world_size=ranks
        )

    whole = epochs_of(batches(0, 1), epochs=2)
    shares = [epochs_of(batches(rank, world_size), epochs=2) for rank in range(world_size)]
    for epoch, global_batches in enumerate(whole):
        for step, (x, y) in enumerate(global_batches):
            parts = [share[epoch][step] for share in shares]
            assert [len(part_y) for _, part_y in parts] == [
                len(chunk) for chunk in y.tensor_split(world_size)
            ]
            assert torch.equal(torch.cat([part_y for _, part_y in parts]), y)
            # The same pixels, binarised with the same noise as one process would.
            assert torch.equal(torch.cat([part_x for part_x, _ in parts]), x)
            # Each share's weight times its mean is its sum / the batch; averaged over the
            # ranks (as DDP averages), those make the whole batch's mean.
            weights = [batches(rank, world_size).share_weight(step) for rank in range(world_size)]
            means = [part_y.double().mean() for _, part_y in parts]
            averaged = sum(w * m for w, m in zip(weights, means, strict=True)) / world_size
            assert float(averaged) == pytest.approx(float(y.double().mean()), rel=1e-12)
    # The permutation changes from epoch to epoch, identically on every rank.
    assert not torch.equal(whole[0][0][1], whole[1][0][1])


def test_a_last_batch_shorter_than_the_ranks_is_left_out() -> None:
    # 98 = 8 * 12 + 2: the last global batch of 2 images cannot feed 4 ranks.
    split = id_split(98)
    assert len(Batches(split, 12, world_size=1)) == 9
    assert len(Batches(split, 12, world_size=2)) == 9
    assert len(Batches(split, 12, rank=3, world_size=4)) == 8
    shares = [
        Batches(split, 12, generator=torch.Generator().manual_seed(3), rank=rank, world_size=4)
        for rank in range(4)
    ]
    seen = torch.cat([y for share in shares for _, y in share])
    assert len(seen) == 96 and len(set(seen.tolist())) == 96


def test_a_batch_that_does_not_divide_among_the_ranks_is_refused() -> None:
    with pytest.raises(DataError, match="multiple of 3"):
        Batches(id_split(10), 8, rank=0, world_size=3)


def test_each_rank_has_its_own_random_stream() -> None:
    seeds = {rank_seed(0, rank) for rank in range(8)} | {rank_seed(1, rank) for rank in range(8)}
    assert len(seeds) == 16
    assert rank_seed(3, 1) == rank_seed(3, 1)
    assert all(0 <= seed < 2**63 for seed in seeds)


# ---- the environment and the checks before the process group ---------------------------------


def test_torchrun_is_recognised_by_its_environment() -> None:
    assert launched_by_torchrun(TORCHRUN_ENV)
    assert environment_rank({**TORCHRUN_ENV, "RANK": "3"}) == 3
    assert environment_world_size(TORCHRUN_ENV) == 2
    assert not launched_by_torchrun({"RANK": "1"})
    assert (environment_rank({}), environment_world_size({})) == (0, 1)


def test_a_rank_trains_on_its_own_gpu_or_on_the_cpu(fake_gpu: Callable[..., None]) -> None:
    assert device_for_rank("cpu", 1, 2) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"--device cuda .*CUDA_VISIBLE_DEVICES"):
        device_for_rank("cuda:1", 0, 2)
    fake_gpu((9, 0))
    assert device_for_rank("auto", 0, 2) == torch.device("cuda:0")
    with pytest.raises(ConfigError, match=r"2 processes on this node but only 1 GPU.*--nproc-per"):
        device_for_rank("cuda", 1, 2)


def test_what_torchrun_cannot_run_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"--adversarial does not run under torchrun.*cvae-gan"):
        check_for_torchrun(TrainConfig.from_preset("cvae-gan"), 2)
    with pytest.raises(ConfigError, match=r"--batch-size 64 .* e.g. --batch-size 63"):
        check_for_torchrun(TrainConfig.from_preset("tiny"), 3)
    check_for_torchrun(TrainConfig.from_preset("tiny"), 4)


@pytest.mark.parametrize(("rank", "lines"), [("0", 1), ("1", 0)])
def test_the_adversarial_refusal_is_one_line_from_rank_0_alone(
    rank: str,
    lines: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    for name, value in {**TORCHRUN_ENV, "RANK": rank, "LOCAL_RANK": rank}.items():
        monkeypatch.setenv(name, value)
    assert main(["--preset", "cvae-gan", "--out", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == lines
    if lines:
        assert captured.err.startswith("error: --adversarial does not run under torchrun")
    assert not (tmp_path / "run").exists()


# ---- the trainer under DistributedDataParallel ----------------------------------------------

# 4 global batches of 16, then one of 9 that 2 ranks share as 5 and 4 images.
TOY_COUNT, TOY_BATCH = 73, 16


class ToyBatches:
    """y = x @ w + noise, shuffled each epoch by `generator`: global batches of TOY_BATCH, of
    which this rank takes its consecutive share (the layout of training.data.Batches)."""

    def __init__(self, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> None:
        data = torch.Generator().manual_seed(0)
        self.x = torch.randn(TOY_COUNT, 3, generator=data)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(
            TOY_COUNT, generator=data
        )
        self.generator, self.rank, self.world_size = generator, rank, world_size

    def __len__(self) -> int:
        return math.ceil(TOY_COUNT / TOY_BATCH)

    def share_weight(self, index: int) -> float:
        count = min(TOY_BATCH, TOY_COUNT - index * TOY_BATCH)
        return (
            len(torch.arange(count).tensor_split(self.world_size)[self.rank])
            * self.world_size
            / count
        )

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(TOY_COUNT, generator=self.generator)
        for batch in order.split(TOY_BATCH):
            share = batch.tensor_split(self.world_size)[self.rank]
            yield self.x[share], self.y[share]


def squared_error(model: nn.Module, x: Tensor, y: Tensor, step: int) -> StepOutput:
    loss = (model(x).squeeze(1) - y).pow(2).mean()
    return StepOutput(loss=loss, logs={"abs_error": (model(x).squeeze(1) - y).abs().mean()})


def toy_trainer(rank: int, world_size: int, distributed: Distributed | None) -> Trainer:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    held_out = torch.Generator().manual_seed(2)
    x_val = torch.randn(32, 3, generator=held_out)
    y_val = x_val @ torch.tensor([1.0, -2.0, 0.5])

    def validate(model: nn.Module) -> float:
        # Rank 0 alone validates: any other rank calling this is a failure.
        if rank != 0:
            raise AssertionError(f"rank {rank} validated")
        with torch.no_grad():
            return -float((model(x_val).squeeze(1) - y_val).pow(2).mean())

    return Trainer(
        nn.Linear(3, 1),
        squared_error,
        ToyBatches(generator, rank, world_size),
        TrainerSettings(epochs=3, lr=0.05, progress=False),
        validate=validate,
        data_generator=generator,
        distributed=distributed,
    )


def toy_rank(rank: int, world_size: int, port: int, out: str) -> None:
    """One rank of the toy run (spawned): joins the group as under torchrun, trains, saves."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    distributed = Distributed.start("cpu")
    try:
        trainer = toy_trainer(rank, world_size, distributed)
        trainer.fit()
        torch.save(
            {
                "weights": trainer.model.state_dict(),
                "history": trainer.history,
                "state": trainer.state_dict(),
            },
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        distributed.close()


@pytest.fixture(scope="module")
def toy_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The toy run on 2 gloo processes: each rank's weights, history and resume state."""
    out = tmp_path_factory.mktemp("toy-ddp")
    mp.start_processes(
        toy_rank, args=(2, free_port(), str(out)), nprocs=2, join=True, start_method="spawn"
    )
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


@pytest.mark.slow
def test_two_ranks_take_the_steps_one_process_takes_on_the_whole_batch(
    toy_ranks: list[dict[str, Any]],
) -> None:
    alone = toy_trainer(0, 1, None)
    alone.fit()
    for rank, result in enumerate(toy_ranks):
        for name, value in alone.model.state_dict().items():
            torch.testing.assert_close(result["weights"][name], value, rtol=0, atol=1e-5)
        # Each rank logged the same epochs: losses averaged over the ranks, rank 0's val score.
        for found, expected in zip(result["history"], alone.history, strict=True):
            assert found["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5), rank
            assert found["train_abs_error"] == pytest.approx(expected["train_abs_error"], rel=1e-5)
            assert found["val_score"] == pytest.approx(expected["val_score"], rel=1e-5)
    # Without all-reduced gradients rank 0 would have fitted its own half of every batch alone:
    # far from the tolerance above.
    half = toy_trainer(0, 1, None)
    half.batches = ToyBatches(half.data_generator or torch.Generator(), rank=0, world_size=2)
    half.fit()
    gap = (half.model.weight - alone.model.weight).abs().max()
    assert gap > 1e-3, gap


@pytest.mark.slow
def test_the_resume_state_holds_every_ranks_random_stream(
    toy_ranks: list[dict[str, Any]],
) -> None:
    streams = [result["state"]["rank_rng"] for result in toy_ranks]
    assert streams[0] is not None and len(streams[0]) == 2
    # Gathered on every rank, so whichever rank writes the checkpoint has them all.
    for saved_0, saved_1 in zip(streams[0], streams[1], strict=True):
        assert torch.equal(saved_0["cpu"], saved_1["cpu"])
    assert toy_ranks[0]["state"]["epoch"] == 3


def test_one_process_keeps_the_state_it_always_had() -> None:
    trainer = toy_trainer(0, 1, None)
    trainer.fit()
    assert "rank_rng" not in trainer.state_dict()


# ---- torchrun -m training, for real ---------------------------------------------------------


def torchrun(*args: str) -> list[str]:
    """The torchrun of this interpreter's environment, on a free loopback port."""
    launcher = Path(sys.executable).with_name("torchrun")
    command = (
        [str(launcher)] if launcher.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    )
    return [*command, "--master-addr=127.0.0.1", f"--master-port={free_port()}", *args]


def training_argv(out: Path, *flags: str) -> list[str]:
    return torchrun(
        "--nproc-per-node=2", "-m", "training", "--preset", "tiny", "--out", str(out),
        "--device", "cpu", "--no-progress", *flags,
    )  # fmt: skip


def run_env() -> dict[str, str]:
    # One thread per rank: the two ranks share the test machine's cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": loopback_interface()}


def loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return "lo" if "lo" in names else names[0]


# Loaded by every process of the fixture's torchrun run: records each rank's training batches.
SHARE_RECORDER = Path(__file__).with_name("share_recorder")


def shares_of(out: Path) -> Path:
    """Where the ranks of the run into `out` recorded their batches: beside out's folder, which
    must hold nothing but the checkpoint."""
    return out.parent.with_name(out.parent.name + "-shares")


@pytest.fixture(scope="module")
def torchrun_checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """`torchrun --nproc-per-node 2 -m training --preset tiny` into a fresh folder, each rank
    recording the batches it trained on into a folder beside it (shares_of)."""
    out = tmp_path_factory.mktemp("torchrun") / "tiny"
    shares = shares_of(out)
    shares.mkdir()
    env = run_env()
    env["PYTHONPATH"] = os.pathsep.join([str(SHARE_RECORDER), str(REPO), env.get("PYTHONPATH", "")])
    env["VAE_TEST_SHARES_DIR"] = str(shares)
    result = subprocess.run(
        training_argv(out), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr[-6000:]
    return out, result


@pytest.mark.slow
def test_torchrun_writes_one_loadable_checkpoint(
    torchrun_checkpoint: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, result = torchrun_checkpoint
    entries = {entry.name for entry in out.iterdir()}
    assert entries <= CHECKPOINT_ENTRIES
    # What rank 0 fits and writes after training, beside the weights: the latent prior that
    # /sample draws from and the latent index behind /similar.
    assert {"config.json", "model.safetensors", PRIOR_FILE, INDEX_FILE} <= entries, entries
    assert not [entry for entry in out.parent.iterdir() if entry.name != out.name]
    checkpoint = load_checkpoint(out)
    training = checkpoint.metadata["training"]
    assert (training["processes"], training["backend"]) == (2, "gloo")
    assert training["epochs_run"] == 12 and training["config"]["batch_size"] == 64
    # Rank 0 alone printed the summary and logged the epochs.
    assert result.stdout.count("checkpoint: ") == 1
    assert result.stderr.count("epoch   1/12") == 1
    assert "data-parallel training on 2 processes (gloo" in result.stderr


@pytest.mark.slow
def test_each_torchrun_rank_trained_on_its_share_of_every_batch(
    torchrun_checkpoint: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    """In the real run, each of the 2 ranks took its half of every global batch of 64 (the
    tiny split's last batch of 16 as 8 and 8), every epoch: together one process's epoch, and
    not each the whole batch (which the ELBO and resume checks alone would let pass). The
    tiny split's 3,600 images leave an even last batch for any batch size 2 ranks can share;
    the uneven split is the toy run's (test_two_ranks_take_the_steps_one_process_takes...)."""
    out, _ = torchrun_checkpoint
    training = load_checkpoint(out).metadata["training"]
    epochs = training["epochs_run"]
    train_images = len(load_dataset("mnist-5k").train)
    whole = [len(b) for b in torch.arange(train_images).split(training["config"]["batch_size"])]
    by_rank = {}
    for rank in (0, 1):
        recorded = json.loads((shares_of(out) / f"rank{rank}.json").read_text())
        assert len(recorded) == epochs, len(recorded)
        assert {(e["rank"], e["world_size"]) for e in recorded} == {(rank, 2)}
        by_rank[rank] = [e["sizes"] for e in recorded]
    for epoch in range(epochs):
        shares = [by_rank[rank][epoch] for rank in (0, 1)]
        assert [a + b for a, b in zip(*shares, strict=True)] == whole, epoch
        for rank in (0, 1):
            assert shares[rank] == [size // 2 + (size % 2 if rank == 0 else 0) for size in whole]


@pytest.mark.slow
def test_torchrun_reaches_the_test_elbo_of_one_process(
    torchrun_checkpoint: tuple[Path, subprocess.CompletedProcess[str]], trained_checkpoint: Path
) -> None:
    # trained_checkpoint: the same preset, seed and global batch in one process.
    alone = json.loads((trained_checkpoint / "config.json").read_text())["metrics"]
    parallel = load_checkpoint(torchrun_checkpoint[0]).metadata["metrics"]
    assert parallel["elbo"] == pytest.approx(alone["elbo"], abs=ELBO_TOLERANCE)
    assert parallel["digit_accuracy"] > 0.8


def worker_pid(agent: int, rank: int) -> int | None:
    """The pid of the torchrun worker of `rank` started by the agent `agent`, once it runs."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The parent pid is the second field after the command's ")" in /proc/PID/stat.
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile, or not ours to read
        if parent == agent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_a_killed_torchrun_run_resumes_to_the_same_weights(
    torchrun_checkpoint: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    state = out / "train_state" / "last" / STATE_FILE
    log = tmp_path / "killed.log"
    with log.open("w") as output:
        agent = subprocess.Popen(
            training_argv(out), cwd=REPO, env=run_env(), stdout=output, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 300
            while not state.is_file() and agent.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert agent.poll() is None, f"the run ended before it was killed\n{log.read_text()}"
            writer = worker_pid(agent.pid, 0)
            assert writer is not None, "no rank 0 worker under torchrun"
            # SIGKILL of the rank that writes checkpoints: torchrun stops the other and fails.
            os.kill(writer, signal.SIGKILL)
            assert agent.wait(timeout=120) != 0
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    assert not (out / "config.json").exists(), "a killed run wrote a final checkpoint"
    killed_at = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= killed_at < 12

    resumed = subprocess.run(
        training_argv(out, "--resume"),
        cwd=REPO,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-6000:]
    assert f"resuming after epoch {killed_at} of 12" in resumed.stderr
    # Bit for bit the uninterrupted torchrun run: every rank took up its own random stream.
    uninterrupted = torchrun_checkpoint[0]
    for folder in ("train_state/last", "."):
        expected = load_checkpoint(uninterrupted / folder).model.state_dict()
        found = load_checkpoint(out / folder).model.state_dict()
        assert_same_tensors(expected, found, folder)
