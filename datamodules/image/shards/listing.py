"""Which shards a run reads and how many samples each holds: shard patterns (braces, globs, folders, URLs,
`pipe:` commands), the sizes files beside them, and sample lists (a curated subset of their samples)."""

from __future__ import annotations

import glob
import json
import logging
import os
import posixpath
import re
import shlex
from collections.abc import Sequence

import numpy as np

from datamodules.image.shards.members import iter_tar_samples
from datamodules.image.shards.remote import (
    READ_ERRORS,
    URL_SCHEME,
    ShardUnreadable,
    fsspec_module,
    is_remote,
    open_url,
)
from datamodules.image.shards.write import INFO_FILE, SIZES_FILE

log = logging.getLogger(__name__)

_TAR_NAME = re.compile(r"\.(tar|tar\.gz|tgz)$")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # what a folder of shards is listed for


class SampleList:
    """The samples of a curated subset of shards: per shard, the positions (in file order) and keys to read."""

    def __init__(
        self, shards: Sequence[str], positions: Sequence[np.ndarray], keys: Sequence[list[str]]
    ) -> None:
        self.shards, self.positions, self.keys = list(shards), list(positions), list(keys)

    @property
    def sizes(self) -> list[int]:
        return [len(p) for p in self.positions]


def is_sample_list(spec: str) -> bool:
    """Whether a shard setting names a sample list (a local `.parquet` file) rather than shards."""
    return spec.endswith(".parquet") and os.path.isfile(spec)


