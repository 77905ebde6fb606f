"""Callbacks that watch a run: the collectives each training step issues."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist


class CountCollectives(L.Callback):
    """Counts the Python-level collectives (all-reduce, all-gather, broadcast, ...) each training step issues,
    from one batch start to the next, and writes them per rank to `folder`. DDP's gradient buckets go through
    its C++ reducer and are not counted: they are the work, not the overhead."""

    NAMES = (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "broadcast",
        "all_gather_object",
        "barrier",
    )

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.steps: list[list[list]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.steps.append([])
        for name in self.NAMES:
            original = getattr(dist, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
                if self.steps:
                    self.steps[-1].append([_name, tensor.numel() if tensor is not None else -1])
                return _original(*args, **kwargs)

            setattr(dist, name, counted)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(
            []
        )  # the next step's window opens here: Lightning's loop work before the batch counts

    def on_train_end(self, trainer, pl_module) -> None:
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.steps))
