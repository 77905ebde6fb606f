"""Image-text pairs in WebDataset tar shards: the COCO layout converted to shards, and the shards streamed.

The format is the one img2dataset writes and open_clip reads: plain (uncompressed) tar files named
`{prefix}-000000.tar`, `{prefix}-000001.tar`, ..., in which the members of one sample share a key, the member
name up to its first dot:

    000000000139.jpg    the image file's original bytes, under the extension of its true format
    000000000139.txt    one caption (the first, in annotation-file order)
    000000000139.json   {"image_id", "file_name", "captions": [all of them], "caption_ids": [annotation ids]}

JPEG, PNG and WebP bytes are stored as they are, never re-encoded, under the extension the bytes say (a PNG
named .jpg is stored as .png); any other format (BMP, TIFF, GIF, ...) is re-encoded losslessly as PNG, so every
reader that looks for jpg, png or webp members finds every image. Each image is decoded once while converting:
missing and undecodable files are left out, warned about by name and counted. Samples are shuffled (seeded)
before they are written, so a shard is a random draw from the split. Beside the shards, `_info.json` holds the
sample count of every shard (and what was skipped), and `sizes.json` the same counts in open_clip's format.

Streaming (`ShardStream`): each epoch, the shards are put in an order drawn from (seed, epoch), identical on
every rank, and the samples of that order, read end to end, are cut into one contiguous share per rank of
`num_samples // (ranks x batch size)` whole batches, so every DDP rank takes the same number of steps whatever
the number of shards. The samples left over (fewer than ranks x batch size) are dropped for the epoch, a
different few each epoch; every other sample is seen exactly once per epoch. A rank's share is dealt to its
DataLoader workers in whole batches, one more to the first `steps % workers` of them, since the loader takes
batch i from worker i % workers: each worker gives only full batches, and the rank's loader gives exactly its
steps. A run may start or stop inside a shard (the reader seeks over the samples before it). When one step of
every rank needs more samples than there are, each rank still takes one step and the order wraps round to its
start, repeating a few samples (with a warning). A worker shuffles its run through a buffer of
encoded samples, then decodes and transforms them with the map-style path's functions and draws one caption
per image with the same rule, so shards and image folder give the same caption for an image in an epoch.

Resampled epochs (`resampled=True`, open_clip's `--dataset-resampled`, for web-scale sets): each worker run draws
whole shards with replacement, from a stream seeded by (seed, epoch, rank and worker), and reads them from their
start until its run is full; an epoch is a fixed number of samples (`num_samples`, else all the shards' samples),
cut into the same steps per rank as above, and a resumed run skips the samples it already gave, as above.

A sample list (a Parquet file with columns `shard`, `index` and `key`, as `python cli.py curate filter` writes)
in place of the shards trains on the listed samples only: its shards are read, and a sample whose position is not
listed is passed over unread; the epoch's runs count listed samples only.

Shards may be gzip-compressed (`.tar.gz`, `.tgz`, as webdataset's own samples are): tar decompresses them as it
reads. Where a sample's caption is, is a setting (`caption_key`): the `txt` member by default, any other member
by its extension, or `json:FIELD`, a field of the json member. A sample without an image or a caption is
skipped, logged with the reason and counted as a skipped image; a shard set whose first samples hold no caption
at all (a classification set: `png` + `cls`) stops before the run, naming the shard and the members it holds.

Remote shards (`https://`, `s3://`, `gs://` through fsspec, or `pipe:COMMAND`) stream the same way, each shard
read once from start to end in tar's stream mode. The runs need every shard's sample count before anything is
read: it comes from `_info.json` / `sizes.json` beside the shards (fetched once per folder), else from
`train_num_samples`; a remote shard is never downloaded just to count it. A shard that fails to open or is cut
short is opened again, up to `retries` times, and read on after the samples it already gave (skipped again,
not given twice); after that it is skipped, named in the log and counted, and the run is made up with None
items (counted as skipped images), so every rank keeps the same number of steps.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import io
import json
import logging
import lzma
import multiprocessing
import os
import posixpath
import re
import shlex
import subprocess
import tarfile
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.image.coco import (
    CaptionedImage,
    caption_item,
    clean_caption,
    decode_rgb,
    load_coco_captions,
    load_karpathy_splits,
)

log = logging.getLogger(__name__)

INFO_FILE = "_info.json"
SIZES_FILE = "sizes.json"  # open_clip's per-shard sample counts
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
RETRY_DELAY = 1.0  # seconds before a shard's first retry, doubled at each further one
CAPTION_CHECK = 16  # samples of the first readable shard looked at for a caption before a run starts
T = TypeVar("T")

# Lightning warns that an IterableDataset's length "could be inaccurate" with several workers; a ShardStream's
# is exact for the worker count it is built for, which its __iter__ checks.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


# writing ------------------------------------------------------------------------------------------------------
def image_format(data: bytes) -> str | None:
    """The shard extension of JPEG, PNG or WebP bytes, from their magic numbers; None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _checked_image(path: str) -> tuple[str, bytes] | tuple[None, str]:
    """(extension, bytes to store) of an image that decodes, or (None, why not). Runs in converter workers."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        return None, f"missing: {err}"
    try:
        pixels = decode_rgb(data)  # the decoder training will use: what fails here would fail there
    except Exception as err:  # whatever the decoding library raises, the file is left out
        return None, f"unreadable: {err}"
    ext = image_format(data)
    if ext is None:
        buffer = io.BytesIO()
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, "PNG")
        ext, data = "png", buffer.getvalue()
    return ext, data


class _ShardWriter:
    """Writes samples into numbered tar shards, starting a new one at `max_count` samples or `max_bytes`."""

    def __init__(self, out_dir: Path, prefix: str, max_count: int, max_bytes: int | None) -> None:
        self.out_dir, self.prefix = out_dir, prefix
        self.max_count, self.max_bytes = max_count, max_bytes
        self.mtime = int(time.time())
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._count = self._bytes = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        # Written under a temporary name and renamed when complete: a half-written shard is never read.
        self._tar = tarfile.open(self.out_dir / f".{name}.tmp", "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.shards.append({"name": name, "num_samples": 0})
        self._count = self._bytes = 0

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            name = self.shards[-1]["name"]
            os.replace(self.out_dir / f".{name}.tmp", self.out_dir / name)
            self.shards[-1]["num_samples"] = self._count
            self._tar = None

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            (self.out_dir / f".{self.shards[-1]['name']}.tmp").unlink()
            self._tar = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        size = sum(len(data) for data in members.values())
        full = self._count >= self.max_count or (
            self.max_bytes is not None and self._count > 0 and self._bytes + size > self.max_bytes
        )
        if self._tar is None or full:
            self.close()
            self._open()
        assert self._tar is not None
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), self.mtime, 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size


def write_shards(
    images: Sequence[CaptionedImage],
    out_dir: str | os.PathLike,
    max_samples_per_shard: int = 5000,
    max_shard_bytes: int | None = None,
    prefix: str = "coco",
    seed: int | None = 0,
    num_workers: int = 0,
    overwrite: bool = False,
    source: str = "",
) -> dict[str, Any]:
    """Write `images` with their captions into WebDataset shards under `out_dir`; returns the `_info.json` record.

    `seed` shuffles the sample order before writing (None keeps the given order); `num_workers` processes read
    and check the image files (0: this process).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = [*out.glob(f"{prefix}-*.tar"), *(out / f for f in (INFO_FILE, SIZES_FILE) if (out / f).exists())]
    if stale and not overwrite:
        raise FileExistsError(
            f"{out} already holds shards ({stale[0].name}, ...); pass overwrite=True (--overwrite)"
        )
    for path in stale:
        path.unlink()
    order = list(images)
    if seed is not None:
        order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]

    writer = _ShardWriter(out, prefix, max_samples_per_shard, max_shard_bytes)
    skipped: dict[str, list[str]] = {"missing": [], "unreadable": []}
    num_captions = 0
    pool = multiprocessing.get_context("spawn").Pool(num_workers) if num_workers > 0 else None
    try:
        paths = [record.path for record in order]
        checked = pool.imap(_checked_image, paths, chunksize=16) if pool else map(_checked_image, paths)
        for record, (ext, data) in zip(order, checked):
            if ext is None:
                kind = str(data).split(":", 1)[0]
                skipped[kind].append(record.path)
                log.warning(
                    "skipping %s image %s (image id %d): %s", kind, record.path, record.image_id, data
                )
                continue
            meta = {
                "image_id": record.image_id,
                "file_name": os.path.basename(record.path),
                "captions": list(record.captions),
                "caption_ids": list(record.caption_ids),
            }
            members = {
                ext: data,
                "txt": record.captions[0].encode(),
                "json": json.dumps(meta, ensure_ascii=False).encode(),
            }
            writer.write(f"{record.image_id:012d}", members)
            num_captions += len(record.captions)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()

    info = {
        "source": source,
        "num_samples": sum(s["num_samples"] for s in writer.shards),
        "num_captions": num_captions,
        "shards": writer.shards,
        "skipped": {kind: len(paths) for kind, paths in skipped.items()},
        "skipped_files": skipped,
    }
    (out / SIZES_FILE).write_text(json.dumps({s["name"]: s["num_samples"] for s in writer.shards}, indent=1))
    (out / INFO_FILE).write_text(json.dumps(info, indent=1))  # written last: it marks a finished conversion
    if any(skipped.values()):
        log.warning(
            "%s: %d missing and %d unreadable images left out", source or out, *map(len, skipped.values())
        )
    log.info("wrote %d samples in %d shards to %s", info["num_samples"], len(writer.shards), out)
    return info


