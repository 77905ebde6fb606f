"""An exponential moving average (EMA) of a system's weights, for every system (`model.ema`).

    the average starts as the weights training starts from (a fresh run's, or a resumed checkpoint's that has none)
    after optimizer step s:   s <= start_step                            average = weights
                              s > start_step, (s - start_step) % N == 0  average = decay average + (1 - decay) weights

The averages (trainable parameters and floating-point buffers) are plain tensors beside the model, so its
state-dict keys, DDP buffers and FSDP2 units stay as they are; under FSDP2 each rank averages its own shard.
The update is torch's `get_ema_multi_avg_fn`. Checkpoints keep them under `ema` and `state_dict` stays the raw
weights (see `docs/long-runs.md`). Lightning's `WeightAveraging` and torch's `AveragedModel` are not used:
both deep-copy the module, which an FSDP2-sharded system does not allow."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim.swa_utils import get_ema_multi_avg_fn

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "ema"  # a checkpoint file's averages: {state-dict name: tensor}
SHARDED_PREFIX = "ema."  # a sharded checkpoint's averages, among its state_dict entries


@dataclass
class EMAConfig:
    """An exponential moving average of the weights (`model.ema`), kept beside them and checkpointed."""

    decay: float = 0.9999
    """Weight of the previous average at each update; the average spans about 1 / (1 - decay) updates."""
    start_step: int = 0
    """Until this optimizer step the average is the weights themselves; averaging starts after it."""
    every_n_steps: int = 1
    """Update the average every this many optimizer steps (after start_step)."""
    evaluate: bool = True
    """Validation and test score the averaged weights (swapped in for the evaluation, then back)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"model.ema.decay must be in (0, 1), got {self.decay}")
        if self.start_step < 0:
            raise ValueError(f"model.ema.start_step must be >= 0, got {self.start_step}")
        if self.every_n_steps < 1:
            raise ValueError(f"model.ema.every_n_steps must be >= 1, got {self.every_n_steps}")


def averaged_tensors(module: nn.Module) -> dict[str, Tensor]:
    """What the average covers, by state-dict name: trainable parameters and floating-point buffers. A tensor
    under two names (tied embeddings) is taken once, under its first."""
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, value in module.state_dict(keep_vars=True).items():
        if not isinstance(value, Tensor) or id(value) in seen:
            continue
        if id(value) in trainable or (not isinstance(value, nn.Parameter) and value.is_floating_point()):
            seen.add(id(value))
            out[name] = value
    return out


class EMAWeights:
    """The averages of one module's weights (`averaged_tensors`), updated, swapped and checkpointed."""

    def __init__(self, config: EMAConfig, module: nn.Module) -> None:
        self.config = config
        # DeepSpeed ZeRO-3 partitions every parameter into a flat buffer of its own
        if any(hasattr(p, "ds_id") for p in module.parameters()):
            raise ValueError(
                "model.ema does not work with DeepSpeed ZeRO stage 3 (partitioned parameters): use FSDP2Strategy "
                "(configs/strategy/fsdp2.yaml), DDP or ZeRO stage 1-2"
            )
        live = averaged_tensors(module)
        self.names = list(live)
        self.live = [t.detach() for t in live.values()]
        with torch.no_grad():
            self.average = [t.clone() for t in self.live]
        self.update_fn = get_ema_multi_avg_fn(config.decay)
        self.last_step = 0  # the optimizer step of the last update

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Update after optimizer step `step` (the trainer's global_step) as the config says; False if not due."""
        cfg = self.config
        if step <= self.last_step:  # a gradient-accumulation batch: no new optimizer step
            return False
        self.last_step = step
        if step <= cfg.start_step:
            for average, live in zip(self.average, self.live, strict=True):  # DTensor has no foreach copy
                average.copy_(live)
            return True
        if (step - cfg.start_step) % cfg.every_n_steps:
            return False
        self.update_fn(self.average, self.live, None)
        return True

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the values of the weights and of the averages (in place: optimizers, DDP and FSDP2 keep their
        tensors)."""
        for live, average in zip(self.live, self.average, strict=True):
            raw = live.clone()
            live.copy_(average)
            average.copy_(raw)

    def state(self) -> dict[str, Tensor]:
        """The averages by name, as full CPU tensors (gathered from the ranks' shards under FSDP2: every rank
        must call this)."""
        return {
            name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().to("cpu", copy=True)
            for name, t in zip(self.names, self.average, strict=True)
        }

    @torch.no_grad()
    def load(self, state: Mapping[str, Tensor], where: str) -> None:
        """Take the averages of `state` (full tensors by name; each rank keeps its shard of a sharded one)."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(
                f"{where}: its EMA weights lack {len(missing)} of the model's averaged tensors (e.g. {missing[0]})"
            )
        for name, average in zip(self.names, self.average, strict=True):
            value = state[name]
            if isinstance(
                average, DTensor
            ):  # every rank read the whole tensor: each takes its shard, no comms
                value = distribute_tensor(
                    value.to(average.device), average.device_mesh, average.placements, src_data_rank=None
                )
            average.copy_(value)


def ema_config(module: L.LightningModule) -> EMAConfig | None:
    """The system's `ema` section (its hyperparameter), or None; stored back as a plain dict, so checkpoints load
    with `weights_only=True`."""
    hparams = getattr(module, "hparams", {})
    value = hparams.get("ema") if isinstance(hparams, Mapping) else None
    if value is None:
        return None
    if is_dataclass(value):
        hparams["ema"] = asdict(value)
        return value
    return EMAConfig(**value)


