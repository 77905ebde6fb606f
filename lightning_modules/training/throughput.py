"""Training throughput and model FLOPs utilisation (MFU) of every system, logged at the logger's interval.

Lightning's `ThroughputMonitor` synchronises CUDA after every batch; this callback sums its counts on the
device and synchronises once per logging interval, when the logger reads the metrics anyway. The FLOPs of one
training batch are counted once, on the first, by `FlopCounterMode` under
`torch.compiler.set_stance("force_eager")` (Dynamo does not run compiled frames under a dispatch mode), per
unit of work: audio seconds (speech), else non-padding tokens (text), else rows (images). MFU is FLOPs per
second over the device's dense bf16 peak, logged as `train/hfu` under activation checkpointing, whose
recomputed forward is counted too. Keys and peaks: `docs/scale-and-gpus.md`."""

from __future__ import annotations

import contextlib
import logging
import re
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
    "H200 NVL": 835.0,
    "H200": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H800 PCIe": 756.0,
    "H800": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "A30": 165.0,
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

# streaming multiprocessors of the whole GPU, for the GPUs that can be split into MIG slices: a slice's peak is
# its share of them
FULL_GPU_SMS: dict[str, int] = {
    "GH200": 132,
    "H200": 132,
    "H100 PCIe": 114,
    "H100": 132,
    "H800 PCIe": 114,
    "H800": 132,
    "B200": 148,
    "A100": 108,
    "A800": 108,
    "A30": 56,
}


def _first_match(table: dict, name: str):
    return next((value for key, value in table.items() if key in name), None)


def mig_share(device: torch.device, name: str) -> float:
    """The share of the whole GPU's compute a MIG slice has (its SMs over the GPU's); 1 for a whole GPU. A GPU
    whose SM count is not in `FULL_GPU_SMS` is taken from the slice's name, `<g>g.<memory>`: g of 7 slices."""
    if "MIG" not in name:
        return 1.0
    full = _first_match(FULL_GPU_SMS, name)
    if full:
        return min(1.0, torch.cuda.get_device_properties(device).multi_processor_count / full)
    match = re.search(r"MIG (\d+)g\.", name)
    return int(match.group(1)) / 7 if match else 1.0


def peak_tflops_of(device: torch.device) -> float | None:
    """The dense bf16 peak of a known GPU or of its MIG slice, in TFLOP/s; None for CPUs and unknown devices."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    tflops = _first_match(PEAK_TFLOPS, name)
    return tflops * mig_share(device, name) if tflops else None


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


def work_unit(counts: Mapping[str, Tensor | int]) -> str | None:
    """The count FLOPs scale with: audio seconds, else tokens, else rows."""
    return next((key for key in ("audio_sec", "tokens", "samples") if key in counts), None)


def recomputes_activations(module: torch.nn.Module) -> bool:
    """Whether activation checkpointing is on anywhere in `module`: ours (`gradient_checkpointing`), Hugging
    Face's (`is_gradient_checkpointing`), or blocks wrapped by the FSDP strategies (`CheckpointWrapper`)."""
    return any(
        getattr(m, "gradient_checkpointing", False) is True
        or getattr(m, "is_gradient_checkpointing", False) is True
        or type(m).__name__ == "CheckpointWrapper"
        for m in module.modules()
    )


class Throughput(L.Callback):
    """samples/s, tokens/s, audio seconds/s and MFU (or HFU) over each logging interval (module doc)."""

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
        self.flops_per_unit: float | None = None
        self.unit: str | None = None
        self._counting: contextlib.ExitStack | None = None
        self._counter: FlopCounterMode | None = None
        self._sums: dict[str, Tensor | int] = {}
        self._batches = 0
        self._untimed = 0
        self._start: float | None = None
        self._peak_flops: float | None = None
        self._utilisation_key = "train/mfu"
        self._last_step = 0

    def _peak(self, trainer: L.Trainer) -> float | None:
        tflops = self.peak_tflops or peak_tflops_of(trainer.strategy.root_device)
        return tflops * 1e12 if tflops else None

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sums, self._batches, self._start = {}, 0, None
        self._peak_flops = self._peak(trainer)
        self._last_step = trainer.global_step
        # the counted batch runs eagerly and the next one compiles: neither is timed
        counting = self.count_flops and self.flops_per_batch is None and self._peak_flops
        self._untimed = 2 if counting else 1
        self._utilisation_key = "train/hfu" if recomputes_activations(pl_module) else "train/mfu"

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int
    ) -> None:
        # counted only where MFU can be told: the counter slows its batch down
        if self.count_flops and self.flops_per_batch is None and self._peak_flops and self._counting is None:
            self._counting = contextlib.ExitStack()
            # compiled frames run eagerly, so the counter sees their operators and Dynamo caches nothing
            self._counting.enter_context(torch.compiler.set_stance("force_eager"))
            self._counter = self._counting.enter_context(FlopCounterMode(display=False))

    def _rate(self, trainer: L.Trainer) -> int:
        dm = trainer.datamodule if trainer.datamodule is not None else None
        return int(getattr(dm, "hparams", {}).get("sample_rate", 16000)) if dm is not None else 16000

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        counts = batch_counts(batch, self._rate(trainer))
        if self._counting is not None:
            self._counting.close()
            self.flops_per_batch, self._counting = self._counter.get_total_flops(), None
            self._counter = None
            self.unit = work_unit(counts)
            units = float(counts[self.unit]) if self.unit else 0.0  # read once, on this slow batch
            self.flops_per_unit = self.flops_per_batch / units if units else None
        stepped = trainer.global_step != self._last_step  # the last micro-batch of an accumulation
        self._last_step = trainer.global_step
        if self._untimed:  # the counted batch and the one that compiles are not timed
            self._untimed -= 1
            if not self._untimed:
                self._sync(trainer)
                self._start = time.perf_counter()
            return
        for key, value in counts.items():
            self._sums[key] = self._sums.get(key, 0) + value
        self._batches += 1
        if not stepped or trainer.global_step % trainer.log_every_n_steps != 0 or not trainer.loggers:
            return
        self._sync(trainer)  # once per interval, when the logger reads the metrics anyway
        now = time.perf_counter()
        elapsed, self._start = now - self._start, now
        world = trainer.world_size
        values = {f"train/{k}_per_sec": float(v) * world / elapsed for k, v in self._sums.items()}
        if self.flops_per_unit and self.unit in self._sums:
            per_device = self.flops_per_unit * float(self._sums[self.unit]) / elapsed
            values["train/tflops_per_device"] = per_device / 1e12
            if self._peak_flops:
                values[self._utilisation_key] = per_device / self._peak_flops
        self._sums, self._batches = {}, 0
        for key, value in values.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._counting is not None:  # a run that ended inside its first batch
            self._counting.close()
            self._counting = self._counter = None