def coco_to_shards(
    root: str | os.PathLike,
    split: str,
    out_dir: str | os.PathLike,
    max_samples_per_shard: int = 5000,
    max_shard_bytes: int | None = None,
    prefix: str = "coco",
    karpathy_json: str | os.PathLike | None = None,
    seed: int | None = 0,
    num_workers: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert one COCO captions split to WebDataset shards; returns the `_info.json` record.

    Args:
        root: COCO folder: annotations/captions_<split>.json and images in <split>/ (the DataModule's layout).
        split: split to convert, e.g. train2017; with `karpathy_json`, one of train (with restval), val, test.
        out_dir: folder the shards, `_info.json` and `sizes.json` are written to.
        max_samples_per_shard: images per shard (the last shard holds the rest).
        max_shard_bytes: also start a new shard before one would pass this size; None: no size limit.
        prefix: shard names are `{prefix}-000000.tar`, ...
        karpathy_json: Karpathy's dataset_coco.json, deciding the splits and image paths as in the DataModule.
        seed: shuffles the samples before writing; None keeps the annotation-file order.
        num_workers: processes that read and check the images; 0 does it in this process.
        overwrite: replace shards already in `out_dir` (by default they stop the conversion).
    """
    if karpathy_json:
        images = load_karpathy_splits(karpathy_json, root)[split]
    else:
        images = load_coco_captions(Path(root) / "annotations" / f"captions_{split}.json", Path(root) / split)
    return write_shards(
        images,
        out_dir,
        max_samples_per_shard,
        max_shard_bytes,
        prefix,
        seed,
        num_workers,
        overwrite,
        source=f"{root}:{split}",
    )


# reading ------------------------------------------------------------------------------------------------------
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
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


class ShardUnreadable(OSError):
    """A shard that could not be opened or read to its end, after its retries."""


def is_remote(shard: str) -> bool:
    """Whether `shard` is a URL (`https://`, `s3://`, `gs://`, ...) or a `pipe:` command, not a local path."""
    return shard.startswith("pipe:") or _URL.match(shard) is not None


def _fsspec() -> Any:
    try:
        import fsspec
    except ImportError:
        raise ImportError(
            "shard URLs are read through fsspec: pip install -e .[remote] (fsspec, aiohttp, s3fs, gcsfs)"
        ) from None
    return fsspec


def _open_url(url: str, mode: str = "rb", **kwargs: Any) -> Any:
    try:
        return _fsspec().open(url, mode, **kwargs).open()
    except ImportError as err:  # fsspec's own message names the missing backend (s3fs, gcsfs, aiohttp)
        raise ImportError(f"cannot read {url}: {err} (pip install -e .[remote] installs them)") from None


def _read_errors() -> tuple[type[BaseException], ...]:
    # What a flaky source raises: OSError (fsspec reports refused connections and 404 as FileNotFoundError),
    # tar errors for a stream cut inside a member, the decompressors' errors for corrupt compressed data (tarfile
    # passes them on as they are from a member's data or a seek), and aiohttp's errors (a body shorter than its
    # Content-Length).
    errors: list[type[BaseException]] = [OSError, EOFError, tarfile.TarError, zlib.error, lzma.LZMAError]
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(errors)


READ_ERRORS = _read_errors()


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
    if _URL.match(spec):
        # listed only when it asks for it: a `?` may start a signed URL's query, not a glob
        if "{" in spec or not ("*" in spec.split("?")[0] or spec.endswith("/")):
            return _expand_braces(spec)
        fs, path = _fsspec().core.url_to_fs(spec)
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


class _RemoteBytes:
    """The bytes of a remote shard as a stream: a URL through fsspec, or the output of a `pipe:` command."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._proc: subprocess.Popen | None = None
        if url.startswith("pipe:"):
            # stderr to a file, not a pipe: a chatty command must not block on a pipe nobody reads
            self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
            self._proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, stderr=self._stderr)
            assert self._proc.stdout is not None
            self._file: Any = self._proc.stdout
        else:
            # block_size=0: one streaming GET; fsspec's default asks HTTP servers for byte ranges
            kwargs = {"block_size": 0} if url.startswith(("http://", "https://")) else {}
            self._file = _open_url(url, "rb", **kwargs)

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)

    def check_exit(self) -> None:
        """Raise when the command that wrote the shard failed (its output may look complete)."""
        if self._proc is None:
            return
        code = self._proc.wait()
        if code != 0:
            self._stderr.seek(0)
            why = " ".join(self._stderr.read()[-300:].decode(errors="replace").split())
            raise OSError(f"`{self.url[5:]}` exited with status {code}: {why}")

    def close(self) -> None:
        self._file.close()
        if self._proc is not None:
            if self._proc.poll() is None:  # stopped early (a sample limit, an error): the rest is not wanted
                self._proc.kill()
            self._proc.wait()
            self._stderr.close()


