"""Checkpoints of this framework: which system wrote one (`check_system`) and the model of a sharded
(torch.distributed.checkpoint) folder (`read_sharded_model`). `read_checkpoint`, the one place a checkpoint file is
unpickled, lives in datamodules/checkpoint_file.py (the tokenizer a checkpoint carries is read through it too) and is
re-exported here.

Every loader of the library (zero-shot, fine-tuning's encoder, the text tower's MLM start, the tokenizer a
checkpoint carries) and every command of cli.py reads through here; cli.py re-exports these names.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
from pathlib import Path

import torch
from torch import Tensor

import lightning_modules
from datamodules.checkpoint_file import (  # noqa: F401  (CheckpointNotFoundError, read_checkpoint: re-exported)
    CheckpointError,
    CheckpointNotFoundError,
    first_line,
    read_checkpoint,
)

# where a checkpoint names the class of the system that wrote it (CheckpointExtras writes it)
SYSTEM_CLASS_KEY = "system_class_path"


def read_sharded_model(folder: str | os.PathLike) -> dict[str, Tensor]:
    """The model's full `state_dict` from a sharded checkpoint folder (torch.distributed.checkpoint, as Lightning's
    ModelParallelStrategy writes it: `state_dict`, `optimizer_0`, ... and meta.pt).

    Only the model's tensors are read: tensors of the sizes the folder's .metadata records are allocated and
    torch.distributed.checkpoint fills them, shard by shard. The optimizer state is never read, and nothing is
    unpickled (torch.distributed.checkpoint reads non-tensor entries with full pickle; the model holds none)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(folder)
    reader = FileSystemReader(folder)
    try:
        metadata = reader.read_metadata()
    except Exception as err:
        raise CheckpointError(f"{folder}: its .metadata cannot be read ({first_line(err)})") from None
    paths = metadata.planner_data or {}
    state: dict[str, Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        where = paths.get(key, (key,))
        if len(where) != 2 or where[0] != "state_dict":
            continue  # the optimizers' state, or nothing of the model
        if not isinstance(item, TensorStorageMetadata):
            raise CheckpointError(
                f"{folder}: the model state holds {where[1]!r}, which is no tensor; it is not unpickled here"
            )
        state[where[1]] = torch.empty(item.size, dtype=item.properties.dtype)
    if not state:
        raise CheckpointError(
            f"{folder}: the sharded checkpoint holds no model state (no state_dict entries)"
        )
    try:
        load({"state_dict": state}, storage_reader=reader, no_dist=True)
    except Exception as err:
        raise CheckpointError(f"{folder}: damaged ({first_line(err)})") from None
    return state


# Which system wrote a checkpoint -----------------------------------------------------------------------------
def resolve_class(class_path: str) -> type | None:
    """The class a dotted path names, or None when it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _init_args(cls: type) -> set[str]:
    """The keyword arguments `cls(...)` takes, following `**kwargs` up to the parent class that takes them."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def _systems() -> list[type]:
    """Every LightningModule defined in lightning_modules."""
    import lightning as L

    found = []
    for info in pkgutil.iter_modules(lightning_modules.__path__):
        module = importlib.import_module(f"lightning_modules.{info.name}")
        found += [
            c
            for c in vars(module).values()
            if isinstance(c, type) and issubclass(c, L.LightningModule) and c.__module__ == module.__name__
        ]
    return found


def _system_from_hparams(hparams: dict, expected: type) -> str | None:
    """For a checkpoint that does not name its system (one without `system_class_path`, or saved from Python):
    None when `expected` takes its hyper-parameters, else the system that does, or a description."""
    from lightning_modules.training.hparams import (
        sections_from_flat,  # flat encoder / optimizer names: their sections
    )

    names = {k for k in sections_from_flat(hparams) if not k.startswith("_")}
    if not names or names <= _init_args(expected):
        return None
    fits = [c for c in _systems() if names <= _init_args(c)]
    if fits:
        return min(fits, key=lambda c: len(_init_args(c) - names)).__name__  # the closest fit
    foreign = ", ".join(sorted(names - _init_args(expected))[:4])
    return f"a system with hyper-parameters that {expected.__name__} does not take ({foreign})"


def check_system(path: str | os.PathLike, ckpt: dict, expected: type, asked_by: str) -> None:
    """Raise CheckpointError unless `ckpt` was written by `expected` (or a subclass). The system is named by
    CheckpointExtras (`system_class_path`) or by LightningCLI (`_class_path` among the hyper-parameters); without
    either, the hyper-parameter names tell."""
    hparams = ckpt.get("hyper_parameters") or {}
    recorded = ckpt.get(SYSTEM_CLASS_KEY) or hparams.get("_class_path")
    if recorded is None:
        held = _system_from_hparams(hparams, expected)
    else:
        cls = resolve_class(recorded)
        ok = (
            issubclass(cls, expected) if cls is not None else recorded.rpartition(".")[2] == expected.__name__
        )
        held = None if ok else recorded.rpartition(".")[2]
    if held is not None:
        raise CheckpointError(f"{path}: holds {held}, {asked_by} asks for {expected.__name__}")
