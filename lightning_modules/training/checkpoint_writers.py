"""The two checkpoint writers every training run has, as the CLI's top-level config sections `checkpoint` (the
best by a validation metric) and `last_checkpoint` (`last.ckpt` every so many steps). A config states only what
differs from the defaults below, e.g. `checkpoint: {monitor: val/R@mean, mode: max}`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lightning.pytorch.callbacks import ModelCheckpoint

# relative interpolation: from the section (`fit.checkpoint`) to the trainer's folder (`fit.trainer`)
CHECKPOINT_DIR = "${..trainer.default_root_dir}/checkpoints"


@dataclass
class CheckpointWriter:
    """A `ModelCheckpoint` with the settings the configs use; more options: add a ModelCheckpoint of your own to
    trainer.callbacks."""

    dirpath: str | None = CHECKPOINT_DIR
    """Folder of the checkpoint files; by default `<trainer.default_root_dir>/checkpoints`."""
    filename: str | None = None
    """File name pattern, e.g. best-{step}; None: Lightning's epoch=N-step=M."""
    monitor: str | None = None
    """Metric to rank by (val/loss, val/R@mean, val/f1, ...); None: no ranking."""
    mode: Literal["min", "max"] = "min"
    """Whether a smaller or a larger `monitor` is better."""
    save_top_k: int = 1
    """How many of the best to keep; 0: none (a writer of last.ckpt only)."""
    save_last: bool | None = None
    """Also write last.ckpt."""
    every_n_train_steps: int | None = None
    """Write every so many training steps (steps, not time: a time trigger broadcasts rank 0's clock every batch);
    None: when validation ends, ranked on that validation's value."""

    def build(self) -> ModelCheckpoint:
        return ModelCheckpoint(
            dirpath=self.dirpath,
            filename=self.filename,
            monitor=self.monitor,
            mode=self.mode,
            save_top_k=self.save_top_k,
            save_last=self.save_last,
            every_n_train_steps=self.every_n_train_steps,
        )


# the best by validation loss, saved when validation ends and ranked on that validation's value (a step trigger
# would rank on the value of the validation before)
BEST = CheckpointWriter(monitor="val/loss", mode="min", save_top_k=1, filename="best-{step}")
# last.ckpt alone, from the start, so a run killed before its first validation resumes with --ckpt_path last
# (SIGTERM and SLURM's requeue signal write it at once: PreemptionCheckpoint)
LAST = CheckpointWriter(save_top_k=0, save_last=True, every_n_train_steps=1000)
