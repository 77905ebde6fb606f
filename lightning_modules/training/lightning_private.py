"""The framework's only uses of Lightning's private names, in one place that checks them before use. Two: the
training loop's per-step SIGTERM broadcast (`_TrainingEpochLoop._broadcast_sigterm_tensor`), switched off while
`PreemptionCheckpoint` carries the signal in the step's all-reduce, and `LightningCLI._parse_ckpt_path`, which the
CLI overrides to read flat hyper-parameters, and checkpoints saved from Python, into the model's sections. Each
function raises a RuntimeError naming the installed Lightning and the missing name when an upgrade removed it;
tests/training/test_lightning_private.py checks the names and their signatures on the installed Lightning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning_modules.training.checkpoints import SYSTEM_CLASS_KEY, read_checkpoint, resolve_class

SIGTERM_BROADCAST = "_broadcast_sigterm_tensor"
PARSE_CKPT_PATH = "_parse_ckpt_path"


def require_private(owner: Any, name: str) -> None:
    """Raise a one-line RuntimeError unless `owner` (a class or an object of Lightning) has the private `name`."""
    if not hasattr(owner, name):
        where = owner.__name__ if isinstance(owner, type) else type(owner).__name__
        raise RuntimeError(
            f"lightning {L.__version__} has no {where}.{name}, a private name this framework relies on "
            "(lightning_modules/training/lightning_private.py); install a lightning version its setup.cfg allows"
        )


def _no_sigterm_broadcast() -> None:
    """Stands in for Lightning's per-step SIGTERM broadcast while `PreemptionCheckpoint` owns the signal."""


def silence_sigterm_broadcast(trainer: L.Trainer) -> None:
    """Switch off the broadcast of rank 0's SIGTERM flag that Lightning's training loop runs before every step (a
    collective and a device-to-host read), for this trainer's run only."""
    epoch_loop = trainer.fit_loop.epoch_loop
    require_private(epoch_loop, SIGTERM_BROADCAST)
    setattr(epoch_loop, SIGTERM_BROADCAST, _no_sigterm_broadcast)


def restore_sigterm_broadcast(trainer: L.Trainer) -> None:
    """Give the training loop back Lightning's own broadcast (the class's method), if it was switched off."""
    vars(trainer.fit_loop.epoch_loop).pop(SIGTERM_BROADCAST, None)


def parse_ckpt_path_into_sections(cli: LightningCLI) -> None:
    """`LightningCLI._parse_ckpt_path` (the hyper-parameters of `--ckpt_path` read into the config), with those of
    checkpoints with flat arguments (`lr`, `hidden_size`, ...) read into the model's sections first by the model
    class's `upgrade_hparams`. A checkpoint saved from Python (`trainer.save_checkpoint` in a notebook) names no
    `_class_path` among its hyper-parameters: its system is the one it recorded (`system_class_path`), else the
    config's model. Paths that are no file take Lightning's own path."""
    require_private(LightningCLI, PARSE_CKPT_PATH)
    subcommand = cli.config.get("subcommand")
    cfg = cli.config[subcommand] if subcommand else {}
    ckpt_path, model = cfg.get("ckpt_path"), cfg.get("model")
    if not ckpt_path or not Path(ckpt_path).is_file():
        return getattr(LightningCLI, PARSE_CKPT_PATH)(cli)
    ckpt = read_checkpoint(ckpt_path, needs=())
    hparams = dict(ckpt.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    if not hparams:
        return None
    configured = getattr(model, "class_path", None)
    upgrade = getattr(resolve_class(configured or ""), "upgrade_hparams", None)
    if upgrade is not None:
        hparams = upgrade(hparams)
    class_path = hparams.pop("_class_path", None) or ckpt.get(SYSTEM_CLASS_KEY) or configured
    if class_path:
        hparams = {"class_path": class_path, "dict_kwargs": hparams}
    cli.config = cli.parser.parse_object({subcommand: {"model": hparams}}, cli.config)
    return None
