"""Writes image-text pairs into WebDataset tar shards, as img2dataset does: a COCO split converted by
`python -m datamodules.image.shards.write`, images checked and stored as they are, with `_info.json` and
open_clip's `sizes.json` beside the shards."""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import os
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datamodules.image.coco import CaptionedImage, decode_rgb, load_coco_captions, load_karpathy_splits

log = logging.getLogger(__name__)

INFO_FILE = "_info.json"
SIZES_FILE = "sizes.json"  # open_clip's per-shard sample counts


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


# command line -------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.image.shards.write",
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
