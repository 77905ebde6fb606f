"""Duplicate groups of a training set of image-caption pairs, and their cache.

Rows with the same image bytes or the same normalised caption form one group of mutual positives
(`duplicate_groups`). Finding them reads every training image once, so `cached_duplicate_groups` keeps the groups
in the framework's cache folder (`<tokenizer.cache_dir>/pair-duplicates/<key>.npz`), keyed by the rows and by the
size and modification time of the files they come from (`cache_key`): the DataModule builds the cache in
`prepare_data`, once per node, and every rank reads it at setup. A cache file that cannot be read is logged and
rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.image.pairs import PairTable, is_remote

log = logging.getLogger(__name__)

CACHE_FOLDER = "pair-duplicates"
# of the cache file and of what counts as a duplicate (`normalise_caption`, the image digest): part of the key
FORMAT_VERSION = 1
KINDS = ("image", "caption")
# what a remote store's `info` tells of a file's version (fsspec: http, s3, gcs, memory)
_REMOTE_FIELDS = ("size", "mtime", "created", "LastModified", "last_modified", "updated", "ETag", "etag")


def normalise_caption(text: str) -> str:
    """A caption as duplicates are compared: case-folded, punctuation dropped, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def duplicate_groups(tables: Sequence[PairTable]) -> tuple[np.ndarray, dict[str, int]]:
    """A group id per row of the concatenated tables: rows with the same image bytes or the same normalised
    caption (and, transitively, what they share it with) get the same id, the first row's index. Also the counts
    of rows joined to an earlier one by each: {"image": ..., "caption": ...}."""
    n = sum(len(t) for t in tables)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    first: dict[tuple[str, str], int] = {}
    counts = dict.fromkeys(KINDS, 0)
    row = 0
    for table in tables:
        for i in range(len(table)):
            keys = (("image", _safe_digest(table, i)), ("caption", normalise_caption(table.captions[i])))
            for kind, value in keys:
                if value is None:
                    continue
                other = first.setdefault((kind, value), row)
                if other != row:
                    counts[kind] += 1
                    a, b = find(row), find(other)
                    parent[max(a, b)] = min(a, b)
            row += 1
    return np.array([find(i) for i in range(n)], dtype=np.int64), counts


def _safe_digest(table: PairTable, i: int) -> str | None:
    try:
        return table.digest(i)
    except Exception:  # an unreadable file has no bytes to compare; it is skipped when loaded
        return None


def _file_signature(path: str) -> Any:
    """What tells that a file changed without reading it: a local file's size and modification time (None for a
    folder or a missing file); the size, times and ETag a remote store reports (one request)."""
    if is_remote(path):
        import fsspec

        try:
            fs, inner = fsspec.core.url_to_fs(path)
            info = fs.info(inner)
        except Exception:  # a server that answers no metadata: the rows alone key it
            return None
        return [[k, str(info[k])] for k in _REMOTE_FIELDS if k in info]
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns] if stat.S_ISREG(st.st_mode) else None


def cache_key(sources: Sequence[str], tables: Sequence[PairTable]) -> str:
    """Hash of what the groups depend on: each source's path and signature (`_file_signature`: a Parquet file
    holds its images), then each row in order: where it is, its caption and its image file's path and signature.
    A remote image is keyed by its URL alone (a request per row would cost about what reading it does)."""
    h = hashlib.sha256()
    paths = [s if is_remote(s) else os.path.abspath(s) for s in sources]
    h.update(json.dumps([FORMAT_VERSION, [[p, _file_signature(p)] for p in paths]]).encode())
    for table in tables:
        embedded = (
            table.blobs.is_valid().to_numpy(zero_copy_only=False)
            if table.blobs is not None
            else np.zeros(len(table), dtype=bool)
        )
        for i in range(len(table)):
            path = "" if table.paths is None or embedded[i] else table.paths[i]
            if path and not is_remote(path):
                path = os.path.abspath(path)
                signature = _file_signature(path)
            else:
                signature = None
            # length-prefixed fields, a few times cheaper than json per row (millions of rows, on every rank)
            fields = (table.where[i], table.captions[i], path)
            h.update(("".join(f"{len(f)}:{f}" for f in fields) + f"{signature}\n").encode())
    return h.hexdigest()[:16]


def cache_path(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / CACHE_FOLDER / f"{key}.npz"


def _load(path: Path, rows: int) -> tuple[np.ndarray, dict[str, int]]:
    """The cached groups and counts; raises on a file that is not a whole cache of `rows` rows."""
    with np.load(path, allow_pickle=False) as data:
        groups, counts = data["groups"], data["counts"]
    if groups.shape != (rows,) or groups.dtype.kind != "i" or counts.shape != (len(KINDS),):
        raise ValueError(f"holds {groups.shape[0] if groups.ndim else 0} groups for {rows} rows")
    # each id is the index of its group's first row, itself in the group
    if np.any(groups < 0) or np.any(groups > np.arange(rows)) or np.any(groups[groups] != groups):
        raise ValueError("its group ids are not first rows of their groups")
    return groups.astype(np.int64), dict(zip(KINDS, map(int, counts)))


def _save(path: Path, groups: np.ndarray, counts: dict[str, int]) -> None:
    """Write through a temporary file renamed into place: a rank never reads half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, groups=groups, counts=np.array([counts[k] for k in KINDS], dtype=np.int64))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_duplicate_groups(
    sources: Sequence[str], tables: Sequence[PairTable], cache_dir: str | os.PathLike
) -> tuple[np.ndarray, dict[str, int]]:
    """`duplicate_groups(tables)`, read from the cache under `cache_dir` when it holds them for these sources and
    rows, else computed (reading every image once) and written there."""
    rows = sum(len(t) for t in tables)
    path = cache_path(cache_dir, cache_key(sources, tables))
    if path.is_file():
        try:
            groups, counts = _load(path, rows)
            log.info("duplicate groups of the %d training rows read from %s", rows, path)
            return groups, counts
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            log.warning("duplicate-group cache %s is unreadable (%s): rebuilding it", path, err)
    log.info("grouping duplicates among %d training rows (reads every image once) into %s", rows, path)
    groups, counts = duplicate_groups(tables)
    try:
        _save(path, groups, counts)
    except OSError as err:
        log.warning(
            "could not write the duplicate-group cache %s (%s): the next setup reads the images again",
            path,
            err,
        )
    return groups, counts