def ema_of(module: L.LightningModule) -> EMAWeights | None:
    """The system's averages, made from its current weights on first use (after FSDP2 has sharded them)."""
    config = ema_config(module)
    if config is None:
        return None
    weights = module.__dict__.get("_ema_weights")
    if weights is None:
        weights = EMAWeights(config, module)
        module.__dict__["_ema_weights"] = weights  # not an nn.Module attribute: not in the state dict
    return weights


class EMACallback(L.Callback):
    """Updates a system's averages after each optimizer step and swaps them in for validation and test
    (`model.ema.evaluate`). The system returns it from `configure_callbacks`."""

    def __init__(self) -> None:
        self.swapped: EMAWeights | None = None  # the averages while they sit in the model's place

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ema = ema_of(pl_module)  # a checkpoint's restored average, or one made from the current weights
        if ema is not None:
            ema.last_step = max(ema.last_step, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        ema = ema_of(pl_module)
        if ema is not None:
            ema.update(trainer.global_step)

    def _swap_in(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ema = ema_of(pl_module)
        if ema is not None and ema.config.evaluate and self.swapped is None:
            ema.swap()
            self.swapped = ema

    def _swap_back(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.swapped is not None:
            self.swapped.swap()
            self.swapped = None

    # Callbacks' epoch-end hooks run before the system's, which only compute metrics from what the steps gathered
    on_validation_epoch_start = on_test_epoch_start = _swap_in
    on_validation_epoch_end = on_test_epoch_end = on_exception = _swap_back


def ema_callbacks(module: L.LightningModule) -> list[L.Callback]:
    """What a system's `configure_callbacks` returns for its `ema` section."""
    return [EMACallback()] if ema_config(module) is not None else []


def save_ema(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Add the averages to a checkpoint being written (`on_save_checkpoint`, on every rank)."""
    ema = ema_of(module)
    if ema is None:
        return
    if isinstance(checkpoint.get("hyper_parameters"), dict) and "ema" in checkpoint["hyper_parameters"]:
        checkpoint["hyper_parameters"]["ema"] = module.hparams["ema"]  # the plain dict `ema_config` made
    state = checkpoint.get("state_dict") or {}
    if any(
        isinstance(v, DTensor) for v in state.values()
    ):  # a sharded checkpoint: each rank writes its shards
        for name, average in zip(ema.names, ema.average, strict=True):
            state[SHARDED_PREFIX + name] = average
    else:
        checkpoint[CHECKPOINT_KEY] = ema.state()


def load_ema(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Restore the averages from a checkpoint being loaded (`on_load_checkpoint`, before the weights are):
    its `ema` entry, `ema.` state-dict entries, or the shards of a sharded folder. A checkpoint written without
    EMA starts the average from its weights."""
    state = checkpoint.get("state_dict") or {}
    sharded_keys = [k for k in state if k.startswith(SHARDED_PREFIX)]
    found = {k.removeprefix(SHARDED_PREFIX): state.pop(k) for k in sharded_keys}  # never loaded as weights
    ema = ema_of(module)
    if ema is None:
        return
    trainer = module._trainer
    path = Path(str(trainer.ckpt_path)) if trainer is not None and trainer.ckpt_path else None
    where = str(path or "the checkpoint")
    if CHECKPOINT_KEY in checkpoint:
        ema.load(checkpoint[CHECKPOINT_KEY], where)
    elif found:
        ema.load(found, where)
    elif path is not None and path.is_dir() and (path / ".metadata").is_file():
        _load_sharded(ema, path)
    else:
        module.__dict__.pop("_ema_weights")  # made again from the loaded weights on first use
        log.warning("%s holds no EMA weights: the average starts from its weights", where)
        return
    ema.last_step = int(checkpoint.get("global_step", 0))


def _load_sharded(ema: EMAWeights, folder: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader, load

    keys = {SHARDED_PREFIX + n for n in ema.names}
    saved = {k for k in FileSystemReader(folder).read_metadata().state_dict_metadata}
    if not any(f"state_dict.{k}" in saved for k in keys):
        raise ValueError(f"{folder}: this sharded checkpoint holds no EMA weights (model.ema was not set)")
    state = {SHARDED_PREFIX + n: t for n, t in zip(ema.names, ema.average, strict=True)}
    load({"state_dict": state}, checkpoint_id=folder)  # into the averages' own shards


def move_sharded_ema(checkpoint: dict[str, Any]) -> None:
    """A consolidated sharded checkpoint: its `ema.` state-dict entries go to the `ema` key of the file."""
    state = checkpoint.get("state_dict") or {}
    found = {
        k.removeprefix(SHARDED_PREFIX): state.pop(k)
        for k in [k for k in state if k.startswith(SHARDED_PREFIX)]
    }
    if found:
        checkpoint[CHECKPOINT_KEY] = found


def use_ema_weights(
    module: nn.Module, checkpoint: Mapping[str, Any], path: str | Path, prefix: str = ""
) -> None:
    """Give `module` (built and loaded from `checkpoint`) the averaged weights the checkpoint holds: what
    `export --ema` and `export-hf --ema` write. `prefix`: where `module` sits in the system whose averages the
    checkpoint holds (`pair.` for a system's contrastive core). Tensors without an average (a locked tower's,
    which never changed) keep their trained values."""
    state = checkpoint.get(CHECKPOINT_KEY)
    if not state:
        raise ValueError(f"{path} holds no EMA weights: train with model.ema set, or export without --ema")
    state = {name.removeprefix(prefix): value for name, value in state.items() if name.startswith(prefix)}
    own = module.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown or not state:
        raise ValueError(
            f"{path}: its EMA weights do not fit the model (e.g. {(unknown or ['none at all'])[0]})"
        )
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)


def add_ema_switch(parser: Any) -> None:
    """The `--ema` switch of the export commands."""
    parser.add_argument(
        "--ema",
        action="store_true",
        help="write the averaged weights (model.ema) instead of the trained ones",
    )
