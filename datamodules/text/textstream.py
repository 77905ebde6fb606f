"""Reading corpus files: decompression by magic bytes, the text encodings of byte-order marks and XML
declarations, and a chunked line stream that survives undecodable bytes (counted in `ReadStats`)."""

from __future__ import annotations

import bz2
import codecs
import gzip
import logging
import lzma
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO
from xml.etree.ElementTree import ParseError

import mwxml

from datamodules.text.documents import ReadStats

log = logging.getLogger(__name__)


_CHUNK_BYTES = 1 << 20

# -------------------------------------------------------------------------------------- file access

_MAGIC = ((b"BZh", bz2.open), (b"\x1f\x8b", gzip.open), (b"\xfd7zXZ\x00", lzma.open))
# errors that mean "the (compressed) stream or its markup ended or broke here"
BROKEN_READ_ERRORS = (EOFError, ParseError, mwxml.errors.MalformedXML, OSError, zlib.error, lzma.LZMAError)


def sniff_magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(8)


def open_binary(path: Path) -> IO[bytes]:
    """Open a file, transparently decompressing by magic bytes (bz2 handles multistream files)."""
    magic = sniff_magic(path)
    for prefix, opener in _MAGIC:
        if magic.startswith(prefix):
            return opener(path, "rb")
    return open(path, "rb")


# UTF-32 before UTF-16: the UTF-32-LE mark starts with the UTF-16-LE one
_BOMS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


_XML_DECLARATION = re.compile(rb"<\?xml\s[^>]*?\bencoding\s*=\s*[\"']([A-Za-z][\w.:-]*)[\"']")
# Labels decoded as browsers decode them (WHATWG Encoding Standard): files labelled Shift_JIS or GB2312
# are almost always written by Windows code pages that extend them (①, ㈱, NEC and IBM extensions).
_CODEC_OF_LABEL = {
    "shift_jis": "cp932", "shift-jis": "cp932", "sjis": "cp932", "x-sjis": "cp932", "ms_kanji": "cp932",
    "windows-31j": "cp932", "gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "euc-kr": "cp949",
}  # fmt: skip


def declared_xml_encoding(head: bytes | str) -> str | None:
    """The encoding label of an XML declaration at the start of `head` (`<?xml ... encoding="X"?>`)."""
    if isinstance(head, str):
        head = head.encode("ascii", "replace")
    m = _XML_DECLARATION.match(head.lstrip(b" \t\r\n")[:200])
    return m.group(1).decode("ascii") if m else None


def xml_codec(label: str, path: Path | str) -> str:
    """Python's codec for an XML encoding label; `ValueError` naming `path` if there is none."""
    name = _CODEC_OF_LABEL.get(label.lower(), label)
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise ValueError(
            f"{path}: the XML declaration names the encoding {label}, which is unknown"
        ) from None


class UndecodableText(ValueError):
    """Bytes of an XML file that its encoding does not decode; the message names the file and the offset."""


