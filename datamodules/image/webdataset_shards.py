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
every rank, and the samples of that order, read end to end, are cut into ranks x workers contiguous runs of
equal length, one per DataLoader worker of every rank; a run may start or stop inside a shard (the reader
seeks over the samples before it). Every worker thus yields the same number of samples, whatever the number
of shards and however they divide among ranks and workers, so every DDP rank takes the same number of steps.
The run length is `num_samples // (ranks x workers)` rounded down to a multiple of the batch size: the few
samples left over (fewer than ranks x workers x batch size) are dropped for the epoch, a different few each
epoch; every other sample is seen exactly once per epoch. A worker shuffles its run through a buffer of
encoded samples, then decodes and transforms them with the map-style path's functions and draws one caption
per image with the same rule, so shards and image folder give the same caption for an image in an epoch.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import logging
import multiprocessing
import os
import posixpath
import re
import tarfile
import time
import warnings
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
    """Shard paths from a brace pattern (`coco-{000000..000023}.tar`), a glob (`coco-*.tar`) or a folder (every
    .tar in it), in sorted order. Raises when nothing matches or a named shard is missing."""
    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
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


def _split_name(name: str) -> tuple[str, str]:
    # WebDataset's rule: the key is the path up to the first dot of the file name, the extension the rest.
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def iter_tar_samples(
    path: str,
    skip: int = 0,
    limit: int | None = None,
    read: Callable[[str], bool] = lambda ext: True,
) -> Iterator[dict[str, Any]]:
    """The samples of one shard, in file order, as {"__key__", "__url__", extension: bytes, ...}.

    The first `skip` samples are passed over without reading their data (tarfile seeks over the members of an
    uncompressed file), at most `limit` samples are given, and only members whose extension `read` accepts are
    read.
    """
    with tarfile.open(path, "r:") as tar:
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
        if key is not None and index >= skip:
            yield sample


def shard_sizes(paths: Sequence[str]) -> list[int]:
    """Samples per shard, from `_info.json` or `sizes.json` beside the shards, else by counting keys."""
    known: dict[str, int] = {}
    for folder in {os.path.dirname(p) for p in paths}:
        info, sizes = os.path.join(folder, INFO_FILE), os.path.join(folder, SIZES_FILE)
        if os.path.isfile(info):
            with open(info, encoding="utf-8") as f:
                counts = {s["name"]: s["num_samples"] for s in json.load(f)["shards"]}
        elif os.path.isfile(sizes):
            with open(sizes, encoding="utf-8") as f:
                counts = json.load(f)
        else:
            continue
        known.update({os.path.join(folder, name): int(n) for name, n in counts.items()})
    unknown = [p for p in paths if p not in known]
    if unknown:
        log.info("%d shards have no sample counts beside them: counting their samples", len(unknown))
        for p in unknown:
            known[p] = sum(1 for _ in iter_tar_samples(p, read=lambda ext: False))
    return [known[p] for p in paths]


def _sample_captions(sample: dict[str, Any]) -> tuple[int | None, list[str], list[int]]:
    meta = json.loads(sample["json"]) if "json" in sample else {}
    captions = meta.get("captions")
    if captions is None:  # shards of another tool: the .txt caption, or img2dataset's "caption" field
        text = sample["txt"].decode("utf-8") if "txt" in sample else meta.get("caption") or ""
        captions = [text]
    image_id = meta.get("image_id")
    caption_ids = meta.get("caption_ids") or [-1] * len(captions)
    pairs = [(clean_caption(str(c or "")), cid) for c, cid in zip(captions, caption_ids)]
    pairs = [(c, cid) for c, cid in pairs if c]
    return image_id, [c for c, _ in pairs], [cid for _, cid in pairs]


def shard_captions(paths: Iterable[str]) -> Iterator[str]:
    """Every caption stored in the shards, reading only their .json and .txt members."""
    for path in paths:
        for sample in iter_tar_samples(path, read=lambda ext: ext in ("json", "txt")):
            yield from _sample_captions(sample)[1]


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


