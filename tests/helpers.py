"""Helpers more than one test file uses (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch

# the repository's root: configs, notebooks and cli.py are found from it
REPO = Path(__file__).resolve().parents[1]

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