def _split_name(name: str) -> tuple[str, str]:
    # WebDataset's rule: the key is the path up to the first dot of the file name, the extension the rest.
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def _open_tar(source: Any, path: str, stream: bool) -> tarfile.TarFile:
    """`source` as a tar, plain or compressed; a local file that is neither says what it starts with."""
    try:
        return tarfile.open(fileobj=source, mode="r|*" if stream else "r:*")
    except tarfile.ReadError:
        if stream:
            raise
        source.seek(0)
        head = source.read(24)
        raise tarfile.ReadError(
            f"not a tar file, plain or compressed ({f'it starts with {head!r}' if head else 'it is empty'})"
        ) from None


def iter_tar_samples(
    path: str,
    skip: int = 0,
    limit: int | None = None,
    read: Callable[[str], bool] = lambda ext: True,
) -> Iterator[dict[str, Any]]:
    """The samples of one shard, in file order, as {"__key__", "__url__", extension: bytes, ...}.

    The first `skip` samples are passed over without keeping their data, at most `limit` samples are given, and
    only members whose extension `read` accepts are read. Plain and compressed (`.tar.gz`, `.tgz`) tars are read
    alike. A local shard is opened as a file and skipped samples are seeked over (decompressed and dropped when
    compressed); a URL or `pipe:` shard is read as a stream (tar's stream mode), skipped samples
    downloaded and dropped. A shard cut short raises (tarfile.ReadError, OSError or the HTTP client's error)
    before its last, possibly incomplete, sample is given.
    """
    remote = _RemoteBytes(path) if is_remote(path) else None
    source: Any = remote if remote is not None else open(path, "rb")  # noqa: SIM115 (closed below)
    try:
        # "*": plain or compressed (gzip, as webdataset's own samples are; bzip2, xz), told by the magic bytes
        with _open_tar(source, path, remote is not None) as tar:
            index, key, sample = -1, None, {}
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_name(member.name)
                if member_key != key:
                    if key is not None and index >= skip:
                        yield sample
                    index += 1
                    if limit is not None and index >= skip + limit:
                        return
                    key, sample = member_key, {"__key__": member_key, "__url__": path}
                if index >= skip and read(ext):
                    f = tar.extractfile(member)
                    assert f is not None
                    sample[ext] = f.read()
            # tarfile takes a stream that stops between two members (or inside a header) for the end of the
            # archive: only the zero block that ends a tar says it is whole.
            if remote is not None or tar.fileobj is not source:  # a stream, or a decompressing reader
                while tar.fileobj.read(1 << 16):
                    pass
                end = tar.fileobj.tell()  # bytes of tar data (after decompression)
                if remote is not None:
                    remote.check_exit()
            else:
                end = os.fstat(source.fileno()).st_size
            if end < tar.offset + tarfile.BLOCKSIZE:
                raise tarfile.ReadError(
                    f"{path} is cut short: it ends at byte {end}, before the end of the archive"
                )
            if key is not None and index >= skip:
                yield sample
    finally:
        source.close()