class ShardStream(IterableDataset):
    """Training samples streamed from WebDataset shards, split by rank and worker (see the module docstring).

    Yields the items of `CocoCaptionsDataset` in training (one caption per image), None for an image that does
    not decode (`CaptionCollate` drops and counts it). `len()` is the number of samples of one rank per epoch.

    Args:
        shards: shard paths, in a fixed order (the same on every rank).
        transform: image transform of decoded (3, H, W) uint8 tensors.
        batch_size: per-device batch size: each worker's run is a multiple of it, so no batch is partial.
        num_workers: DataLoader workers per rank (0 counts as 1); must match the loader's.
        seed: seeds the shard order, the shuffle buffer and the caption draw, with the epoch.
        shuffle_buffer: encoded samples each worker holds to shuffle its run.
        rank: this process's rank; None asks torch.distributed (0 when it is not initialised).
        world_size: number of ranks; None asks torch.distributed (1 when it is not initialised).
        sizes: samples per shard; None reads them from `_info.json` / `sizes.json` (or counts them).
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
    ) -> None:
        self.shards = list(shards)
        self.sizes = list(sizes) if sizes is not None else shard_sizes(self.shards)
        self.num_samples = sum(self.sizes)
        self.transform = transform
        self.batch_size = batch_size
        self.num_workers = max(1, num_workers)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = rank, world_size
        # Shared memory, so persistent workers see them change: the epoch, and where a resumed epoch restarts.
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()
        self._resume = torch.tensor([-1, 0], dtype=torch.long).share_memory_()  # (epoch, batches consumed)
        self._warned: set[str] = set()

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

    def run_length(self) -> int:
        """Samples each worker of each rank yields per epoch."""
        _, world = self.topology()
        slots = world * self.num_workers
        n = self.num_samples // slots // self.batch_size * self.batch_size
        if n == 0:
            raise ValueError(
                f"{self.num_samples} samples cannot give each of {world} ranks x {self.num_workers} workers "
                f"one batch of {self.batch_size}: use fewer workers or a smaller batch"
            )
        return n

    def __len__(self) -> int:
        return self.run_length() * self.num_workers

    def shard_order(self, epoch: int) -> list[int]:
        """Indices of the shards in the order they are read in `epoch`: drawn from (seed, epoch) only."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()

    def assignment(self, epoch: int, slot: int) -> list[tuple[int, int, int]]:
        """(shard index, first sample, end sample) pieces of the run of worker slot `slot` (rank x workers +
        worker) in `epoch`."""
        length = self.run_length()
        start, end = slot * length, (slot + 1) * length
        pieces, offset = [], 0
        for i in self.shard_order(epoch):
            lo, hi = offset, offset + self.sizes[i]
            if hi > start and lo < end:
                pieces.append((i, max(start, lo) - lo, min(end, hi) - lo))
            offset = hi
            if offset >= end:
                break
        return pieces

    def _encoded(self, epoch: int, slot: int) -> Iterator[dict[str, Any]]:
        for i, first, stop in self.assignment(epoch, slot):
            try:
                yield from iter_tar_samples(self.shards[i], skip=first, limit=stop - first)
            except (OSError, tarfile.TarError) as err:  # the run is padded to its length below
                log.warning("cannot read shard %s: %s", self.shards[i], err)

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.num_workers:
            raise RuntimeError(
                f"ShardStream was built for {self.num_workers} workers per rank but runs in {workers}"
            )
        rank, _ = self.topology()
        epoch, length = int(self._epoch), self.run_length()
        resume_epoch, consumed = self._resume.tolist()
        consumed = consumed if resume_epoch == epoch else 0
        # The loader takes batches from its workers in turn, starting with worker 0: batch i of a pass came
        # from worker i % workers. A pass resumed after `consumed` batches starts with worker 0 too, so worker w
        # takes over the run of worker (w + consumed) % workers and skips the batches that run already gave.
        role = (worker + consumed) % workers
        skip = max(0, (consumed - role + workers - 1) // workers) * self.batch_size
        slot = rank * workers + role
        samples = buffer_shuffle(
            self._encoded(epoch, slot), self.shuffle_buffer, np.random.default_rng([self.seed, epoch, slot])
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
        image_id, captions, caption_ids = _sample_captions(sample)
        if image_id is None:
            # Another tool's shards: the key is the id (the loss takes equal ids for the same image), its number
            # when numeric (img2dataset), else a stable 48-bit hash of it.
            stem = key.rsplit("/", 1)[-1]
            image_id = int(stem) if stem.isdigit() else int(hashlib.sha1(key.encode()).hexdigest()[:12], 16)
        name = f"{url}:{key}.{ext}"
        if ext is None or not captions:
            self._warn(name, image_id, "no image member" if ext is None else "no caption")
            return None
        try:
            pixels = decode_rgb(sample[ext])
        except Exception as err:  # one bad image must not end the run
            self._warn(name, image_id, str(err))
            return None
        record = CaptionedImage(image_id, name, tuple(captions), tuple(caption_ids))
        return caption_item(record, self.transform(pixels), True, self.seed, epoch)

    def _warn(self, name: str, image_id: int, why: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            log.warning("skipping unreadable image %s (image id %d): %s", name, image_id, why)


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
