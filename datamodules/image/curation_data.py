"""Image-text pairs read for curation: every sample of a pool once, with where it came from. A pool is WebDataset
shards (any setting `expand_shards` takes) or manifests (CSV with a header, or JSONL, whose rows name an image
file, `path` or `image`, relative paths taken from the manifest's folder, and its caption, `caption` or `text`);
evaluation images (any folder, read recursively) are read beside them, so that pool images copying them can be
found. The pool is read in units split over ranks and workers (`pool_units`), so a resumed run skips what is
stored."""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.image.coco import decode_rgb
from datamodules.image.shards.listing import expand_shards
from datamodules.image.shards.members import IMAGE_EXTENSIONS, MalformedSample, read_shard, sample_captions
from datamodules.image.shards.remote import ShardUnreadable, is_remote
from datamodules.sections import LoaderConfig

log = logging.getLogger(__name__)

MANIFEST_UNIT = 1000  # manifest rows (or evaluation files) per unit of work
MANIFEST_SUFFIXES = (".csv", ".jsonl")
IMAGE_FILES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


@dataclass(frozen=True)
class Unit:
    """One piece of work: a shard, or rows [start, stop) of a manifest or of an evaluation folder's files."""

    kind: str  # shard, manifest or eval
    source: str
    start: int = 0
    stop: int | None = None

    @property
    def name(self) -> str:
        """A file-name-safe, unique name: the source's base name and a hash of the whole unit."""
        whole = f"{self.kind}:{self.source}:{self.start}:{self.stop}"
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(self.source.rstrip("/")))[:48]
        return f"{self.kind}-{stem}-{self.start}-{hashlib.sha1(whole.encode()).hexdigest()[:10]}"