def read_sample_list(path: str | os.PathLike) -> SampleList:
    """The sample list at `path`: a Parquet file with one row per sample to read (columns shard, index, key).

    Shards keep the order of their first row; relative shard paths are taken relative to the list's folder."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = {"shard", "index", "key"} - set(table.column_names)
    if missing:
        raise ValueError(
            f"{path}: a sample list needs columns shard, index and key; it lacks {sorted(missing)}"
        )
    folder = os.path.dirname(os.path.abspath(path))
    rows: dict[str, list[tuple[int, str]]] = {}
    for shard, index, key in zip(*(table.column(c).to_pylist() for c in ("shard", "index", "key"))):
        rows.setdefault(shard, []).append((int(index), str(key)))
    if not rows:
        raise ValueError(f"{path}: the sample list is empty")
    shards, positions, keys = [], [], []
    for shard, samples in rows.items():
        samples.sort()
        located = shard if is_remote(shard) or os.path.isabs(shard) else os.path.join(folder, shard)
        shards.append(located)
        positions.append(np.array([i for i, _ in samples], dtype=np.int64))
        keys.append([k for _, k in samples])
    return SampleList(shards, positions, keys)


def shard_selection(spec: str) -> tuple[list[str], SampleList | None]:
    """(shards, sample list or None) of a `train_shards` setting: shards (see `expand_shards`) or a sample list."""
    if is_sample_list(spec):
        selected = read_sample_list(spec)
        return selected.shards, selected
    return expand_shards(spec), None


def _expand_braces(spec: str) -> list[str]:
    match = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if match is None:
        return [spec]
    first, last = match.group(1), match.group(2)
    width = len(first) if first.startswith("0") else 0  # zero padding as written
    head, tail = spec[: match.start()], spec[match.end() :]
    return [
        path
        for i in range(int(first), int(last) + 1)
        for path in _expand_braces(f"{head}{i:0{width}d}{tail}")
    ]


def expand_shards(spec: str) -> list[str]:
    """Shards from a brace pattern (`coco-{000000..000023}.tar`), a glob (`coco-*.tar`) or a folder (every .tar,
    .tar.gz and .tgz in it), in sorted order; a sample list (`.parquet`, see `read_sample_list`) gives its shards.
    Besides local paths: URLs (`https://`, `s3://`, `gs://`, read through
    fsspec; a glob or a folder URL ending in `/` is listed by fsspec) and `pipe:COMMAND`, a command that writes the
    shard to its output (`pipe:aws s3 cp s3://bucket/coco-{000000..000099}.tar -`). Raises when nothing matches or a
    named local shard is missing; remote shards named by braces are not checked here (one request each) but when
    read.
    """
    if spec.startswith("pipe:"):
        return _expand_braces(spec)
    if is_sample_list(spec):
        return read_sample_list(spec).shards
    if URL_SCHEME.match(spec):
        # listed only when it asks for it: a `?` may start a signed URL's query, not a glob
        if "{" in spec or not ("*" in spec.split("?")[0] or spec.endswith("/")):
            return _expand_braces(spec)
        fs, path = fsspec_module().core.url_to_fs(spec)
        listed = [path + f"*{s}" for s in SHARD_SUFFIXES] if spec.endswith("/") else [path]
        paths = sorted({fs.unstrip_protocol(p) for pattern in listed for p in fs.glob(pattern)})
    elif os.path.isdir(spec):
        paths = sorted(p for s in SHARD_SUFFIXES for p in glob.glob(os.path.join(spec, f"*{s}")))
    elif glob.has_magic(spec) and "{" not in spec:
        paths = sorted(glob.glob(spec))
    else:
        paths = _expand_braces(spec)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of the {len(paths)} shards of {spec} are missing: {missing[0]}, ..."
            )
    if not paths:
        raise FileNotFoundError(f"no tar shards match {spec}")
    return paths


def _located(shard: str) -> str | None:
    # Where a shard lives, to look for sizes files beside it: the word of a pipe: command that names a tar
    # (`aws s3 cp s3://b/coco-000001.tar -`), else the shard itself.
    if not shard.startswith("pipe:"):
        return shard
    try:
        words = shlex.split(shard[5:])
    except ValueError:  # unbalanced quotes: the shell will say what is wrong when the command runs
        return None
    return next((w for w in words if _TAR_NAME.search(w.split("?")[0])), None)


def _read_text(location: str) -> str:
    if URL_SCHEME.match(location):
        with open_url(location, "rt", encoding="utf-8") as f:
            return f.read()
    with open(location, encoding="utf-8") as f:
        return f.read()


def _folder_counts(folder: str, from_command: bool) -> dict[str, int]:
    """Samples per shard file name from `_info.json` or else `sizes.json` in `folder` (a path or a URL)."""
    join = posixpath.join if URL_SCHEME.match(folder) else os.path.join
    errors = (ImportError, *READ_ERRORS) if from_command else READ_ERRORS
    for name in (INFO_FILE, SIZES_FILE):
        location = join(folder, name)
        try:
            data = json.loads(_read_text(location))
        except FileNotFoundError:
            continue
        except errors as err:  # a pipe: command may reach what fsspec cannot (`aws` without s3fs): not fatal
            log.warning("%s", err if isinstance(err, ImportError) else f"cannot read {location}: {err}")
            continue
        except ValueError as err:
            raise ValueError(f"{location} is not valid JSON: {err}") from None
        try:
            counts = {s["name"]: s["num_samples"] for s in data["shards"]} if name == INFO_FILE else data
            return {str(k): int(v) for k, v in counts.items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{location} does not hold sample counts per shard ({err!r})") from None
    return {}


def shard_sizes(paths: Sequence[str], num_samples: int | None = None) -> list[int]:
    """Samples per shard, which decide each worker's run before anything is streamed.

    From `_info.json` or `sizes.json` beside the shards (read once per folder; for URLs and `pipe:` commands
    too, the folder of the tar a command names); else `num_samples` (`train_num_samples`) spread evenly over the
    shards without counts; else, for local shards only, counted from the tar headers. Remote shards are never
    read whole to count them: without a sizes file or `num_samples` they raise.
    """

    def split(where: str) -> tuple[str, str]:  # (folder, file name); a URL's query is not part of the name
        if URL_SCHEME.match(where):
            return posixpath.dirname(where.split("?")[0]), posixpath.basename(where.split("?")[0])
        return os.path.split(where)

    counts: dict[str, dict[str, int]] = {}
    known: dict[str, int] = {}
    for p in paths:
        where = _located(p)
        if where is None:
            continue
        folder, name = split(where)
        if folder not in counts:
            counts[folder] = _folder_counts(folder, from_command=p.startswith("pipe:"))
        if name in counts[folder]:
            known[p] = counts[folder][name]
    unknown = [p for p in paths if p not in known]
    if num_samples is not None and not unknown and num_samples != sum(known.values()):
        log.warning(
            "train_num_samples=%d ignored: the sizes files beside the shards count %d",
            num_samples,
            sum(known.values()),
        )
    if unknown and num_samples is not None:
        left = num_samples - sum(known.values())
        if left < len(unknown):
            raise ValueError(
                f"train_num_samples={num_samples} leaves {left} samples for the {len(unknown)} shards "
                "without sizes files; it counts the samples of all the shards"
            )
        log.info("%d shards have no sample counts: %d samples assumed spread evenly", len(unknown), left)
        share, extra = divmod(left, len(unknown))
        known.update({p: share + (k < extra) for k, p in enumerate(unknown)})
    elif unknown:
        remote = [p for p in unknown if is_remote(p)]
        if remote:
            raise FileNotFoundError(
                f"{len(remote)} remote shards have no sample counts (e.g. {remote[0]}): put the converter's "
                f"{SIZES_FILE} beside them or set data.shards.num_samples"
            )
        log.info("%d shards have no sample counts beside them: counting their samples", len(unknown))
        for p in unknown:
            try:
                known[p] = sum(1 for _ in iter_tar_samples(p, read=lambda ext: False))
            except READ_ERRORS as err:
                raise ShardUnreadable(f"{p}: cannot count its samples: {type(err).__name__}: {err}") from None
    return [known[p] for p in paths]
