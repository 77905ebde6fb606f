"""A callback for resume tests, usable from the CLI: it records which samples each training step saw and can
kill its own process with SIGKILL at a chosen step, as a crash would (no teardown, no final checkpoint)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch

# the per-sample id a batch carries, by task: MLM instances, LibriSpeech utterances
ID_KEYS = ("index", "utt_keys")


class RecordSampleIds(L.Callback):
    """Appends one JSON line per training step to `<path>.rank<r>`: global step, epoch, batch index, the
    batch's sample ids, a digest of its content, the loss and the learning rate. With `kill_at_step`, the
    process SIGKILLs itself once that step's line is written (checkpoint callbacks run after this one, so a
    checkpoint due at the same step is not written)."""

    def __init__(self, path: str, kill_at_step: int | None = None) -> None:
        self.path = path
        self.kill_at_step = kill_at_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        key = next(k for k in ID_KEYS if k in batch)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        record = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "batch_idx": batch_idx,
            "ids": batch[key].tolist(),
            "content": content_digest(batch),
            "loss": None if loss is None else float(loss),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.kill_at_step is not None and trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)


def content_digest(batch: dict[str, Any]) -> str:
    """A digest of every tensor in the batch (masks, labels, waveforms): equal batches, not only equal ids."""
    h = hashlib.sha1()
    for key in sorted(batch):
        if isinstance(batch[key], torch.Tensor):
            h.update(key.encode())
            h.update(batch[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def read_records(path: str | Path, rank: int = 0) -> list[dict]:
    lines = Path(f"{path}.rank{rank}").read_text().splitlines()
    return [json.loads(line) for line in lines]
