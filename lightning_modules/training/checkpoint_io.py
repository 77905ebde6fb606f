"""Checkpoints that a killed run leaves whole and that carry what a resume needs: `CheckpointExtras` adds every
rank's RNG state, the tokenizer, the system's class path and the EMA weights to each system's checkpoint;
`AtomicCheckpointIO` writes each single-file checkpoint to a temporary name beside the target, fsyncs it and
renames it over the target; `AtomicCheckpoints` installs that writer and, at the start of `fit`, removes the
temporary files that writers killed during an earlier run of this host left behind
(`remove_stale_temporaries`)."""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.distributed.fsdp import FSDPModule

from lightning_modules.training.atomic_files import fsync_folder, pid_is_alive, temporary_name
from lightning_modules.training.checkpoints import SYSTEM_CLASS_KEY
from lightning_modules.training.ema import ema_callbacks, load_ema, save_ema
from lightning_modules.training.rng import restore_rng_state, rng_states_of_all_ranks
from lightning_modules.training.strategies import configure_parallelism

log = logging.getLogger(__name__)


class CheckpointExtras(L.LightningModule):
    """What every system's checkpoint carries besides weights and loop state: every rank's RNG state, so a resumed
    run draws the dropout masks an unbroken one would, the DataModule's tokenizer (`tokenizer_json`), so
    zero-shot, fine-tuning and the HF export need no data cache, and the system's class path
    (`system_class_path`), so a checkpoint given to the wrong config is refused by name; with `model.ema`, the
    average of the weights (lightning_modules/training/ema.py)."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = rng_states_of_all_ranks()
        # the system's own class: FSDP2's root is an instance of a subclass `fully_shard` made
        cls = next(c for c in type(self).__mro__ if not issubclass(c, FSDPModule))
        checkpoint[SYSTEM_CLASS_KEY] = f"{cls.__module__}.{cls.__qualname__}"
        dm = getattr(self._trainer, "datamodule", None) if self._trainer else None
        # CLIP's tokenizer (a whole-CLIP start) is not stored: the DataModule's settings name its source
        inner = getattr(getattr(dm, "tokenizer", None), "tokenizer", None)
        if inner is not None:
            checkpoint["tokenizer_json"] = inner.to_str()
        save_ema(self, checkpoint)

    def configure_model(self) -> None:
        # FSDP2 shards here, on the strategy's device mesh (one function for every system); other strategies
        # leave the model as built
        configure_parallelism(self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_rng_state(checkpoint, self.global_rank, self.trainer.world_size if self._trainer else 1)
        load_ema(self, checkpoint)

    def configure_callbacks(self) -> list[L.Callback]:
        # the system's `ema` section, when set: the average's updates and evaluation (lightning_modules/training/ema.py)
        return ema_callbacks(self)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary checkpoint files in `folder` that a writer of this host left when it was killed.

    Only names of the form `.<name>.tmp-<this host>-<pid>` are looked at (the framework's own), and only those whose
    process no longer exists are removed: another host's files (a shared file system) and a live writer's are kept.
    Returns the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    own = re.compile(rf"^\..+\.tmp-{re.escape(socket.gethostname())}-(\d+)$")
    removed = []
    for path in folder.iterdir():
        match = own.match(path.name)
        if match is None or path.is_symlink() or not path.is_file():
            continue
        if pid_is_alive(int(match.group(1))):
            continue
        path.unlink(missing_ok=True)  # missing_ok: another rank of this host may have removed it first
        removed.append(path)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint straight into `.<name>.tmp-<host>-<pid>` beside the target, fsyncs it, renames it
    over the target and fsyncs the folder. A process killed in the middle of a write leaves the previous checkpoint
    whole and loadable; the next start removes its temporary file (`remove_stale_temporaries`).

    Lightning's own writer serialises into memory and then goes through fsspec's transaction, a temporary file in
    `$TMPDIR` moved over the target: every checkpoint written twice, and a move across file systems that is a copy,
    not an atomic rename."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):  # object stores have no rename; their uploads are all-or-nothing anyway
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint got storage_options={storage_options!r}, which only "
                "object-store paths take; remove them or write to an s3:// or gs:// path"
            )
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(target)
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)  # atomic on POSIX: readers see the old file or the new one, never half
            fsync_folder(target.parent)
        finally:
            tmp.unlink(missing_ok=True)  # after an error only: a renamed file is gone from this name


class AtomicCheckpoints(L.Callback):
    """Makes the strategy write checkpoints with `AtomicCheckpointIO` when it uses plain torch.save files (DDP,
    single device), and at the start of `fit` removes the temporary files that writers killed during an earlier
    run of this host left in the checkpoint folders. FSDP's sharded and DeepSpeed's checkpoints are folders written
    by their own code: left as is."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.local_rank != 0:  # one process per host looks; each host removes only its own files
            return
        folders = {Path(trainer.default_root_dir) / "checkpoints"}
        folders |= {Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)}
        for folder in sorted(folders):
            if "://" in str(folder):
                continue
            for path in remove_stale_temporaries(folder):
                log.warning("removed %s, the temporary file of a checkpoint write that was killed", path)
