"""Reading checkpoint files of this framework: the one place a checkpoint is unpickled.

`read_checkpoint` looks at a file before torch reads it (missing, a folder, truncated, a text file, an image, a
plain pickle, a zip archive that torch.save did not write), then reads it with `weights_only=True` (no code from
the file runs) and memory-mapped (tensors are read when used). Whatever is wrong, it raises `CheckpointError`
with one line that names the file. `check_system` tells whether a checkpoint was written by the system a caller
needs; `read_sharded_model` reads the model of a sharded (torch.distributed.checkpoint) folder.

Every loader of the library (zero-shot, fine-tuning's encoder, the text tower's MLM start, the tokenizer a
checkpoint carries) and every command of cli.py reads through here; cli.py re-exports these names. Imports only
torch at module level, so the DataModules can use it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
import pkgutil
import re
import zipfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import lightning_modules


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file that does not exist (also a FileNotFoundError, as the loaders raised before)."""


def _kind_of_file(head: bytes) -> str:
    """What a file that is no torch.save zip archive seems to be, from its first bytes."""
    if not head:
        return "an empty file"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"):  # torch's legacy magic number
        return "a torch file in the format before torch 1.6"
    if head.startswith(b"\x80"):
        return "a plain pickle"
    if head.startswith(b"PK"):
        return "a zip archive that torch.save did not write"
    if all(b >= 32 or b in b"\t\n\r" for b in head):
        return "a text file"
    return "a binary file of another format"


def _first_line(err: BaseException) -> str:
    """The first line of an error's message, or its type's name when the message is empty."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_checkpoint(path: str | os.PathLike, needs: Collection[str] = ("state_dict",)) -> dict[str, Any]:
    """The contents of a checkpoint file of this framework, read with `weights_only=True` (no code from the file
    runs) and memory-mapped (tensors are read when used).

    `needs`: the top-level entries the caller uses; a file without one of them is refused. The default fits a
    Lightning checkpoint; `()` takes any dict torch.save wrote (a tokenizer-only file, Lightning's meta.pt).

    Raises CheckpointError, naming the file, when it is missing, truncated, or no checkpoint of this framework
    (CheckpointNotFoundError, also a FileNotFoundError, when it does not exist).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a folder (a sharded checkpoint?), not a checkpoint file: "
            f"`python cli.py consolidate --ckpt_path {path} --out FILE.ckpt` writes one"
        )
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    with path.open("rb") as f:
        head = f.read(16)
    if not head.startswith(b"PK\x03\x04"):  # torch.save has written zip archives since torch 1.6
        raise CheckpointError(f"{path}: not a checkpoint of this framework ({_kind_of_file(head)})")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
    except zipfile.BadZipFile:
        # a zip archive's directory is written last: a save or a copy cut short leaves none
        size = path.stat().st_size
        raise CheckpointError(
            f"{path}: truncated ({size} bytes, the end of the file is missing: an interrupted save or copy)"
        ) from None
    if not any(m.endswith("/data.pkl") for m in members):
        raise CheckpointError(
            f"{path}: not a checkpoint of this framework (a zip archive that torch.save did not write)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses any class outside tensors and plain values, which is all a checkpoint here holds
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        such = f", such as {found.group(1)}," if found else ""
        raise CheckpointError(
            f"{path}: not a checkpoint of this framework (it holds Python objects{such} which are not loaded: "
            "loading them would run code from the file)"
        ) from None
    except Exception as err:
        raise CheckpointError(f"{path}: damaged ({_first_line(err)})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path}: not a checkpoint of this framework (a torch file holding a {type(ckpt).__name__}, not a dict)"
        )
    missing = [key for key in needs if key not in ckpt]
    if missing:
        bare = ckpt and all(isinstance(v, Tensor) for v in ckpt.values())
        what = "bare weights, without the hyper-parameters" if bare else f"no {missing[0]}"
        raise CheckpointError(f"{path}: not a checkpoint of this framework (a torch file with {what})")
    return ckpt


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
        raise CheckpointError(f"{folder}: its .metadata cannot be read ({_first_line(err)})") from None
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
        raise CheckpointError(f"{folder}: damaged ({_first_line(err)})") from None
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
    """For a checkpoint that does not name its system (written before `system_class_path` existed, from Python):
    None when `expected` takes its hyper-parameters, else the system that does, or a description."""
    from lightning_modules.hparams import sections_from_flat  # flat encoder / optimizer names: their sections

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
    from lightning_modules.resilience import SYSTEM_CLASS_KEY

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