def read_shard(
    url: str,
    skip: int = 0,
    limit: int | None = None,
    read: Callable[[str], bool] = lambda ext: True,
    retries: int = 2,
    retry_delay: float | None = None,
) -> Iterator[dict[str, Any]]:
    """`iter_tar_samples` that opens a shard again when it fails to open or is cut short, up to `retries` times
    (waiting `retry_delay` seconds, doubled at each retry), and goes on after the samples it already gave, so
    none is given twice. Raises `ShardUnreadable` when the last try fails too. `retry_delay` None: RETRY_DELAY."""
    delay = RETRY_DELAY if retry_delay is None else retry_delay
    given = 0
    for attempt in range(retries + 1):
        # broke after its last sample was given: nothing is left to read
        if limit is not None and given >= limit:
            return
        try:
            for sample in iter_tar_samples(url, skip + given, None if limit is None else limit - given, read):
                given += 1
                yield sample
            return
        except READ_ERRORS as err:
            why = " ".join(f"{type(err).__name__}: {err}".split())
            if attempt == retries:
                raise ShardUnreadable(f"{url}: {why} ({attempt + 1} tries, {given} samples read)") from err
            log.warning(
                "shard %s failed after %d samples (%s); retry %d of %d", url, given, why, attempt + 1, retries
            )
            time.sleep(delay * 2**attempt)


def first_readable(shards: Sequence[str], tries: int = 16, caption_key: str | None = None) -> str:
    """The first of `shards` whose first sample reads; a one-line `ShardUnreadable` when none of the first
    `tries` does (a wrong address, missing credentials or files that are not tars fail every shard alike).

    With `caption_key`, a ValueError naming the shard and the members its samples hold when none of its first
    `CAPTION_CHECK` samples has a caption there (a classification set, or the caption under another name)."""
    errors: list[str] = []
    for url in shards[:tries]:
        try:
            if caption_key is None:
                samples = iter_tar_samples(url, limit=1, read=lambda ext: False)
            else:
                samples = iter_tar_samples(url, limit=CAPTION_CHECK)
            first = None
            with contextlib.closing(samples):  # closes the shard (ends a pipe: command) on an early return
                for sample in samples:
                    first = first or sample
                    if caption_key is None:
                        return url
                    try:
                        if _sample_captions(sample, caption_key)[1]:
                            return url
                    except MalformedSample as err:  # a skip in training; the next samples decide
                        log.warning("sample %s", err)
            if first is not None:
                members = ", ".join(sorted(k for k in first if not k.startswith("__")))
                raise ValueError(
                    f"{url}: no caption in its first samples for data.shards.caption_key={caption_key!r} (sample "
                    f"{first['__key__']} holds {members}): set data.shards.caption_key to the member holding the "
                    "caption (txt, ...) or json:FIELD for a field of the json member"
                )
            return url
        except READ_ERRORS as err:
            errors.append(" ".join(f"{url}: {type(err).__name__}: {err}".split()))
            log.warning("cannot read shard %s", errors[-1])
    if not errors:
        raise ShardUnreadable("no shards given")
    if len(errors) == len(shards):
        head = f"none of the {len(shards)} shards can be read"
    else:
        head = f"none of the first {len(errors)} of {len(shards)} shards can be read"
    raise ShardUnreadable(f"{head}; the first: {errors[0]}")


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
    if _URL.match(location):
        with _open_url(location, "rt", encoding="utf-8") as f:
            return f.read()
    with open(location, encoding="utf-8") as f:
        return f.read()