@functools.lru_cache(maxsize=2)  # each unit of a manifest reads its rows from the one parse
def read_manifest(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(image path, caption) rows of a CSV (with a header) or JSONL manifest; relative paths are taken from the
    manifest's folder. A row without an image or a caption field stops with the file and line named."""
    path = Path(path)
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        first_line = 2
    elif path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as err:
                        raise ValueError(f"{path}:{line_no}: not a JSON object ({err})") from None
        first_line = 1
    else:
        raise ValueError(f"{path}: a manifest is a .csv or .jsonl file")
    pairs = []
    for n, row in enumerate(rows):
        image = row.get("path") or row.get("image") if isinstance(row, dict) else None
        caption = row.get("caption") if isinstance(row, dict) else None
        caption = caption if caption is not None else (row.get("text") if isinstance(row, dict) else None)
        if not image or caption is None:
            raise ValueError(
                f"{path}:{n + first_line}: a manifest row needs an image (path or image) and a caption "
                f"(caption or text); it holds {sorted(row) if isinstance(row, dict) else type(row).__name__}"
            )
        pairs.append((str(image) if os.path.isabs(image) else str(path.parent / image), str(caption)))
    return pairs


def eval_files(folder: str | os.PathLike) -> list[str]:
    """Image files under `folder`, recursively, in sorted order."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"evaluation image folder {folder} does not exist")
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_FILES)


def pool_units(pool: Sequence[str], eval_folders: Sequence[str] = ()) -> list[Unit]:
    """The units of a pool (shard settings and manifests) and of evaluation folders, in a fixed order.

    A unit is a shard, `MANIFEST_UNIT` rows of a manifest, or `MANIFEST_UNIT` files of an evaluation folder. Unit u
    is read by rank u % world and, among that rank's units, by DataLoader worker (position % workers). Each unit ends
    with an end mark, so its scores are stored as soon as it is whole; a resumed run skips the units already stored
    (`done` says which).
    """
    units: list[Unit] = []
    for spec in pool:
        if spec.endswith(MANIFEST_SUFFIXES):
            n = len(read_manifest(spec))
            units += [
                Unit("manifest", spec, s, min(s + MANIFEST_UNIT, n)) for s in range(0, n, MANIFEST_UNIT)
            ]
        else:
            # local shards by absolute path: the sample list a filter writes names them wherever it is read
            units += [Unit("shard", s if is_remote(s) else os.path.abspath(s)) for s in expand_shards(spec)]
    for folder in eval_folders:
        n = len(eval_files(folder))
        if n == 0:
            raise FileNotFoundError(f"evaluation image folder {folder} holds no image files")
        units += [Unit("eval", folder, s, min(s + MANIFEST_UNIT, n)) for s in range(0, n, MANIFEST_UNIT)]
    return units


def _row(unit: Unit, index: int, key: str, caption: str, data: bytes | None, error: str | None) -> dict:
    item = {"unit": unit.name, "kind": "eval" if unit.kind == "eval" else "pool", "source": unit.source}
    item.update({"index": index, "key": key, "caption": caption, "image": None, "error": error})
    if data is not None and error is None:
        try:
            item["image"] = decode_rgb(data)
        except Exception as err:  # whatever the decoder raises, the sample is flagged, not fatal
            item["error"] = f"unreadable image: {err}"
    return item


def unit_items(unit: Unit, caption_key: str = "txt", retries: int = 2) -> Iterator[dict[str, Any]]:
    """The samples of one unit as rows (image decoded, or `error` saying why not), then its end mark."""
    count = 0
    if unit.kind == "shard":
        try:
            for count, sample in enumerate(read_shard(unit.source, retries=retries), start=1):
                ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
                try:
                    captions = sample_captions(sample, caption_key)[1]
                except MalformedSample as err:
                    captions, error = [], err.why
                else:
                    error = None if captions else f"no caption for caption_key={caption_key!r}"
                error = error or (None if ext else "no image member")
                data = sample[ext] if ext else None
                yield _row(unit, count - 1, sample["__key__"], captions[0] if captions else "", data, error)
        except (
            ShardUnreadable
        ) as err:  # no end mark: the unit is not stored, and a resumed run tries it again
            log.error("shard left unscored: %s", err)
            return
    else:
        if unit.kind == "manifest":
            rows = read_manifest(unit.source)[unit.start : unit.stop]
        else:
            rows = [(p, "") for p in eval_files(unit.source)[unit.start : unit.stop]]
        for count, (path, caption) in enumerate(rows, start=1):
            try:
                data, error = Path(path).read_bytes(), None
            except OSError as err:
                data, error = None, f"missing: {err}"
            key = os.path.relpath(path, unit.source) if unit.kind == "eval" else path
            yield _row(unit, unit.start + count - 1, key, caption, data, error)
    yield {"end": unit.name, "count": count}


class CurationStream(IterableDataset):
    """The rows of this rank's and worker's units not yet `done` (see the module docstring)."""

    def __init__(
        self,
        units: Sequence[Unit],
        transform: Callable[[Tensor], Tensor],
        done: Callable[[Unit], bool] = lambda unit: False,
        caption_key: str = "txt",
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.units, self.transform, self.done, self.caption_key = list(units), transform, done, caption_key
        self.rank, self.world_size = rank, world_size

    def mine(self) -> list[Unit]:
        """This rank's units (done or not)."""
        rank, world = self.rank, self.world_size
        if rank is None:
            initialised = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if initialised else (0, 1)
        return self.units[rank :: world or 1]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for unit in self.mine()[worker::workers]:
            if self.done(unit):
                continue
            for item in unit_items(unit, self.caption_key):
                if item.get("image") is not None:
                    item["image"] = self.transform(item["image"])
                yield item


class CurationCollate:
    """Stacks the decoded images, tokenizes their captions, and passes the other rows and end marks on."""

    def __init__(self, tokenizer: Any, context_length: int, image_size: int) -> None:
        self.tokenizer, self.context_length, self.image_size = tokenizer, context_length, image_size

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [item for item in items if "end" not in item]
        ok = [item for item in rows if item["image"] is not None]
        bad = [item for item in rows if item["image"] is None]
        if ok:
            images = torch.stack([item.pop("image") for item in ok])
            tokens = self.tokenizer([item["caption"] or "" for item in ok], self.context_length)
        else:
            images = torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
            tokens = {"input_ids": torch.empty(0, 0, dtype=torch.long), "attention_mask": torch.empty(0, 0)}
        for item in bad:
            item.pop("image")
        return {
            "images": images,
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "rows": ok,
            "bad": bad,
            "ends": [(item["end"], item["count"]) for item in items if "end" in item],
        }


_LOADER = LoaderConfig(batch_size=256)


class CurationDataModule(LightningDataModule):
    """The prediction loader of a curation run: a `CurationStream` over the pool and evaluation units.

    Args:
        units: the pool's and evaluation folders' units (`pool_units`), the same list on every rank.
        transform: the teacher's evaluation transform of decoded uint8 images.
        collate: a `CurationCollate` with the teacher's tokenizer.
        done: whether a unit's scores are already stored (it is then skipped).
        batch_size: samples per batch and device.
        num_workers: DataLoader worker processes per device.
        caption_key: where a shard sample's caption is (see `shards.members.parse_caption_key`).
    """

    def __init__(
        self,
        units: Sequence[Unit],
        transform: Callable[[Tensor], Tensor],
        collate: CurationCollate,
        done: Callable[[Unit], bool] = lambda unit: False,
        loader: LoaderConfig = _LOADER,
        caption_key: str = "txt",
    ) -> None:
        super().__init__()
        self.units, self.transform, self.collate, self.done = list(units), transform, collate, done
        self.batch_size, self.num_workers, self.caption_key = (
            loader.batch_size,
            loader.num_workers,
            caption_key,
        )

    def predict_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (None, None)
        stream = CurationStream(self.units, self.transform, self.done, self.caption_key, rank, world)
        return DataLoader(
            stream, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=self.collate
        )
