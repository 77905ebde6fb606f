"""Wikipedia multistream dumps: checking a `*-multistream-index.txt.bz2` against its dump and cutting the dump
into ranges of whole bz2 streams that worker processes read on their own (`corpora.iter_multistream_range`)."""

from __future__ import annotations

import bz2
import functools
import re
from dataclasses import dataclass
from pathlib import Path

from datamodules.text.textstream import declared_xml_encoding, open_binary, xml_codec

# ------------------------------------------------------------------------------ multistream dumps
#
# `*-pages-articles-multistream.xml.bz2` is a concatenation of independent bz2 streams: the first holds
# `<mediawiki>` and `<siteinfo>`, each next one ~100 pages, the last `</mediawiki>`. Its
# `*-multistream-index.txt.bz2` lists `offset:page_id:title`, offset being the byte at which the stream
# holding the page starts. Worker processes each decompress and parse their own byte ranges.

MEDIAWIKI_TAG = re.compile(r"<mediawiki\b[^>]*>")
_INDEX_SUFFIX = "-index.txt.bz2"


def multistream_index(path: Path) -> Path | None:
    """The index beside a multistream dump (`X.xml.bz2` -> `X-index.txt.bz2`), or None."""
    if not path.name.endswith(".xml.bz2"):
        return None
    index = path.with_name(path.name.removesuffix(".xml.bz2") + _INDEX_SUFFIX)
    return index if index.is_file() else None


def is_index_beside_dump(path: Path) -> bool:
    name = path.name
    return (
        name.endswith(_INDEX_SUFFIX)
        and path.with_name(name.removesuffix(_INDEX_SUFFIX) + ".xml.bz2").is_file()
    )


@dataclass(frozen=True)
class StreamRange:
    """A work unit of a multistream dump: the indexed streams starting at `offsets`, up to byte `end`."""

    path: str
    index: str
    offsets: tuple[int, ...]
    end: int
    header: str  # the dump's `<mediawiki ...>` tag and `<siteinfo>`, to wrap the pages in


def index_mismatch(index: Path | str, dump: Path | str, what: str) -> ValueError:
    return ValueError(f"multistream index {index} does not match the dump {dump}: {what}")


def decompress_streams(data: bytes) -> bytes | None:
    """Decompress one or more whole, concatenated bz2 streams; None if `data` is not exactly that."""
    out = []
    while data:
        decompressor = bz2.BZ2Decompressor()
        try:
            out.append(decompressor.decompress(data))
        except OSError:  # "Invalid data stream"
            return None
        if not decompressor.eof:
            return None
        data = decompressor.unused_data
    return b"".join(out)


def _index_offsets(index: Path, dump: Path) -> list[int]:
    # read once per process: the DataModule checks the index before training a vocabulary and plans the
    # reads with it later (enwiki's index is about a gigabyte once decompressed)
    st = index.stat()
    return list(_read_index_offsets(str(index), str(dump), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _read_index_offsets(index: str, dump: str, size: int, mtime_ns: int) -> tuple[int, ...]:
    offsets: set[int] = set()
    with open_binary(index) as f:
        for lineno, line in enumerate(f, 1):
            head, colon, _ = line.partition(b":")
            if not colon or not head.isdigit():
                if line.strip():
                    raise index_mismatch(index, dump, f"line {lineno} is not offset:page_id:title")
                continue
            offsets.add(int(head))
    return tuple(sorted(offsets))


_BZ2_STREAM_START = re.compile(rb"BZh[1-9](?:1AY&SY|\x17rE8P\x90)")  # a block, or the end of an empty stream


def check_multistream(path: Path, index: Path) -> tuple[list[int], str]:
    """Check that `index` fits the multistream dump `path`; return its stream offsets and the dump's header.

    Reads the index, the header stream, the first bytes at every offset and the first page stream, none of
    the rest: cheap enough to run before any other work. Raises `ValueError` naming both files when they do
    not fit (an offset beyond the dump's end or not at the start of a bz2 stream, a header stream that holds
    pages, a first stream that is not pages, an unreadable index)."""
    try:
        offsets = _index_offsets(index, path)
    except (OSError, EOFError) as err:
        raise index_mismatch(index, path, f"the index is unreadable ({err})") from None
    size = path.stat().st_size
    if not offsets:
        raise index_mismatch(index, path, "the index lists no page")
    if offsets[-1] >= size:
        raise index_mismatch(index, path, f"offset {offsets[-1]} is beyond the dump's {size} bytes")
    with open(path, "rb") as f:
        raw = f.read(offsets[0])
        for offset in offsets:
            f.seek(offset)
            if not _BZ2_STREAM_START.match(f.read(10)):
                raise index_mismatch(index, path, f"no bz2 stream starts at offset {offset}")
        f.seek(offsets[0])
        first = decompress_streams(f.read((offsets[1] if len(offsets) > 1 else size) - offsets[0]))
    text = decompress_streams(raw) if raw else None
    encoding = xml_codec(declared_xml_encoding(text or b"") or "utf-8", path)
    try:
        header = text.decode(encoding) if text is not None else ""
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: byte {err.start} of its header stream does not decode as {encoding}"
        ) from None
    root = MEDIAWIKI_TAG.search(header)
    end = header.find("</siteinfo>")
    rest = header[end + len("</siteinfo>") :] if end >= 0 else header[root.end() :] if root else header
    if root is None or rest.strip():
        raise index_mismatch(
            index,
            path,
            f"the bytes before offset {offsets[0]} are not one <mediawiki><siteinfo> header stream",
        )
    if first is None or not first.lstrip().startswith(b"<page"):
        raise index_mismatch(index, path, f"the stream at offset {offsets[0]} is not a stream of <page>s")
    return offsets, header[: len(header) - len(rest)]


def plan_multistream(path: Path, index: Path, unit_bytes: int = 1 << 20) -> list[StreamRange]:
    """Cut a multistream dump into ranges of whole streams of about `unit_bytes` compressed bytes each.

    Runs `check_multistream` (so raises `ValueError` naming both files when the index does not fit the
    dump); a stream that does not end at the next offset or holds something else than pages is found by the
    reader."""
    offsets, header = check_multistream(path, index)
    size = path.stat().st_size
    units: list[StreamRange] = []
    start = 0
    for k in range(1, len(offsets) + 1):
        stop = offsets[k] if k < len(offsets) else size
        if k == len(offsets) or stop - offsets[start] >= unit_bytes:
            units.append(StreamRange(str(path), str(index), tuple(offsets[start:k]), stop, header))
            start = k
    return units