def _folder_counts(folder: str, from_command: bool) -> dict[str, int]:
    """Samples per shard file name from `_info.json` or else `sizes.json` in `folder` (a path or a URL)."""
    join = posixpath.join if _URL.match(folder) else os.path.join
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
        if _URL.match(where):
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


def parse_caption_key(caption_key: str) -> tuple[str, str | None]:
    """(member extension, field of its JSON or None) of a caption setting: `txt` (a member of UTF-8 text, by
    its extension) or `json:FIELD` (a field of the json member: a string or a list of strings)."""
    member, colon, field = caption_key.partition(":")
    member = member.strip().lower()
    if not member or (colon and (member != "json" or not field)):
        raise ValueError(
            f"data.shards.caption_key={caption_key!r}: expected a member's extension (txt, caption, ...) or json:FIELD "
            "(a field of the json member, e.g. json:caption)"
        )
    return member, field or None


class MalformedSample(ValueError):
    """A sample whose json member does not parse: skipped and counted, as a sample without a caption."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name}: {why}")
        self.why = why


def _key_image_id(key: str) -> int:
    """The image id of another tool's sample: the key's number when numeric (img2dataset), else a stable 48-bit
    hash of the key (the loss takes equal ids for the same image)."""
    stem = key.rsplit("/", 1)[-1]
    return int(stem) if stem.isdigit() else int(hashlib.sha1(key.encode()).hexdigest()[:12], 16)


def _sample_captions(
    sample: dict[str, Any], caption_key: str = "txt"
) -> tuple[int | None, list[str], list[int]]:
    """(image id or None, captions, caption ids) of a sample. The converter's json record (`captions` with their
    `caption_ids`) is used whatever `caption_key` says; otherwise the member or json field it names."""
    member, field = parse_caption_key(caption_key)
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError as err:  # JSONDecodeError; UnicodeDecodeError for bytes in no UTF encoding
        name = f"{sample.get('__url__', '')}:{sample['__key__']}"
        raise MalformedSample(name, f"its json member is not valid JSON ({err})") from None
    meta = meta if isinstance(meta, dict) else {}
    captions = meta.get("captions")
    if captions is None and field is not None:
        value = meta.get(field)
        captions = value if isinstance(value, list) else [value]
    elif captions is None:  # shards of another tool: the member's text, or img2dataset's "caption" field
        text = sample[member].decode("utf-8", errors="replace") if member in sample else None
        if text is None and member == "txt":
            text = meta.get("caption")
        captions = [text]
    image_id = meta.get("image_id")
    caption_ids = meta.get("caption_ids") or [-1] * len(captions)
    pairs = [(clean_caption(str(c or "")), cid) for c, cid in zip(captions, caption_ids)]
    pairs = [(c, cid) for c, cid in pairs if c]
    return image_id, [c for c, _ in pairs], [cid for _, cid in pairs]


def shard_captions(
    paths: Sequence[str], retries: int = 2, retry_delay: float | None = None, caption_key: str = "txt"
) -> Iterator[str]:
    """Every caption stored in the shards, keeping only their json and caption members. Remote shards are read
    whole (a tar stream cannot skip the images). A shard still unreadable after `retries` raises: a vocabulary
    trained without it would differ from the one other ranks train, each reading the shards itself. Shards
    whose first samples hold no caption raise a ValueError (see `first_readable`)."""
    member, _ = parse_caption_key(caption_key)
    first_readable(paths, caption_key=caption_key)
    for path in paths:
        try:
            for sample in read_shard(
                path, read=lambda ext: ext in ("json", member), retries=retries, retry_delay=retry_delay
            ):
                try:
                    yield from _sample_captions(sample, caption_key)[1]
                except MalformedSample as err:  # skipped in training too
                    log.warning("skipping the captions of sample %s", err)
        except ShardUnreadable as err:
            raise ShardUnreadable(
                f"the vocabulary is trained on the captions of every shard, and one cannot be read: {err}; "
                "pass data.tokenizer.path (a vocabulary or checkpoint) to train without it"
            ) from None


def buffer_shuffle(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """Shuffle a stream through a buffer of `size` items: each new item takes the place of a random one, which
    is given out; the last `size` come out in random order."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        k = int(rng.integers(size))
        yield buffer[k]
        buffer[k] = item
    for k in rng.permutation(len(buffer)):
        yield buffer[k]


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank takes per epoch: its share of the samples rounded down to whole batches, at least one
    (when `world_size` batches need more samples than there are, the epoch's order wraps round)."""
    return max(1, num_samples // (world_size * batch_size))


def worker_batches(steps: int, workers: int) -> list[int]:
    """Batches of each worker of a rank taking `steps` steps: dealt in turn from worker 0, as the DataLoader takes
    them (batch i from worker i % workers), so the first `steps % workers` workers give one more."""
    share, extra = divmod(steps, workers)
    return [share + (k < extra) for k in range(workers)]


class ShardStream(IterableDataset):
    """Training samples streamed from WebDataset shards, split by rank and worker (see the module docstring).

    Yields the items of `CocoCaptionsDataset` in training (one caption per image), None for an image that does
    not decode (`CaptionCollate` drops and counts it). `len()` is the number of samples of one rank per epoch.

    Args:
        shards: shard paths, in a fixed order (the same on every rank).
        transform: image transform of decoded (3, H, W) uint8 tensors.
        batch_size: per-device batch size: each rank's share and each worker's run are whole batches of it.
        num_workers: DataLoader workers per rank (0 counts as 1); must match the loader's.
        seed: seeds the shard order, the shuffle buffer and the caption draw, with the epoch.
        shuffle_buffer: encoded samples each worker holds to shuffle its run.
        rank: this process's rank; None asks torch.distributed (0 when it is not initialised).
        world_size: number of ranks; None asks torch.distributed (1 when it is not initialised).
        sizes: samples per shard; None reads them from `_info.json` / `sizes.json` (see `shard_sizes`).
        num_samples: samples in all the shards, for shards without sizes files (`train_num_samples`).
        retries: times a shard that fails to open or is cut short is opened again before it is skipped.
        retry_delay: seconds before the first retry of a shard, doubled at each further one; None: RETRY_DELAY.
        caption_key: where a sample's caption is: a member's extension (`txt`) or `json:FIELD` (see
            `parse_caption_key`); the converter's json record, with every caption of an image, is used first.
        resampled: draw whole shards with replacement for each worker run (see the module docstring); an epoch is
            `num_samples` samples when given, else as many as the shards hold.
        selection: read only the samples of this sample list (its shards must be `shards`, in its order).

    A sample without an image or a caption member is skipped, logged with its reason and counted as a skipped image;
    shards whose first samples hold no caption at all stop the run before it starts. A shard skipped after its
    retries is logged by name and counted in `skipped_shards`; the samples it did not give are made up at the end of
    the run by None items, so every rank still takes the same number of steps.
    """

    def __init__(
        self,
        shards: Sequence[str],
        transform: Callable[[Tensor], Tensor],
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int | None = None,
        world_size: int | None = None,
        sizes: Sequence[int] | None = None,
        num_samples: int | None = None,
        retries: int = 2,
        retry_delay: float | None = None,
        caption_key: str = "txt",
        resampled: bool = False,
        selection: SampleList | None = None,
    ) -> None:
        parse_caption_key(caption_key)
        self.shards = list(shards)
        self.caption_key = caption_key
        self.resampled = resampled
        self.selection = selection
        if selection is not None:
            if selection.shards != self.shards:
                raise ValueError("the sample list's shards are not the shards given to the stream")
            self.sizes = selection.sizes
        elif resampled and num_samples is not None and sizes is None:
            self.sizes = []  # drawn shards are read whole: their sizes are not needed
        else:
            self.sizes = list(sizes) if sizes is not None else shard_sizes(self.shards, num_samples)
        # a wrong address or a set without captions fails here, in one line, not as a run of empty batches
        first_readable(self.shards, caption_key=caption_key)
        self.num_samples = num_samples if resampled and num_samples is not None else sum(self.sizes)
        if self.num_samples == 0:
            raise ValueError(f"the {len(self.shards)} shards hold no samples (the first: {self.shards[0]})")
        self.transform = transform
        self.batch_size = batch_size
        self.num_workers = max(1, num_workers)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.retries, self.retry_delay = retries, retry_delay
        # Shared memory, so persistent workers see them change: the epoch, and where a resumed epoch restarts.
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()
        self._resume = torch.tensor([-1, 0], dtype=torch.long).share_memory_()  # (epoch, batches consumed)
        self._skipped = torch.zeros(self.num_workers, dtype=torch.long).share_memory_()  # one slot per worker
        self._warned: set[str] = set()
        self._wrap_warned = False

    @property
    def skipped_shards(self) -> int:
        """Shard reads given up after their retries, by all workers of this rank since the stream was built (a
        shard split between two workers' runs and lost to both counts twice)."""
        return int(self._skipped.sum())

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def resume_at(self, epoch: int, batches: int) -> None:
        """Make the pass over `epoch` start after the first `batches` batches this rank's loader gave."""
        self._resume.copy_(torch.tensor([epoch, batches]))

    def topology(self) -> tuple[int, int]:
        """(rank, world size)."""
        if self.rank is not None:
            return self.rank, self.world_size or 1
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def steps(self) -> int:
        """Batches every rank's loader gives per epoch."""
        _, world = self.topology()
        needed = world * self.batch_size
        if needed > self.num_samples and not self._wrap_warned:
            self._wrap_warned = True
            log.warning(
                "%d samples are fewer than one batch of %d for each of %d ranks: every epoch is one step, "
                "%d samples of it seen twice",
                self.num_samples,
                self.batch_size,
                world,
                needed - self.num_samples,
            )
        return steps_per_epoch(self.num_samples, world, self.batch_size)

    def run(self, slot: int) -> tuple[int, int]:
        """(first, end) positions, in the epoch's sample order, of the run of worker slot `slot` (rank x workers
        + worker)."""
        rank, worker = divmod(slot, self.num_workers)
        steps = self.steps()
        batches = worker_batches(steps, self.num_workers)
        first = (rank * steps + sum(batches[:worker])) * self.batch_size
        return first, first + batches[worker] * self.batch_size

    def __len__(self) -> int:
        return self.steps() * self.batch_size

    def shard_order(self, epoch: int) -> list[int]:
        """Indices of the shards in the order they are read in `epoch`: drawn from (seed, epoch) only."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()

    def assignment(self, epoch: int, slot: int) -> list[tuple[int, int, int]]:
        """(shard index, first sample, end sample) pieces of the run of worker slot `slot` (rank x workers +
        worker) in `epoch`."""
        start, end = self.run(slot)
        order = self.shard_order(epoch)
        pieces, offset = [], 0
        while offset < end:  # past the last sample, the order starts again (see `steps`)
            for i in order:
                lo, hi = offset, offset + self.sizes[i]
                if hi > start and lo < end:
                    pieces.append((i, max(start, lo) - lo, min(end, hi) - lo))
                offset = hi
                if offset >= end:
                    break
        return pieces

    def _piece(self, i: int, first: int, stop: int | None) -> Iterator[dict[str, Any]]:
        """Samples `first` to `stop` (None: the end) of shard i; of its listed samples with a sample list."""
        if self.selection is None:
            yield from read_shard(
                self.shards[i],
                first,
                None if stop is None else stop - first,
                retries=self.retries,
                retry_delay=self.retry_delay,
            )
            return
        positions, keys = self.selection.positions[i][first:stop], self.selection.keys[i][first:stop]
        if len(positions) == 0:
            return
        wanted = dict(zip(positions.tolist(), keys))
        lo = int(positions[0])
        samples = read_shard(
            self.shards[i],
            lo,
            int(positions[-1]) + 1 - lo,
            retries=self.retries,
            retry_delay=self.retry_delay,
        )
        for index, sample in enumerate(samples, start=lo):
            if index in wanted:
                if sample["__key__"] != wanted[index]:
                    raise ValueError(
                        f"{self.shards[i]}: sample {index} is {sample['__key__']}, not {wanted[index]} as the "
                        "sample list says: the shard changed since it was scored"
                    )
                yield sample

    def drawn_shards(self, epoch: int, slot: int) -> Iterator[int]:
        """The shards a resampled run of worker slot `slot` reads in `epoch`, in order (endless): drawn with
        replacement from (seed, epoch, slot), so every rank and worker has its own stream."""
        rng = np.random.default_rng([self.seed, epoch, slot, 1])
        while True:
            yield int(rng.integers(len(self.shards)))

    def _resampled(self, epoch: int, slot: int, worker: int, length: int) -> Iterator[dict[str, Any]]:
        given, empty = 0, 0
        for i in self.drawn_shards(epoch, slot):
            if given >= length or empty >= len(self.shards):  # nothing readable left: padded in __iter__
                return
            before = given
            try:
                for sample in self._piece(i, 0, None):
                    yield sample
                    given += 1
                    if given >= length:
                        return
            except ShardUnreadable as err:
                log.error("skipping shard %s", err)
                self._skipped[worker] += 1
            empty = empty + 1 if given == before else 0

    def _encoded(self, epoch: int, slot: int, worker: int) -> Iterator[dict[str, Any]]:
        if self.resampled:
            first, end = self.run(slot)
            yield from self._resampled(epoch, slot, worker, end - first)
            return
        for i, first, stop in self.assignment(epoch, slot):
            try:
                yield from self._piece(i, first, stop)
            except ShardUnreadable as err:  # the run is padded to its length in __iter__
                log.error("skipping shard %s", err)  # the message starts with the shard's name
                self._skipped[worker] += 1

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.num_workers:
            raise RuntimeError(
                f"ShardStream was built for {self.num_workers} workers per rank but runs in {workers}"
            )
        rank, _ = self.topology()
        epoch = int(self._epoch)
        resume_epoch, consumed = self._resume.tolist()
        consumed = consumed if resume_epoch == epoch else 0
        # The loader takes batches from its workers in turn, starting with worker 0: batch i of a pass came
        # from worker i % workers (a worker with one batch fewer runs out after the others' last turn, which
        # leaves that order as it is). A pass resumed after `consumed` batches starts with worker 0 too, so
        # worker w takes over the run of worker (w + consumed) % workers and skips the batches it already gave.
        role = (worker + consumed) % workers
        skip = max(0, (consumed - role + workers - 1) // workers) * self.batch_size
        slot = rank * workers + role
        first, end = self.run(slot)
        length = end - first
        samples = buffer_shuffle(
            self._encoded(epoch, slot, worker),
            self.shuffle_buffer,
            np.random.default_rng([self.seed, epoch, slot]),
        )
        given = 0
        for given, sample in enumerate(samples, start=1):
            if given > skip:  # skipped samples are never decoded
                yield self._decode(sample, epoch)
        if given < length:
            # A shard held fewer samples than its count says: pad, or this rank would take fewer steps than
            # the others and DDP would wait forever. The padding counts as undecodable images.
            log.warning("worker %d of rank %d: %d samples short; padded", worker, rank, length - given)
            for _ in range(max(0, length - max(given, skip))):
                yield None

    def _decode(self, sample: dict[str, Any], epoch: int) -> dict[str, Any] | None:
        key, url = sample["__key__"], sample["__url__"]
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        try:
            image_id, captions, caption_ids = _sample_captions(sample, self.caption_key)
        except MalformedSample as err:
            self._warn(f"sample {url}:{key}", _key_image_id(key), err.why)
            return None
        if image_id is None:  # another tool's shards: the id comes from the key
            image_id = _key_image_id(key)
        name = f"{url}:{key}.{ext}"
        if ext is None or not captions:
            members = ", ".join(sorted(k for k in sample if not k.startswith("__")))
            why = "no image member" if ext is None else f"no caption for caption_key={self.caption_key!r}"
            self._warn(f"sample {url}:{key}", image_id, f"{why} (it holds {members})")
            return None
        try:
            pixels = decode_rgb(sample[ext])
        except Exception as err:  # one bad image must not end the run
            self._warn(f"unreadable image {name}", image_id, str(err))
            return None
        record = CaptionedImage(image_id, name, tuple(captions), tuple(caption_ids))
        return caption_item(record, self.transform(pixels), True, self.seed, epoch)

    def _warn(self, what: str, image_id: int, why: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("skipping %s (image id %d): %s", what, image_id, why)


class ShardLoader(DataLoader):
    """The DataLoader of a `ShardStream`: sets its epoch before each pass and saves its position in checkpoints.

    `epoch_fn` gives the trainer's epoch; without one, or when it returns None, the loader counts its passes.
    Lightning stores `state_dict()` in checkpoints and hands it to `load_state_dict()` on resume; the resumed
    pass then skips, without decoding them, the samples of the batches already consumed. That needs the same
    number of ranks and workers as the interrupted run; otherwise the epoch starts over, with a warning.
    """

    def __init__(
        self, dataset: ShardStream, epoch_fn: Callable[[], int | None] | None = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("drop_last", True)
        super().__init__(dataset, **kwargs)
        self.epoch_fn = epoch_fn
        self._passes = 0
        self._epoch = 0
        self._start = 0
        self._yielded = 0
        self._resume: tuple[int, int] = (-1, 0)

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        self._epoch = self._passes if epoch is None else epoch
        self._passes += 1
        resume_epoch, batches = self._resume
        self._start = batches if resume_epoch == self._epoch else 0
        self._yielded = 0
        self.dataset.set_epoch(self._epoch)
        for batch in super().__iter__():
            self._yielded += 1  # counted as the training loop takes it, not as workers prefetch
            yield batch

    def state_dict(self) -> dict[str, int]:
        _, world = self.dataset.topology()
        return {
            "epoch": self._epoch,
            "batches": self._start + self._yielded,
            "world_size": world,
            "num_workers": self.dataset.num_workers,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        _, world = self.dataset.topology()
        self._passes = state["epoch"]
        if (state["world_size"], state["num_workers"]) != (world, self.dataset.num_workers):
            log.warning(
                "checkpoint of %d ranks x %d workers resumed on %d x %d: its epoch starts over",
                state["world_size"],
                state["num_workers"],
                world,
                self.dataset.num_workers,
            )
            return
        self._resume = (state["epoch"], state["batches"])
        self.dataset.resume_at(state["epoch"], state["batches"])
        # a checkpoint written before the first resumed batch must hold the same position
        self._epoch, self._start, self._yielded = state["epoch"], state["batches"], 0


# command line -------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.image.webdataset_shards",
        description="Convert a COCO captions split to WebDataset tar shards ({prefix}-000000.tar, ...).",
    )
    parser.add_argument("--root", required=True, help="COCO folder: annotations/ and one folder per split")
    parser.add_argument(
        "--split", required=True, help="e.g. train2017 (train / val / test with --karpathy-json)"
    )
    parser.add_argument("--out", required=True, help="folder the shards are written to")
    parser.add_argument("--shard-size", type=int, default=5000, help="images per shard")
    parser.add_argument("--max-shard-mb", type=float, default=None, help="also cap each shard's size")
    parser.add_argument("--prefix", default="coco", help="shard file name prefix")
    parser.add_argument("--karpathy-json", default=None, help="Karpathy's dataset_coco.json")
    parser.add_argument("--seed", type=int, default=0, help="sample shuffle seed; -1 keeps annotation order")
    parser.add_argument("--workers", type=int, default=0, help="processes reading and checking images")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    info = coco_to_shards(
        args.root,
        args.split,
        args.out,
        max_samples_per_shard=args.shard_size,
        max_shard_bytes=int(args.max_shard_mb * 2**20) if args.max_shard_mb else None,
        prefix=args.prefix,
        karpathy_json=args.karpathy_json,
        seed=None if args.seed < 0 else args.seed,
        num_workers=args.workers,
        overwrite=args.overwrite,
    )
    last = len(info["shards"]) - 1
    print(
        f"{info['num_samples']} samples, {info['num_captions']} captions in {last + 1} shards: "
        f"{Path(args.out) / args.prefix}-{{000000..{last:06d}}}.tar; skipped {info['skipped']}"
    )
    return info


if __name__ == "__main__":
    main()
