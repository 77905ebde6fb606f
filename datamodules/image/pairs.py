"""Image-caption pairs of the user's own data: the readers of each manifest format (`infer_format`) and the
map-style dataset (the duplicate groups are in pair_duplicates.py). A row that cannot be used is skipped, named
by its file and line, and counted; a manifest without the configured column stops with `MissingColumn`, naming
the file and the column; an image that fails to decode later gives None (the collate function drops it and
counts it in the batch's `skipped`)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.image.coco import CaptionedImage, caption_item, clean_caption, decode_rgb, read_rgb

log = logging.getLogger(__name__)

Format = Literal["auto", "csv", "tsv", "jsonl", "parquet", "folder", "shards"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
NAMED_SKIPS = 20  # rows named one by one per source before only the count goes on


class MissingColumn(ValueError):
    """A manifest without the configured image or caption column (a ValueError: the CLI reports it in one line)."""


def is_remote(path: str) -> bool:
    return "://" in path


def _fs_open(path: str, mode: str = "rb") -> Any:
    """A local file, or a remote one through fsspec."""
    if is_remote(path):
        import fsspec

        return fsspec.open(path, mode).open()
    return open(path, mode)  # noqa: SIM115 (the caller closes it)


def infer_format(path: str) -> Format:
    """The format of a source by its path: the extension, a folder (of images, or of .tar shards) or a shard
    pattern (`{000000..000009}.tar`).

    Formats:

        csv / tsv   a header row naming the image-path column and the caption column (open_clip's `filepath` and
                    `title` by default); paths relative to the manifest's folder, absolute, or URLs
        jsonl       one JSON object per line with the same two fields
        parquet     the image column holds a path, the encoded bytes, or the {bytes, path} struct Hugging Face
                    `datasets` writes for an `Image()` feature; local or remote (fsspec: s3://, gs://, https://)
        folder      images with a caption beside each in a `.txt` of the same name (`cat.jpg`, `cat.txt`)
        shards      WebDataset tar shards (img2dataset's layout), read by datamodules/image/shards/

    A row that cannot be used: a missing image file, an empty caption, too few fields, a line that is not JSON.
    """
    name = path.split("?", 1)[0].lower()
    if name.endswith(SHARD_SUFFIXES) or "{" in name or name.startswith("pipe:"):
        return "shards"
    for suffix, fmt in ((".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"), (".json", "jsonl")):
        if name.endswith(suffix):
            return fmt  # type: ignore[return-value]
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if not is_remote(path) and os.path.isdir(path):
        has_shards = any(p.name.endswith(SHARD_SUFFIXES) for p in Path(path).iterdir())
        return "shards" if has_shards else "folder"
    if not is_remote(path) and not os.path.exists(path):
        raise FileNotFoundError(f"image-text source {path} does not exist")
    raise ValueError(
        f"image-text source {path}: cannot tell its format from the name; name it (format: csv, tsv, jsonl, "
        "parquet, folder or shards)"
    )


class PairTable:
    """The rows of one source: a caption, an image (a path, or encoded bytes) and where the row is (file:line)."""

    def __init__(
        self, name: str, captions: list[str], where: list[str], paths: list[str] | None, blobs: Any = None
    ) -> None:
        self.name = name
        self.captions = captions
        self.where = where
        self.paths = paths  # one per row, or None when every image is in `blobs`
        self.blobs = blobs  # a pyarrow binary array (None entries read `paths`), or None
        self.skipped: Counter[str] = Counter()  # reason -> rows skipped

    def __len__(self) -> int:
        return len(self.captions)

    def image_bytes(self, i: int) -> bytes | None:
        """The encoded image of row i when the source holds it (Parquet), else None (read from the path)."""
        if self.blobs is None:
            return None
        return self.blobs[i].as_py()

    def read(self, i: int) -> Tensor:
        """Row i's image decoded to (3, H, W) uint8; raises when it cannot be read or decoded."""
        data = self.image_bytes(i)
        if data is not None:
            return decode_rgb(data)
        path = self.paths[i] if self.paths is not None else ""
        if is_remote(path):
            with _fs_open(path) as f:
                return decode_rgb(f.read())
        return read_rgb(path)

    def digest(self, i: int) -> str:
        """A hash of row i's image bytes (for the duplicate groups)."""
        data = self.image_bytes(i)
        if data is None:
            with _fs_open(self.paths[i]) as f:  # type: ignore[index]
                data = f.read()
        return hashlib.blake2b(data, digest_size=16).hexdigest()


class _Rows:
    """Collects the rows of one source and the ones skipped, named and counted."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.captions: list[str] = []
        self.where: list[str] = []
        self.paths: list[str] = []
        self.skipped: Counter[str] = Counter()

    def skip(self, where: str, reason: str) -> None:
        if sum(self.skipped.values()) < NAMED_SKIPS:
            log.warning("skipping %s: %s", where, reason)
        self.skipped[reason.split(" (", 1)[0]] += 1

    def add(self, where: str, path: str, caption: Any) -> None:
        text = clean_caption(str(caption)) if caption is not None else ""
        if not path:
            self.skip(where, "no image path")
        elif not text:
            self.skip(where, "empty caption")
        else:
            self.captions.append(text)
            self.where.append(where)
            self.paths.append(path)

    def table(self, blobs: Any = None, keep_paths: bool = True) -> PairTable:
        table = PairTable(self.name, self.captions, self.where, self.paths if keep_paths else None, blobs)
        table.skipped = self.skipped
        return table


def _resolve(base: str, path: str) -> str:
    """A manifest's image path: absolute and URLs as they are, relative ones from the manifest's folder."""
    if not path or is_remote(path) or os.path.isabs(path):
        return path
    if is_remote(base):
        return base.rsplit("/", 1)[0] + "/" + path
    return os.path.join(os.path.dirname(base), path)


def _check_columns(path: str, present: Sequence[str], wanted: Sequence[str]) -> None:
    for column in wanted:
        if column not in present:
            raise MissingColumn(
                f"{path} has no column {column!r} (its columns: {', '.join(map(str, present)) or 'none'}); set "
                "data.columns.image_key / data.columns.caption_key to its image and caption columns"
            )


def read_csv(path: str, image_key: str, caption_key: str, separator: str) -> PairTable:
    """A CSV or TSV manifest with a header row."""
    rows = _Rows(path)
    with _fs_open(path, "r") as f:
        reader = csv.reader(f, delimiter=separator)
        header = next(reader, None)
        _check_columns(path, header or [], (image_key, caption_key))
        assert header is not None
        ci, cc = header.index(image_key), header.index(caption_key)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                rows.skip(f"{path}:{reader.line_num}", f"malformed ({err})")
                continue
            where = f"{path}:{reader.line_num}"
            if not row:
                continue  # a blank line
            if len(row) < len(header):
                rows.skip(where, f"too few fields ({len(row)} of {len(header)})")
                continue
            rows.add(where, _resolve(path, row[ci].strip()), row[cc])
    return rows.table()


def read_jsonl(path: str, image_key: str, caption_key: str) -> PairTable:
    """JSON lines: one object per line; a manifest whose first object lacks a field stops, later ones are skipped."""
    rows = _Rows(path)
    checked = False
    with _fs_open(path, "r") as f:
        for line_no, line in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as err:
                rows.skip(where, f"not JSON ({err})")
                continue
            if not isinstance(obj, dict):
                rows.skip(where, f"a JSON {type(obj).__name__}, not an object")
                continue
            if not checked:
                _check_columns(path, list(obj), (image_key, caption_key))
                checked = True
            if image_key not in obj or caption_key not in obj:
                rows.skip(where, f"lacks {image_key!r} or {caption_key!r}")
                continue
            rows.add(where, _resolve(path, str(obj[image_key] or "").strip()), obj[caption_key])
    return rows.table()


def read_parquet(path: str, image_key: str, caption_key: str) -> PairTable:
    """A Parquet table whose image column holds paths (string), encoded images (binary) or Hugging Face
    datasets' {bytes, path} struct. The bytes stay in one Arrow buffer, shared by forked workers, never on disk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if is_remote(path):
        with _fs_open(path) as f:
            table = pq.read_table(io.BytesIO(f.read()), columns=None)
    else:
        table = pq.read_table(path, memory_map=True)
    _check_columns(path, table.column_names, (image_key, caption_key))
    column = table.column(image_key).combine_chunks()
    kind = column.type
    blobs, paths = None, None
    if pa.types.is_struct(kind):
        fields = [kind.field(k).name for k in range(kind.num_fields)]
        if "bytes" not in fields and "path" not in fields:
            raise MissingColumn(f"{path}: column {image_key!r} is a struct without 'bytes' or 'path' fields")
        blobs = column.field("bytes") if "bytes" in fields else None
        paths = column.field("path").to_pylist() if "path" in fields else None
    elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        blobs = column
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        paths = column.to_pylist()
    else:
        raise MissingColumn(f"{path}: column {image_key!r} holds {kind}, not image paths or bytes")
    captions = table.column(caption_key).to_pylist()
    rows = _Rows(path)
    keep = []
    for i, caption in enumerate(captions):
        where = f"{path}:row {i}"
        has_bytes = blobs is not None and blobs[i].is_valid
        image_path = (paths[i] or "") if paths is not None else ""
        if has_bytes:
            image_path = image_path or where  # the bytes are the image; the name only labels it
        else:
            image_path = _resolve(path, image_path)
        before = len(rows.captions)
        rows.add(where, image_path, caption)
        if len(rows.captions) > before:
            keep.append(i)
    if blobs is not None:
        blobs = blobs.take(pa.array(keep, type=pa.int64()))
    return rows.table(blobs)


def read_folder(path: str) -> PairTable:
    """Images under `path` (recursively) with a same-named `.txt` caption beside each."""
    root = Path(path)
    rows = _Rows(path)
    for image in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        text = image.with_suffix(".txt")
        if not text.is_file():
            rows.skip(str(image), "no caption file (" + text.name + ")")
            continue
        try:
            caption = text.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            rows.skip(str(text), f"unreadable caption ({err})")
            continue
        rows.add(str(image), str(image), caption)
    return rows.table()


def read_shards_into_memory(spec: str, caption_key: str, retries: int) -> PairTable:
    """Every sample of WebDataset shards, held in memory: for evaluation and predict sets, which are ranked whole.
    Training streams its shards instead (`ShardStream`)."""
    import pyarrow as pa

    from datamodules.image.shards.listing import expand_shards
    from datamodules.image.shards.members import (
        IMAGE_EXTENSIONS,
        MalformedSample,
        read_shard,
        sample_captions,
    )

    rows = _Rows(spec)
    blobs: list[bytes] = []
    for shard in expand_shards(spec):
        for sample in read_shard(shard, retries=retries):
            where = f"{shard}:{sample['__key__']}"
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            try:
                captions = sample_captions(sample, caption_key)[1]
            except MalformedSample as err:
                rows.skip(where, err.why)
                continue
            if ext is None:
                rows.skip(where, "no image member")
                continue
            before = len(rows.captions)
            rows.add(where, where, captions[0] if captions else "")
            if len(rows.captions) > before:
                blobs.append(sample[ext])
    return rows.table(pa.array(blobs, type=pa.binary()), keep_paths=False)


def read_source(
    path: str,
    fmt: Format,
    image_key: str,
    caption_key: str,
    separator: str | None,
    shard_caption_key: str,
    shard_retries: int = 2,
) -> PairTable:
    """The rows of one source; `fmt` auto tells the format by the path (`infer_format`). Shards take their caption
    member and retries from `shard_caption_key` and `shard_retries` (data.shards.caption_key and .retries)."""
    fmt = infer_format(path) if fmt == "auto" else fmt
    if fmt in ("csv", "tsv"):
        table = read_csv(path, image_key, caption_key, separator or ("\t" if fmt == "tsv" else ","))
    elif fmt == "jsonl":
        table = read_jsonl(path, image_key, caption_key)
    elif fmt == "parquet":
        table = read_parquet(path, image_key, caption_key)
    elif fmt == "folder":
        if not os.path.isdir(path):
            raise FileNotFoundError(f"image-text folder {path} does not exist")
        table = read_folder(path)
    elif fmt == "shards":
        table = read_shards_into_memory(path, shard_caption_key, retries=shard_retries)
    else:
        raise ValueError(f"image-text source {path}: unknown format {fmt!r}")
    _drop_missing_files(table)
    if table.skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in table.skipped.most_common())
        log.warning(
            "%s: %d rows skipped (%s); %d kept", path, sum(table.skipped.values()), reasons, len(table)
        )
    if not len(table):
        raise ValueError(f"image-text source {path} holds no usable rows")
    return table


def _drop_missing_files(table: PairTable) -> None:
    """Drop rows whose local image file does not exist: one directory listing per folder, not a stat per file."""
    if table.paths is None:
        return
    listings: dict[str, set[str]] = {}
    keep = []
    for i, path in enumerate(table.paths):
        if (table.blobs is not None and table.blobs[i].is_valid) or is_remote(path):
            keep.append(i)
            continue
        folder, name = os.path.split(path)
        if folder not in listings:
            listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        if name in listings[folder]:
            keep.append(i)
        else:
            if sum(table.skipped.values()) < NAMED_SKIPS:
                log.warning("skipping %s: image file %s is missing", table.where[i], path)
            table.skipped["missing image file"] += 1
    if len(keep) == len(table.paths):
        return
    table.captions = [table.captions[i] for i in keep]
    table.where = [table.where[i] for i in keep]
    table.paths = [table.paths[i] for i in keep]
    if table.blobs is not None:
        import pyarrow as pa

        table.blobs = table.blobs.take(pa.array(keep, type=pa.int64()))


class PairsDataset(Dataset):
    """One item per row of the concatenated tables, as `CocoCaptionsDataset` gives them: the transformed image,
    its one caption, `image_id` (in training the row's duplicate group, so copies are mutual positives; in
    evaluation the row) and `caption_ids` (the row); `source` is the table the row came from. An image that
    cannot be read gives None (warned once per row and process)."""

    def __init__(
        self,
        tables: Sequence[PairTable],
        transform: Callable[[Tensor], Tensor],
        train: bool,
        groups: np.ndarray | None = None,
        seed: int = 0,
    ) -> None:
        self.tables = list(tables)
        self.offsets = np.cumsum([0] + [len(t) for t in self.tables])
        self.transform = transform
        self.train = train
        self.groups = groups
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()
        self._warned: set[int] = set()

    @property
    def sizes(self) -> list[int]:
        return [len(t) for t in self.tables]

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(table, row in it) of a global index."""
        source = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return source, index - int(self.offsets[source])

    def where(self, index: int) -> str:
        source, i = self.locate(index)
        return self.tables[source].where[i]

    def caption(self, index: int) -> str:
        source, i = self.locate(index)
        return self.tables[source].captions[i]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        source, i = self.locate(index)
        table = self.tables[source]
        try:
            pixels = table.read(i)
        except Exception as err:  # any failure of one file must not end the run
            if index not in self._warned:
                self._warned.add(index)
                log.warning("skipping unreadable image of %s: %s", table.where[i], err)
            return None
        group = int(self.groups[index]) if self.train and self.groups is not None else index
        record = CaptionedImage(group, table.where[i], (table.captions[i],), (index,))
        item = caption_item(record, self.transform(pixels), self.train, self.seed, int(self._epoch))
        item["source"] = source
        return item

    def captions(self) -> Iterator[str]:
        for table in self.tables:
            yield from table.captions
