"""FSDP2's sharded checkpoint folders are replaced atomically: a write killed or failing at any point leaves the
previous `last.ckpt` whole, and the framework's own leftovers are cleaned up, nobody else's."""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from cli import main
from lightning_modules.training import strategies
from lightning_modules.training.checkpoints import read_sharded_model
from lightning_modules.training.strategies import FSDP2Strategy
from tests.builders.runs import FSDP2, STEPS, fit_args
from tests.helpers import run_cli

# one process, no process group: torch.distributed.checkpoint then writes as a single rank, and says so
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized")


def strategy() -> FSDP2Strategy:
    """The strategy as one rank of a run sees itself: its device set, no process group."""
    s = FSDP2Strategy()
    s.parallel_devices = [torch.device("cpu")]
    return s


def save(target: Path, step: int) -> None:
    """A checkpoint as Lightning hands it to the strategy: weights that tell the step, loop state beside them."""
    weights = {"layer.weight": torch.full((4, 3), float(step)), "layer.bias": torch.arange(4.0) + step}
    strategy().save_checkpoint({"state_dict": weights, "optimizer_states": [], "global_step": step}, target)


def step_of(target: Path) -> int:
    """The step of the complete checkpoint at `target`, read as a resume reads it (weights and meta.pt agree)."""
    weights = read_sharded_model(target)
    meta = torch.load(target / "meta.pt", weights_only=True)
    step = meta["global_step"]
    assert torch.equal(weights["layer.weight"], torch.full((4, 3), float(step)))
    assert torch.equal(weights["layer.bias"], torch.arange(4.0) + step)
    return step


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "last.ckpt")


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_write_that_fails_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "last.ckpt"
    save(target, 1)
    save(target, 2)  # replaces a complete one
    assert step_of(target) == 2 and leftovers(tmp_path) == []

    def fail(self, *args, **kwargs) -> None:  # every shard written, the .metadata that completes them not
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "finish", fail)
    with pytest.raises(CheckpointException) as raised:
        save(target, 3)
    (why, _), *_ = raised.value.failures.values()
    assert isinstance(why, OSError) and why.errno == errno.ENOSPC
    assert step_of(target) == 2 and leftovers(tmp_path) == []  # the half-written folder is removed


def _save_killed_at(target: Path, point: str) -> None:
    """In a forked child: write checkpoint 3 and be SIGKILLed at `point`."""

    def die(*args, **kwargs) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "writing shards":
        FileSystemWriter.finish = die
    elif point == "before the swap":
        strategies.swap_into_place = die
    else:  # the new checkpoint in place, the previous one being deleted
        strategies._delete = die
    save(target, 3)


@pytest.mark.parametrize(
    ("point", "found"), [("writing shards", 2), ("before the swap", 2), ("deleting the previous", 3)]
)
def test_a_killed_write_leaves_a_complete_checkpoint_and_its_leftover_is_cleaned(
    tmp_path: Path, point: str, found: int
) -> None:
    target = tmp_path / "last.ckpt"
    save(target, 2)
    child = multiprocessing.get_context("fork").Process(target=_save_killed_at, args=(target, point))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert step_of(target) == found  # the old checkpoint or the new one, whole, never a mix
    (left,) = leftovers(tmp_path)  # named by the framework, after the killed process
    assert left == f".last.ckpt.tmp-{socket.gethostname()}-{child.pid}"
    assert strategies.clean_interrupted_saves(tmp_path) == [tmp_path / left] and leftovers(tmp_path) == []
    save(target, 4)
    assert step_of(target) == 4


def test_without_exchange_the_previous_checkpoint_moved_aside_is_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(a: Path, b: Path) -> None:  # NFS and some parallel file systems
        raise OSError(errno.EINVAL, "Invalid argument", str(a))

    monkeypatch.setattr(strategies, "exchange_paths", unsupported)
    target = tmp_path / "last.ckpt"
    save(target, 1)
    save(target, 2)  # two renames
    assert step_of(target) == 2 and leftovers(tmp_path) == []
    # Killed between the two renames: the previous checkpoint aside, the new one not yet in place.
    pid, host = dead_pid(), socket.gethostname()
    target.rename(tmp_path / f".last.ckpt.old-{host}-{pid}")
    save(tmp_path / f".last.ckpt.tmp-{host}-{pid}", 3)
    assert strategies.clean_interrupted_saves(tmp_path) == [tmp_path / f".last.ckpt.tmp-{host}-{pid}"]
    assert step_of(target) == 2 and leftovers(tmp_path) == []


def test_only_the_frameworks_own_leftovers_are_touched(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    save(target, 1)
    host, dead = socket.gethostname(), dead_pid()
    kept = [
        f".last.ckpt.tmp-{host}-{os.getpid()}",  # a live writer's
        f".last.ckpt.tmp-another-host-{dead}",  # another host's, on a shared file system
        "last.ckpt.tmp",  # a user's
    ]
    for name in kept:
        (tmp_path / name).mkdir()
    (tmp_path / f".best.ckpt.tmp-{host}-{dead}").write_bytes(b"a file: AtomicCheckpoints' business")
    kept.append(f".best.ckpt.tmp-{host}-{dead}")
    assert strategies.clean_interrupted_saves(tmp_path) == []
    assert leftovers(tmp_path) == sorted(kept)
    # A folder of the user's at the checkpoint's name is refused, not replaced.
    mine = tmp_path / "mine.ckpt"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(IsADirectoryError, match=r"mine\.ckpt is a folder that holds more .*notes\.txt"):
        save(mine, 2)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert step_of(target) == 1


@pytest.fixture(scope="module")
def mlm_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The sample corpus prepared once, in this process, so the two-process runs only read it."""
    cache = tmp_path_factory.mktemp("mlm_cache")
    main(fit_args(str(cache), tmp_path_factory.mktemp("prepare"), 4, "--trainer.max_steps=1"))
    return str(cache)


# slow (two gloo processes, two short fits); the default run simulates the ranks' agreement in one process above
@pytest.mark.slow
def test_fsdp2_two_processes_replace_last_ckpt_and_resume(mlm_cache: str, tmp_path: Path) -> None:
    fit = fit_args(mlm_cache, tmp_path, 8, *FSDP2)
    run_cli(fit, timeout=300)
    (last,) = tmp_path.rglob("last.ckpt")
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one per rank
    first = read_sharded_model(last)
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == STEPS
    # replaces last.ckpt with both ranks
    run_cli([*fit, "--ckpt_path=last", f"--trainer.max_steps={STEPS + 3}"], timeout=300)
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == STEPS + 3
    second = read_sharded_model(last)
    assert second.keys() == first.keys() and any(not torch.equal(second[k], first[k]) for k in first)
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no temporary folder left
