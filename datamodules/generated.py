"""Folders the demo generators write into, and the marker file that says a generator wrote them.

A generator writes only into a folder that does not exist, is empty, or carries its own marker
(`.mmpretrain-generated.json`, naming the generator and its settings). Any other folder holds someone's data:
the generator refuses in one line instead of adding to it, and nothing without the marker is ever removed.
A set is written into a temporary folder and moved into place whole (`written_whole`): an interrupted run
never leaves something that looks complete.
Caches are kept apart from data too: by default in the per-user folder `default_cache_dir()`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MARKER = ".mmpretrain-generated.json"


class ForeignDataError(FileExistsError, ValueError):
    """A generator was pointed at a folder holding data it did not write. Also a ValueError, so the CLI reports it
    as a configuration error, in one line."""


def generated_by(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of `folder` ({"generator", "params", "complete"}), or None when it carries none."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable: not a marker we can vouch for
    return marker if isinstance(marker, dict) and {"generator", "params"} <= marker.keys() else None


def _write_marker(folder: Path, generator: str, params: dict[str, Any], complete: bool) -> None:
    text = json.dumps({"generator": generator, "params": params, "complete": complete}, sort_keys=True)
    # temporary file, then rename: a reader never sees half a marker
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-marker-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, folder / MARKER)


def claim_folder(folder: str | os.PathLike, generator: str, params: dict[str, Any], advice: str) -> Path:
    """Make `folder` one `generator` may write into, or raise `ForeignDataError`; returns it as a Path.

    A folder that does not exist is created and an empty one is claimed, both with a marker saying "not
    complete yet"; a folder that carries `generator`'s marker is already ours. Any other folder (files of its
    own, or another generator's marker) is refused with a one-line message that ends with `advice`: the
    setting to change.
    """
    folder = Path(folder)
    marker = generated_by(folder)
    if marker is not None and marker["generator"] == generator:
        return folder
    if marker is None and (not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))):
        folder.mkdir(parents=True, exist_ok=True)
        _write_marker(folder, generator, params, complete=False)
        return folder
    what = f"a set written by {marker['generator']}" if marker else "other data"
    raise ForeignDataError(
        f"{folder} holds {what}, not a set written by {generator}, and is never overwritten or deleted: {advice}"
    )


def mark_complete(folder: str | os.PathLike, generator: str, params: dict[str, Any]) -> None:
    """Record in `folder`'s marker that `generator` finished writing its set there."""
    _write_marker(Path(folder), generator, params, complete=True)


@contextmanager
def written_whole(
    root: Path, generator: str, params: dict[str, Any], entries: Sequence[str], complete: Callable[[], bool]
) -> Iterator[Path]:
    """A temporary folder inside `root` to write a set's `entries` (files or folders) into. When the block ends
    they are moved into `root` in that order, the last one completing the set, and `root`'s marker says
    complete; when it raises, nothing is moved. The temporary folder is removed in every case.

    Callers claim `root` first (`claim_folder`), so an entry already there is an interrupted run's debris and is
    replaced, unless `complete()` says another process finished the set meanwhile: its files are kept.
    """
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        yield tmp
        if complete():
            return
        for name in entries:
            try:
                os.replace(tmp / name, root / name)
            except OSError:  # a folder in the way
                if complete():
                    return
                if not (root / name).exists():
                    raise
                shutil.rmtree(root / name)
                os.replace(tmp / name, root / name)
        mark_complete(root, generator, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_complete(folder: str | os.PathLike, generator: str) -> bool:
    """Whether `folder` holds a set `generator` finished writing (with any settings)."""
    marker = generated_by(folder)
    return marker is not None and marker["generator"] == generator and bool(marker.get("complete"))


def root_advice(setting: str = "data.root") -> str:
    """The usual advice of a DataModule's generator: what to set instead of writing into someone's folder."""
    return f"set data.generate_if_missing false to read it as it is, or point {setting} to an empty or new folder"


def default_cache_dir() -> Path:
    """The per-user cache folder the framework owns (`$XDG_CACHE_HOME/mmpretrain`), where tokenizers and indexes
    go when no cache_dir is set: never inside a data root, which is the user's."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmpretrain"
