"""Training throughput and model FLOPs utilisation (MFU) of every system, logged at the logger's interval.

Lightning's `ThroughputMonitor` synchronises CUDA after every batch; this callback keeps the per-batch work on the
device (token and audio counts are summed there) and synchronises once per logging interval, when the logger reads
the metrics anyway. The FLOPs of one training batch (forward, backward and optimizer step, as run) are counted once,
on the first batch, with `torch.utils.flop_counter.FlopCounterMode`; MFU = counted FLOPs x batches/s / the device's
dense bf16 peak.

Keys (all ranks together, from this rank's counts x the world size): `train/samples_per_sec`,
`train/tokens_per_sec` (text: non-padding tokens), `train/audio_sec_per_sec` (speech: seconds of audio),
`train/tflops_per_device` and `train/mfu` (only where the peak is known: a GPU named in `PEAK_TFLOPS`, or
`peak_tflops` given).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger(__name__)

# dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name(); the first
# match wins, so the specific names come before the general ones
PEAK_TFLOPS: dict[str, float] = {
    "GH200": 989.0,
    "H200": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H800": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,  # fp16: V100 has no bf16
    "T4": 65.0,  # fp16
}


def peak_tflops_of(device: torch.device) -> float | None:
    """The dense bf16 peak of a known GPU, in TFLOP/s; None for CPUs and unknown devices."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def batch_counts(batch: Any, sample_rate: int = 16000) -> dict[str, Tensor | int]:
    """What one batch holds: `samples` (rows), `tokens` (1s of every `attention_mask`) and `audio_sec` (the
    `wave_lengths` over `sample_rate`). Nested batches (the tri-modal system's one per task) add up. The counts
    are device tensors: reading them is left to the logging step."""
    counts: dict[str, Tensor | int] = {}
    if not isinstance(batch, Mapping):
        return counts
    subs = [v for v in batch.values() if isinstance(v, Mapping)]
    for sub in subs:
        for key, value in batch_counts(sub, sample_rate).items():
            counts[key] = counts.get(key, 0) + value
    if subs:
        return counts
    rows = next(
        (v for k in ("input_ids", "waveforms", "images") if isinstance(v := batch.get(k), Tensor)), None
    )
    if rows is not None:
        counts["samples"] = rows.shape[0]
    if isinstance(mask := batch.get("attention_mask"), Tensor):
        counts["tokens"] = mask.sum()
    if isinstance(lengths := batch.get("wave_lengths"), Tensor):
        counts["audio_sec"] = lengths.sum() / sample_rate
    return counts


class Throughput(L.Callback):
    """samples/s, tokens/s, audio seconds/s and MFU over each logging interval (module doc)."""

    def __init__(self, peak_tflops: float | None = None, count_flops: bool = True) -> None:
        """
        Args:
            peak_tflops: the device's dense peak in TFLOP/s for MFU; None: looked up by GPU name (`PEAK_TFLOPS`),
                and no MFU on CPUs or unknown devices.
            count_flops: count the FLOPs of the first training batch (needed for MFU and TFLOP/s).
        """
        self.peak_tflops = peak_tflops
        self.count_flops = count_flops
        self.flops_per_batch: int | None = None
        self._counter: FlopCounterMode | None = None
        self._sums: dict[str, Tensor | int] = {}
        self._batches = 0
        self._start: float | None = None
        self._peak_flops: float | None = None

    def _peak(self, trainer: L.Trainer) -> float | None:
        tflops = self.peak_tflops or peak_tflops_of(trainer.strategy.root_device)
        return tflops * 1e12 if tflops else None

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sums, self._batches, self._start = {}, 0, None
        self._peak_flops = self._peak(trainer)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int
    ) -> None:
        # counted only where MFU can be told: the counter slows its batch down
        if self.count_flops and self.flops_per_batch is None and self._peak_flops and self._counter is None:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops_per_batch, self._counter = self._counter.get_total_flops(), None
        if self._start is None:  # the first batch (compilation, FLOP counting) is not timed
            self._sync(trainer)
            self._start = time.perf_counter()
            return
        dm = trainer.datamodule if trainer.datamodule is not None else None
        rate = int(getattr(dm, "hparams", {}).get("sample_rate", 16000)) if dm is not None else 16000
        for key, value in batch_counts(batch, rate).items():
            self._sums[key] = self._sums.get(key, 0) + value
        self._batches += 1
        if (trainer.global_step % trainer.log_every_n_steps) != 0 or not trainer.loggers:
            return
        self._sync(trainer)  # once per interval: the logger reads the metrics now anyway
        now = time.perf_counter()
        elapsed, self._start = now - self._start, now
        world = trainer.world_size
        values = {f"train/{k}_per_sec": float(v) * world / elapsed for k, v in self._sums.items()}
        if self.flops_per_batch:
            per_device = self.flops_per_batch * self._batches / elapsed
            values["train/tflops_per_device"] = per_device / 1e12
            if self._peak_flops:
                values["train/mfu"] = per_device / self._peak_flops
        self._sums, self._batches = {}, 0
        for key, value in values.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._counter is not None:  # a run that ended inside its first batch
            self._counter.__exit__(None, None, None)
            self._counter = None
