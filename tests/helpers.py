"""Helpers more than one test file uses (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

# the repository's root: configs, notebooks and cli.py are found from it
REPO = Path(__file__).resolve().parents[1]

CONFIGS = REPO / "configs"

QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU Trainer that writes no logs and prints no progress bar or model summary; `kwargs` add to that or
    override it."""
    return L.Trainer(**{**QUIET, **kwargs})


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread while inside: tiny models gain nothing from more, and on cores shared with other jobs
    spinning OpenMP threads make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random waveforms of the given lengths, zero-padded to the longest, and their lengths."""
    g = torch.Generator().manual_seed(seed)
    waves = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        waves[i, :n] = 0.1 * torch.randn(n, generator=g)
    return waves, torch.tensor(lengths)


def sha256_of_files(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def free_port() -> int:
    """A local TCP port nothing listens on (free when this returns)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_args(defaults: dict, overrides: dict) -> dict:
    """DataModule arguments: `overrides` on `defaults`, a section given as a dict updated field by field."""
    merged = dict(defaults)
    for key, value in overrides.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if both else value
    return merged


def cli_args(
    command: str, *extra: str, config: str | Path | Iterable[str | Path] = (), root: Path | None = None
) -> list[str]:
    """The arguments of `cli.py <command>`: each config file (a name under configs/ or a path), a CPU trainer that
    prints no progress bar or model summary and writes under `root`, then `extra`, which come last and so win.
    Loggers stay as the config sets them: some tests read the CSV logger's metrics."""
    configs = [config] if isinstance(config, (str, Path)) else list(config)
    args = [command]
    for c in configs:
        args += ["--config", str(c if Path(c).is_absolute() else CONFIGS / c)]
    args += [
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    if root is not None:
        args.append(f"--trainer.default_root_dir={root}")
    return [*args, *extra]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a `cli.py` child process: W&B disabled, one thread per process, the repository importable,
    a free port for Lightning's launcher, and none of this process's rank variables; `extra` adds or overrides."""
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env["MASTER_PORT"] = str(free_port())
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK"):
        env.pop(key, None)
    return {**env, **extra}


def run_cli(args: list[str], *, timeout: int = 600, cwd: Path = REPO, env: dict | None = None):
    """`python cli.py *args` in a child process; fails the test with the command and the end of its output unless it
    exits 0. Returns the finished process (stdout and stderr as text)."""
    command = [sys.executable, str(REPO / "cli.py"), *args]
    done = subprocess.run(
        command, cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


@contextmanager
def world_of_one(tmp_path: Path) -> Iterator[object]:
    """A gloo process group of this process alone and its device mesh: FSDP2 and DTensors in one process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


class ResumableBatches:
    """A fixed list of batches, one epoch, that Lightning checkpoints and resumes mid-epoch (`state_dict`): the
    resumed run goes on with the batch an unbroken one would take next."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches
        self.consumed = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict]:
        while self.consumed < len(self.batches):
            self.consumed += 1
            yield self.batches[self.consumed - 1]
        self.consumed = 0

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = state["consumed"]


def fit_batches(
    module: L.LightningModule,
    batches: list[dict],
    steps: int,
    root: Path,
    ckpt: Path | None = None,
    **trainer_kwargs,
) -> L.Trainer:
    """Fit `module` on `batches` (ResumableBatches) up to global step `steps`, from `ckpt` if given: a quiet trainer
    under `root` with no validation and no checkpoint callback, so that runs compare step for step."""
    trainer = quiet_trainer(
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        default_root_dir=root,
        **trainer_kwargs,
    )
    trainer.fit(module, ResumableBatches(batches), ckpt_path=ckpt)
    return trainer
