"""Reading a checkpoint file of this framework: the one place a checkpoint is unpickled.

`read_checkpoint` looks at a file before torch reads it (missing, a folder, truncated, a text file, an image, a
plain pickle, a zip archive that torch.save did not write), then reads it with `weights_only=True` (no code from
the file runs) and memory-mapped (tensors are read when used). Whatever is wrong, it raises `CheckpointError`
with one line that names the file.

It sits in the data layer because the tokenizer a checkpoint carries is read through it as well; the loaders of
lightning_modules and cli.py import it from lightning_modules/training/checkpoints.py, which re-exports these names.
Imports only torch.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file that does not exist (also a FileNotFoundError, for callers that catch that)."""


def _kind_of_file(head: bytes) -> str:
    """What a file that is no torch.save zip archive seems to be, from its first bytes."""
    if not head:
        return "an empty file"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"):  # torch's pre-zip magic
        return "a torch file in the format before torch 1.6"
    if head.startswith(b"\x80"):
        return "a plain pickle"
    if head.startswith(b"PK"):
        return "a zip archive that torch.save did not write"
    if all(b >= 32 or b in b"\t\n\r" for b in head):
        return "a text file"
    return "a binary file of another format"


def first_line(err: BaseException) -> str:
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
        raise CheckpointError(f"{path}: damaged ({first_line(err)})") from None
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
