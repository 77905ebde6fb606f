"""What long runs need to survive: non-finite losses skipped and counted, checkpoints written atomically, a last
checkpoint on SIGTERM (SLURM preemption) before the job exits and is requeued."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_modules.rng import restore_rng_state, rng_states_of_all_ranks

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def finite_or_skip(module: L.LightningModule, loss: Tensor, max_in_row: int) -> Tensor | None:
    """Return `loss`, or None when it is NaN or Inf on any rank, which makes Lightning skip the backward pass and
    the optimizer step on every rank together (a rank skipping alone would leave the others waiting in the
    gradient all-reduce). Skips are counted in `train/nonfinite_skipped`; after `max_in_row` in a row the run
    stops with a message that says so."""
    bad = (~torch.isfinite(loss.detach())).float()
    trainer = module._trainer
    if trainer is not None and trainer.world_size > 1:
        bad = trainer.strategy.reduce(bad, reduce_op="max")
    skipped_total = getattr(module, "_nonfinite_total", 0)
    in_row = getattr(module, "_nonfinite_in_row", 0)
    if bad.item() > 0:
        skipped_total, in_row = skipped_total + 1, in_row + 1
        rank_zero_warn(
            f"non-finite loss ({loss.item()}) at step {module.global_step}: step skipped "
            f"({in_row} in a row, {skipped_total} in all)"
        )
    else:
        in_row = 0
    module._nonfinite_total, module._nonfinite_in_row = skipped_total, in_row
    if trainer is not None:
        module.log("train/nonfinite_skipped", float(skipped_total), on_step=True, on_epoch=False)
    if in_row >= max_in_row > 0:
        raise NonFiniteLossError(
            f"the loss was NaN or Inf {in_row} steps in a row (step {module.global_step}): the run is diverging. "
            "Lower the learning rate, add warmup or gradient clipping (--trainer.gradient_clip_val 1.0), or "
            "resume from an earlier checkpoint"
        )
    return None if in_row else loss


def zero_loss(module: L.LightningModule) -> Tensor:
    """A loss of exactly zero that reaches every trainable parameter: its backward gives zero gradients, touches
    nothing non-finite, and lets every rank join DDP's gradient all-reduce."""
    return torch.stack([p.sum() * 0.0 for p in module.parameters() if p.requires_grad]).sum()


# where a checkpoint names the class of the system that wrote it
SYSTEM_CLASS_KEY = "system_class_path"


class CheckpointExtras(L.LightningModule):
    """What every system's checkpoint carries besides weights and loop state: every rank's RNG state, so a resumed
    run draws the dropout masks an unbroken one would, the DataModule's tokenizer (`tokenizer_json`), so
    zero-shot, fine-tuning and the HF export need no data cache, and the system's class path
    (`system_class_path`), so a checkpoint given to the wrong config is refused by name."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = rng_states_of_all_ranks()
        checkpoint[SYSTEM_CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"
        dm = getattr(self._trainer, "datamodule", None) if self._trainer else None
        tokenizer = getattr(dm, "tokenizer", None)
        if tokenizer is not None:
            checkpoint["tokenizer_json"] = tokenizer.tokenizer.to_str()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_rng_state(checkpoint, self.global_rank, self.trainer.world_size if self._trainer else 1)


class SkipNonFiniteSteps(L.LightningModule):
    """Automatic optimisation that survives NaN/Inf losses, also under DDP.

    Lightning refuses a `training_step` that returns None in distributed training, so a step with a non-finite loss
    (on any rank: `finite_or_skip` all-reduces the decision) returns `zero_loss` instead, every rank runs its
    backward, and `optimizer_step` leaves the optimizer untouched: no update, no Adam moment change, no weight
    decay. A subclass returns `self.skip_if_nonfinite(loss)` from `training_step`.
    """

    max_nonfinite_in_row: int = 20
    _skip_update: bool = False

    def skip_if_nonfinite(self, loss: Tensor) -> Tensor:
        if finite_or_skip(self, loss, self.max_nonfinite_in_row) is not None:
            return loss
        self._skip_update = True  # sticky over accumulated micro-batches until the optimizer step
        return zero_loss(self)

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        if optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        loss = optimizer_closure()  # training_step and backward, as Lightning's own step would run them
        skip, self._skip_update = self._skip_update, False
        if not skip:
            optimizer.step(closure=lambda: loss)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, flushes it to disk, then renames it over the
    target. A process killed in the middle of a write leaves the previous checkpoint whole and loadable."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        target = Path(path)
        if "://" in str(path):  # object stores have no rename; their uploads are all-or-nothing anyway
            return super().save_checkpoint(checkpoint, path, storage_options)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)  # atomic on POSIX: readers see the old file or the new one, never half
        finally:
            if tmp.exists():
                tmp.unlink()


class AtomicCheckpoints(L.Callback):
    """Makes the strategy write checkpoints with `AtomicCheckpointIO` when it uses plain torch.save files (DDP,
    single device). FSDP's sharded and DeepSpeed's checkpoints are folders written by their own code: left as is."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (SLURM preemption or time limit with `--signal=TERM@120`, Kubernetes eviction, `kill`), finish
    the current step, write `last.ckpt`, requeue the SLURM job when asked, and exit; Lightning stops the run
    right after this hook. Resume with `fit ... --ckpt_path last`.

    Every rank takes the decision together (a rank saving alone would wait forever in the collective save).
    """

    def __init__(self, requeue: bool = True, filename: str = "last.ckpt") -> None:
        """
        Args:
            requeue: under SLURM, run `scontrol requeue $SLURM_JOB_ID` after the checkpoint is written.
            filename: checkpoint file name, in the first ModelCheckpoint's folder.
        """
        self.requeue = requeue
        self.filename = filename
        self.saved_path: Path | None = None

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) if callback is not None else None
        return Path(folder or Path(trainer.default_root_dir) / "checkpoints") / self.filename

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        received = bool(trainer.received_sigterm)
        if trainer.world_size > 1:
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received or self.saved_path is not None:
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path = path
        log.warning("SIGTERM: wrote %s at step %d; resume with --ckpt_path last", path, trainer.global_step)
        job = os.environ.get("SLURM_JOB_ID")
        if self.requeue and job and trainer.is_global_zero:
            array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
            job = f"{array_job}_{task}" if array_job and task else job
            result = subprocess.run(["scontrol", "requeue", job], check=False)
            log.warning("scontrol requeue %s: exit status %d", job, result.returncode)
        # every rank stops: those that did not receive the signal themselves too
        trainer.should_stop = True
        trainer._signal_connector.received_sigterm = True
