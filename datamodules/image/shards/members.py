"""The samples of one tar shard: members grouped by key, plain or gzip-compressed, local or remote, a shard cut
short retried from where it stopped; and the captions of a sample, wherever `caption_key` says they are."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from datamodules.image.coco import clean_caption
from datamodules.image.shards.remote import READ_ERRORS, RemoteBytes, ShardUnreadable, is_remote

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
RETRY_DELAY = 1.0  # seconds before a shard's first retry, doubled at each further one
CAPTION_CHECK = 16  # samples of the first readable shard looked at for a caption before a run starts


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
    remote = RemoteBytes(path) if is_remote(path) else None
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
                        if sample_captions(sample, caption_key)[1]:
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


def key_image_id(key: str) -> int:
    """The image id of another tool's sample: the key's number when numeric (img2dataset), else a stable 48-bit
    hash of the key (the loss takes equal ids for the same image)."""
    stem = key.rsplit("/", 1)[-1]
    return int(stem) if stem.isdigit() else int(hashlib.sha1(key.encode()).hexdigest()[:12], 16)


def sample_captions(
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
                    yield from sample_captions(sample, caption_key)[1]
                except MalformedSample as err:  # skipped in training too
                    log.warning("skipping the captions of sample %s", err)
        except ShardUnreadable as err:
            raise ShardUnreadable(
                f"the vocabulary is trained on the captions of every shard, and one cannot be read: {err}; "
                "pass data.tokenizer.path (a vocabulary or checkpoint) to train without it"
            ) from None