class TextStream:
    """Text view of a binary stream, decoded chunk by chunk: UTF-8, or what a byte-order mark names, or
    (for XML without a mark) the encoding its XML declaration names.

    XML is decoded strictly, as the XML specification asks: a byte that does not decode raises a one-line
    `ValueError` naming the file, the encoding and the byte offset, so no run trains on mojibake. Other
    text switches to replacement characters at the first invalid byte; the file is counted once in
    `stats.invalid_utf8_files` and a warning names it and the byte offset. Supports `read(size)` (what
    `xml.etree.iterparse` uses) and line iteration, plus pushing text back after sniffing the head of the
    file.
    """

    def __init__(self, raw: IO[bytes], path: Path, stats: ReadStats) -> None:
        self._path, self._stats = path, stats
        # read1: one decompressor call at a time, so bytes decoded before a truncation are not lost
        # inside a BufferedReader that was filling a larger request when EOFError struck
        self._read_raw = getattr(raw, "read1", raw.read)
        self.encoding = "utf-8"  # until a byte-order mark says otherwise
        self._decoder = codecs.getincrementaldecoder(self.encoding)("strict")
        self._offset = 0  # bytes consumed from `raw`
        self._pushback = ""
        self._eof = False
        self._error: BaseException | None = None  # hit while sniffing; raised once the head is consumed
        self._at_start = True  # a byte-order mark is looked for (and dropped) there
        self.invalid_at: int | None = None
        self._fatal: UndecodableText | None = None
        self.xml = False  # the file starts like XML: decoded strictly
        # for errors: the encoding's name as the file gives it, and why it applies
        self._label, self._why = "UTF-8", "XML without an encoding declaration is UTF-8"

    def _take_bom(self, data: bytes) -> bytes:
        """Choose the decoder from the byte-order mark at the start of `data`, and drop the mark."""
        self._at_start = False
        while len(data) < 4 and not self._eof:  # a mark split across tiny reads
            more = self._read_raw(4 - len(data))
            self._offset += len(more)
            self._eof = not more
            data += more
        for bom, encoding in _BOMS:
            if data.startswith(bom):
                if encoding != "utf-8":
                    log.info("%s: %s byte-order mark, decoding as %s", self._path, encoding.upper(), encoding)
                self.encoding, self._label = encoding, encoding.upper()
                self._why = "as its byte-order mark says"
                self._decoder = codecs.getincrementaldecoder(encoding)("strict")
                data = data[len(bom) :]
                self.xml = data[:64].decode(encoding, "ignore").lstrip().startswith(("<?xml", "<mediawiki"))
                return data
        head = data.lstrip(b" \t\r\n")
        self.xml = head.startswith((b"<?xml", b"<mediawiki"))
        if self.xml and (label := declared_xml_encoding(head)) is not None:
            self._label, self._why = label, "the encoding its XML declaration names"
            encoding = xml_codec(label, self._path)
            if encoding != "utf-8":
                log.info("%s: the XML declaration names %s, decoding as %s", self._path, label, encoding)
                self.encoding = encoding
                self._decoder = codecs.getincrementaldecoder(encoding)("strict")
        return data

    def _decode(self, data: bytes, final: bool) -> str:
        pending = self._decoder.getstate()[0]
        try:
            return self._decoder.decode(data, final)
        except UnicodeDecodeError as err:
            self.invalid_at = self._offset - len(data) - len(pending) + err.start
            if self.xml:  # raised again by every later read: nothing after it is text
                self._fatal = UndecodableText(
                    f"{self._path}: byte {self.invalid_at} does not decode as {self._label} ({self._why}); "
                    "its text would be read as replacement characters"
                )
                raise self._fatal from None
            self._stats.invalid_utf8_files += 1
            self._stats._problem(self._path)
            log.warning(
                "%s: invalid %s at byte %d; decoding the rest with replacement characters",
                self._path,
                self.encoding.upper(),
                self.invalid_at,
            )
            self._decoder = codecs.getincrementaldecoder(self.encoding)("replace")
            return self._decoder.decode(pending + data, final)

    def read(self, size: int = -1) -> str:
        if self._fatal is not None:
            raise self._fatal
        if self._pushback:
            text, self._pushback = self._pushback, ""
            return text
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        while not self._eof:
            data = self._read_raw(size if size and size > 0 else _CHUNK_BYTES)
            self._offset += len(data)
            self._eof = not data
            if self._at_start:
                data = self._take_bom(data)
            text = self._decode(data, final=self._eof)
            if text:  # empty when the chunk ended inside a multi-byte character (or was only a BOM)
                return text
        return ""

    def head(self, min_chars: int = 4096) -> str:
        """Read at least `min_chars` characters (fewer at EOF) without consuming them."""
        parts = [self._pushback]
        self._pushback = ""
        total = len(parts[0])
        while total < min_chars and self._error is None:
            try:
                chunk = self.read(_CHUNK_BYTES)
            except BROKEN_READ_ERRORS as err:  # a tiny truncated file: let the format reader report it
                self._error = err
                break
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
        self._pushback = "".join(parts)
        return self._pushback

    @property
    def error(self) -> BaseException | None:
        """The error that stopped `head()` early, if any (it is raised again by the next `read`)."""
        return self._error

    def push(self, text: str) -> None:
        self._pushback = text + self._pushback

    def __iter__(self) -> Iterator[str]:
        """Lines without their terminator; splits on "\\n" only (JSON strings may hold U+2028)."""
        rest: list[str] = []
        while chunk := self.read(_CHUNK_BYTES):
            lines = chunk.split("\n")
            if len(lines) == 1:
                rest.append(chunk)
                continue
            lines[0] = "".join(rest) + lines[0]
            rest = [lines.pop()]
            for line in lines:
                yield line[:-1] if line.endswith("\r") else line
        tail = "".join(rest)
        if tail:
            yield tail[:-1] if tail.endswith("\r") else tail


def count_broken(
    path: Path, stats: ReadStats, err: BaseException, count: int, last: str | None, unit: str = "records"
) -> None:
    stats.truncated_files += 1
    stats._problem(path)
    where = f"after {count} {unit}" + (f" (last good: {last!r})" if last is not None else "")
    log.warning(
        "%s: truncated or malformed (%s: %s); keeping what was read %s", path, type(err).__name__, err, where
    )
