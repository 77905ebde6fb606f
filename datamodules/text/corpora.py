"""Streaming readers for the BERT pretraining corpora (English Wikipedia and BookCorpus).

Every reader yields `Document`s one at a time and keeps memory constant in the size of the input: XML
dumps are parsed incrementally with `mwxml`, text files are decoded chunk by chunk, Parquet files are read
in row-group batches. Formats are detected per file from its content, not its name, so WikiExtractor's
extension-less `AA/wiki_00` files and compressed files (`.bz2`, `.gz`, `.xz`) need no configuration.

Text is UTF-8 unless a byte-order mark says UTF-16 or UTF-32 (little or big endian), or an XML dump's
declaration names another encoding. Bad input is survived where that loses nothing else: a truncated or
malformed file keeps what was read before the break, a page without a title is skipped, bytes of a text
file that do not decode are replaced with U+FFFD, empty documents are dropped; each case is counted in
`ReadStats` and logged with the file name. A missing path or a folder with no files raises
`FileNotFoundError`, and a file of an unknown format or an XML dump with a byte its encoding does not
decode raises `ValueError`, all naming the path: a run must not train on replacement characters.

Wikitext cleaning (`wikitext_to_text`) is a pure function so the preprocessing code can run it in worker
processes; the readers themselves only read.
"""

from __future__ import annotations

import bz2
import codecs
import functools
import glob
import gzip
import html
import io
import json
import logging
import lzma
import os
import re
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Literal
from xml.etree.ElementTree import ParseError

import mwparserfromhell
import mwxml
from mwparserfromhell.nodes import (
    ExternalLink,
    Heading,
    HTMLEntity,
    Tag,
    Template,
    Text,
    Wikilink,
)
from mwparserfromhell.wikicode import Wikicode
from mwxml.element_iterator import ElementIterator

from datamodules.text.wikitext import (
    DROPPED,
    NAMESPACE_ALIASES,
    close_gaps,
    fold_script,
    join_lines,
    looks_like_image,
    resolve_variants,
)

log = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20


# Canonical names of the namespaces whose links render as images, category tags or nothing, never as
# prose: Media (-2), File (6, also "Image") and Category (14). Every wiki accepts them besides its own.
HIDDEN_NAMESPACE_IDS = (-2, 6, 14)
_CANONICAL_HIDDEN = ("media", "file", "image", "category")
# Namespace aliases are not in the XML export: `wikitext.NAMESPACE_ALIASES` holds the local names MediaWiki
# accepts besides the declared ones (the old Image namespace, `[[Hình:...]]` in Vietnamese, `[[画像:...]]` in
# Japanese; both Chinese scripts). A File link under a name in neither is still known by its shape.


def namespace_key(name: str) -> str:
    """A namespace name as links are matched against it: MediaWiki ignores case, and treats underscores
    and runs of spaces as one space; Chinese traditional and simplified forms are one name."""
    return fold_script(" ".join(name.replace("_", " ").split()).casefold())


def hidden_link_namespaces(
    declared: Mapping[int, str] | None = None, language: str | None = None
) -> frozenset[str]:
    """Names (as `namespace_key` gives them) of the namespaces whose links are not prose.

    `declared` maps namespace ids to the names a dump's `<siteinfo>` gives them (only ids -2, 6 and 14 are
    used); `language` (the dump's `xml:lang`, e.g. "vi") adds that language's built-in aliases.
    The canonical English names are always included.
    """
    names = set(_CANONICAL_HIDDEN)
    names.update(namespace_key(v) for k, v in (declared or {}).items() if k in HIDDEN_NAMESPACE_IDS and v)
    names.update(namespace_key(a) for a in NAMESPACE_ALIASES.get((language or "").split("-")[0].lower(), ()))
    return frozenset(names)


DEFAULT_HIDDEN_NAMESPACES = hidden_link_namespaces()


@dataclass
class Document:
    source: str  # file path it came from
    doc_id: str  # page title / book name / line-range id
    text: str  # raw text; wikitext when markup == "wikitext"
    markup: Literal["plain", "wikitext"] = "plain"
    # wikitext only: the local and canonical names of File/Media/Category, whose links the cleaner drops
    hidden_namespaces: frozenset[str] = DEFAULT_HIDDEN_NAMESPACES


@dataclass
class ReadStats:
    """Counters of one or more reads; pass the same instance to several readers to accumulate."""

    files_read: int = 0
    pages_read: int = 0  # Wikipedia records seen before any filtering (XML pages, JSON lines, rows)
    lines_read: int = 0  # BookCorpus lines seen
    documents_yielded: int = 0
    redirects_skipped: int = 0
    non_article_skipped: int = 0  # namespace != 0, or a content model other than wikitext
    empty_skipped: int = 0
    malformed_records: int = 0  # JSON lines that do not parse or lack a string `text`
    malformed_pages: int = 0  # XML pages without a title (or with an unreadable <ns> or <id>)
    invalid_utf8_files: int = 0  # files decoded with replacement characters (UTF-8, or as their BOM says)
    truncated_files: int = 0  # files that ended early or broke mid-way (truncated or malformed)
    problem_files: list[str] = field(default_factory=list)  # files behind the last two counters

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if isinstance(v, int)}

    def merge(self, other: ReadStats) -> ReadStats:
        """Add another instance's counters to this one (e.g. stats from worker processes)."""
        for key, value in other.as_dict().items():
            setattr(self, key, getattr(self, key) + value)
        self.problem_files.extend(p for p in other.problem_files if p not in self.problem_files)
        return self

    def log(self, what: str, level: int = logging.INFO) -> None:
        counts = ", ".join(f"{k}={v}" for k, v in self.as_dict().items() if v)
        log.log(level, "%s: %s", what, counts or "nothing read")

    def _problem(self, path: Path) -> None:
        if str(path) not in self.problem_files:
            self.problem_files.append(str(path))


# --------------------------------------------------------------------------------------------- paths


_GLOB_CHARS = re.compile(r"[*?[]")
WIKIPEDIA_FILES = (
    "MediaWiki XML dumps (*.xml, *.xml.bz2), WikiExtractor output (wiki_*), *.jsonl or *.parquet"
)
BOOKCORPUS_FILES = "books_large_p*.txt or one *.txt file a book"


def resolve_paths(paths: Sequence[str | os.PathLike], expected: str | None = None) -> list[Path]:
    """Expand globs (`**` included) and folders (recursively, sorted) into a de-duplicated file list.

    Hidden files and folders (`.name`) inside a folder are ignored. Raises `FileNotFoundError` naming
    the first path that does not exist, glob that matches nothing, or folder (or glob of folders) that
    holds no file; `expected` (e.g. `WIKIPEDIA_FILES`) is added to that message.
    """
    if isinstance(paths, (str, os.PathLike)):  # a lone string is a Sequence of characters: not meant
        paths = [paths]
    hint = f"; expected {expected}" if expected else ""
    out: dict[Path, None] = {}  # ordered set
    for raw in paths:
        found = 0
        pattern = os.path.expanduser(os.fspath(raw))
        if _GLOB_CHARS.search(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise FileNotFoundError(f"input path {raw} does not exist (the glob matches no file)")
        else:
            if not os.path.exists(pattern):
                raise FileNotFoundError(f"input path {raw} does not exist")
            matches = [pattern]
        for match in matches:
            path = Path(match)
            if path.is_dir():
                for sub in sorted(path.rglob("*")):
                    hidden = any(part.startswith(".") for part in sub.relative_to(path).parts)
                    if sub.is_file() and not hidden:
                        out[sub] = None
                        found += 1
            elif path.is_file():
                out[path] = None
                found += 1
        if not found:  # caught here, not as "no text" after a vocabulary was trained on nothing
            what = (
                f"the folders matched by {raw} hold"
                if _GLOB_CHARS.search(pattern)
                else f"input folder {raw} holds"
            )
            raise FileNotFoundError(f"{what} no files (hidden ones are ignored){hint}")
    return list(out)


# -------------------------------------------------------------------------------------- file access

_MAGIC = ((b"BZh", bz2.open), (b"\x1f\x8b", gzip.open), (b"\xfd7zXZ\x00", lzma.open))
# errors that mean "the (compressed) stream or its markup ended or broke here"
_BROKEN = (EOFError, ParseError, mwxml.errors.MalformedXML, OSError, zlib.error, lzma.LZMAError)


def _sniff_magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(8)


def _open_binary(path: Path) -> IO[bytes]:
    """Open a file, transparently decompressing by magic bytes (bz2 handles multistream files)."""
    magic = _sniff_magic(path)
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


class _TextStream:
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
            except _BROKEN as err:  # a tiny truncated file: let the format reader report it
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


def _broke(
    path: Path, stats: ReadStats, err: BaseException, count: int, last: str | None, unit: str = "records"
) -> None:
    stats.truncated_files += 1
    stats._problem(path)
    where = f"after {count} {unit}" + (f" (last good: {last!r})" if last is not None else "")
    log.warning(
        "%s: truncated or malformed (%s: %s); keeping what was read %s", path, type(err).__name__, err, where
    )


# ---------------------------------------------------------------------------------------- Wikipedia

_REDIRECT = re.compile(r"\s*#redirect", re.IGNORECASE)
_MEDIAWIKI_TAG = re.compile(r"<mediawiki\b[^>]*>")
_DOC_OPEN = re.compile(r"<doc\b([^>]*)>\s*$")
_ATTR = re.compile(r'(\w+)="([^"]*)"')


def iter_wikipedia(paths: Sequence[str], stats: ReadStats | None = None) -> Iterator[Document]:
    """Yield Wikipedia articles from any mix of supported files, in path order.

    Formats, detected per file from its content (compressed with bz2/gzip/xz or not):

    * MediaWiki XML export (`pages-articles*.xml[.bz2]`, multistream too): namespace 0 only, redirects
      skipped, the last revision of each page yielded with `markup="wikitext"`; doc_id is the title.
      The File, Media and Category names its `<siteinfo>` declares go into each document's
      `hidden_namespaces`, so the cleaner drops those links in any language.
    * WikiExtractor `<doc id= url= title=>` output: HTML entities unescaped, the repeated title line
      dropped; `markup="plain"`.
    * JSON lines with a `text` field (WikiExtractor `--json`, the Hugging Face wikimedia/wikipedia
      export); doc_id is `title`, else `id`, else `<file>:<line>`.
    * Parquet with a `text` column (wikimedia/wikipedia), read in row-group batches.

    Text files are UTF-8 unless they start with a UTF-16 or UTF-32 byte-order mark.
    """
    stats = stats if stats is not None else ReadStats()
    for path in wikipedia_files(paths):
        yield from iter_wikipedia_file(path, stats)
    stats.log("iter_wikipedia")


def wikipedia_files(paths: Sequence[str]) -> list[Path]:
    """`resolve_paths` for Wikipedia inputs, less the multistream indexes that sit beside their dump (a
    folder holding a dump and its index is one input, not two)."""
    return [p for p in resolve_paths(paths, WIKIPEDIA_FILES) if not _is_index_beside_dump(p)]


def iter_wikipedia_file(path: Path, stats: ReadStats) -> Iterator[Document]:
    """The articles of one Wikipedia file, in any format `iter_wikipedia` reads; counts it in `stats`."""
    stats.files_read += 1
    if _sniff_magic(path).startswith(b"PAR1"):
        yield from _iter_parquet(path, stats)
        return
    with _open_binary(path) as raw:
        stream = _TextStream(raw, path, stats)
        head = stream.head().lstrip("\ufeff \t\r\n")
        if not head and stream.error is not None:
            _broke(path, stats, stream.error, 0, None)
        elif not head:
            log.warning("%s: empty file", path)
        elif head.startswith("<doc"):
            yield from _iter_wikiextractor_doc(path, stream, stats)
        elif head.startswith("{"):
            yield from _iter_jsonl(path, stream, stats)
        elif head.startswith("<mediawiki") or (head.startswith("<?xml") and "<mediawiki" in head):
            yield from _iter_mediawiki_xml(path, stream, stats)
        else:
            raise ValueError(
                f"{path}: unrecognised Wikipedia file format (expected a MediaWiki XML dump, "
                "WikiExtractor output, JSON lines or Parquet)"
            )


def _wiki_document(
    path: Path,
    doc_id: str,
    text: str,
    stats: ReadStats,
    markup: Literal["plain", "wikitext"] = "plain",
    hidden_namespaces: frozenset[str] = DEFAULT_HIDDEN_NAMESPACES,
) -> Document | None:
    if not text.strip():
        stats.empty_skipped += 1
        return None
    stats.documents_yielded += 1
    return Document(str(path), doc_id, text, markup, hidden_namespaces)


_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
_DBNAME_LANG = re.compile(r"([a-z][a-z_]*?)wiki")  # viwiki -> vi, zh_min_nanwiki -> zh_min_nan


def _dump_hidden_namespaces(
    dump: mwxml.Dump, root: ElementIterator, path: Path, quiet: bool = False
) -> frozenset[str]:
    site = dump.site_info
    declared = {ns.id: ns.name for ns in site.namespaces or ()}
    language = root.element.attrib.get(_XML_LANG)
    if not language and site.dbname and (m := _DBNAME_LANG.fullmatch(site.dbname)):
        language = m.group(1).replace("_", "-")
    hidden = hidden_link_namespaces(declared, language)
    if hidden != DEFAULT_HIDDEN_NAMESPACES and not quiet:
        log.info("%s: dropping links to the namespaces %s", path, ", ".join(sorted(hidden)))
    return hidden


class _SkippedPage:
    """What `_Dump` yields for a `<page>` that mwxml cannot read: the tags it saw, for the warning."""

    def __init__(self, tags: set[str], err: Exception) -> None:
        self.tags, self.err = tags, err


class _SeenTags:
    """An mwxml element whose children's tags are recorded as they are read."""

    def __init__(self, element: ElementIterator) -> None:
        self._element, self.tags = element, set()

    def __iter__(self) -> Iterator[ElementIterator]:
        for child in self._element:
            self.tags.add(child.tag)
            yield child

    def __getattr__(self, name: str):
        return getattr(self._element, name)


class _Dump(mwxml.Dump):
    """mwxml's dump reader, less its crash on a page with no title (`None.replace`): such a page comes
    out as a `_SkippedPage` and the pages after it are read."""

    @classmethod
    def process_item(cls, item_element: ElementIterator, namespace_map: dict | None):
        if item_element.tag != "page":
            return super().process_item(item_element, namespace_map)
        seen = _SeenTags(item_element)
        try:
            return mwxml.Page.from_element(seen, namespace_map)
        except UndecodableText:
            raise
        except (AttributeError, TypeError, ValueError) as err:  # None or non-numbers for title, ns, id
            return _SkippedPage(seen.tags, err)


def _iter_mediawiki_xml(
    path: Path, stream: _TextStream, stats: ReadStats, quiet: bool = False, where: str = ""
) -> Iterator[Document]:
    """The articles of a MediaWiki export; `where` places its pages in `path` for warnings (a byte range
    of a multistream dump)."""
    # mwxml insists on a <siteinfo> block, which some exports lack: give those an empty one right after
    # the root tag.
    head = stream.head(1 << 16)
    if root := _MEDIAWIKI_TAG.search(head):
        after = head[root.end() :]
        page_at = after.find("<page")
        if "<siteinfo" not in (after if page_at < 0 else after[:page_at]):
            text = stream.read()  # the pushed-back head
            stream.push(text[: root.end()] + "<siteinfo></siteinfo>" + text[root.end() :])
    pages, last_title = 0, None
    try:
        root = ElementIterator.from_file(stream)
        dump = _Dump.from_element(root)
        hidden = _dump_hidden_namespaces(dump, root, path, quiet)
        for page in dump:
            if isinstance(page, _SkippedPage):
                root.element.clear()
                stats.pages_read += 1
                stats.malformed_pages += 1
                stats._problem(path)
                pages += 1
                what = "no <title>" if "title" not in page.tags else f"an unreadable header ({page.err})"
                after = f", after {last_title!r}" if last_title is not None else ""
                log.warning("%s: page %d%s%s has %s; skipped", path, pages, where, after, what)
                continue
            if not isinstance(page, mwxml.Page):  # <logitem> in log dumps
                continue
            # The last revision is the latest; all must be consumed anyway to move to the next page.
            latest = deque(page, maxlen=1)
            revision = latest[0] if latest else None
            # mwxml empties each finished <page> but leaves it attached to <mediawiki>: drop it, or
            # memory grows by ~100 bytes a page (~2 GB over enwiki's 20M+ pages).
            root.element.clear()
            pages += 1
            stats.pages_read += 1
            last_title = page.title
            text = (revision.text if revision is not None else None) or ""
            if page.redirect is not None or _REDIRECT.match(text):
                stats.redirects_skipped += 1
            elif (page.namespace or 0) != 0 or (
                revision is not None and revision.model not in (None, "wikitext")
            ):
                stats.non_article_skipped += 1
            elif doc := _wiki_document(path, page.title, text, stats, "wikitext", hidden):
                yield doc
    except _BROKEN as err:
        _broke(path, stats, err, pages, last_title, unit="pages")


# ------------------------------------------------------------------------------ multistream dumps
#
# `*-pages-articles-multistream.xml.bz2` is a concatenation of independent bz2 streams: the first holds
# `<mediawiki>` and `<siteinfo>`, each next one ~100 pages, the last `</mediawiki>`. Its
# `*-multistream-index.txt.bz2` lists `offset:page_id:title`, offset being the byte at which the stream
# holding the page starts. Worker processes each decompress and parse their own byte ranges.

_INDEX_SUFFIX = "-index.txt.bz2"


def multistream_index(path: Path) -> Path | None:
    """The index beside a multistream dump (`X.xml.bz2` -> `X-index.txt.bz2`), or None."""
    if not path.name.endswith(".xml.bz2"):
        return None
    index = path.with_name(path.name.removesuffix(".xml.bz2") + _INDEX_SUFFIX)
    return index if index.is_file() else None


def _is_index_beside_dump(path: Path) -> bool:
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


def _mismatch(index: Path | str, dump: Path | str, what: str) -> ValueError:
    return ValueError(f"multistream index {index} does not match the dump {dump}: {what}")


def _decompress_streams(data: bytes) -> bytes | None:
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
    with _open_binary(index) as f:
        for lineno, line in enumerate(f, 1):
            head, colon, _ = line.partition(b":")
            if not colon or not head.isdigit():
                if line.strip():
                    raise _mismatch(index, dump, f"line {lineno} is not offset:page_id:title")
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
        raise _mismatch(index, path, f"the index is unreadable ({err})") from None
    size = path.stat().st_size
    if not offsets:
        raise _mismatch(index, path, "the index lists no page")
    if offsets[-1] >= size:
        raise _mismatch(index, path, f"offset {offsets[-1]} is beyond the dump's {size} bytes")
    with open(path, "rb") as f:
        raw = f.read(offsets[0])
        for offset in offsets:
            f.seek(offset)
            if not _BZ2_STREAM_START.match(f.read(10)):
                raise _mismatch(index, path, f"no bz2 stream starts at offset {offset}")
        f.seek(offsets[0])
        first = _decompress_streams(f.read((offsets[1] if len(offsets) > 1 else size) - offsets[0]))
    text = _decompress_streams(raw) if raw else None
    encoding = xml_codec(declared_xml_encoding(text or b"") or "utf-8", path)
    try:
        header = text.decode(encoding) if text is not None else ""
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: byte {err.start} of its header stream does not decode as {encoding}"
        ) from None
    root = _MEDIAWIKI_TAG.search(header)
    end = header.find("</siteinfo>")
    rest = header[end + len("</siteinfo>") :] if end >= 0 else header[root.end() :] if root else header
    if root is None or rest.strip():
        raise _mismatch(
            index,
            path,
            f"the bytes before offset {offsets[0]} are not one <mediawiki><siteinfo> header stream",
        )
    if first is None or not first.lstrip().startswith(b"<page"):
        raise _mismatch(index, path, f"the stream at offset {offsets[0]} is not a stream of <page>s")
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


def iter_multistream_range(unit: StreamRange, stats: ReadStats) -> Iterator[Document]:
    """The articles in one `StreamRange`, exactly as `iter_wikipedia` yields them from the whole dump.

    Raises `ValueError` naming the index and the dump if a range does not hold whole bz2 streams of pages.
    Malformed XML inside a range loses the rest of that range only (a plain read loses the rest of the dump),
    counted and logged as a truncated file."""
    path = Path(unit.path)
    with open(path, "rb") as f:
        f.seek(unit.offsets[0])
        data = f.read(unit.end - unit.offsets[0])
    bounds = [*unit.offsets, unit.end]
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        text = _decompress_streams(data[a - bounds[0] : b - bounds[0]])
        if text is None:
            raise _mismatch(unit.index, path, f"bytes {a}-{b} are not whole bz2 streams")
        if not text.lstrip().startswith(b"<page"):
            raise _mismatch(unit.index, path, f"the stream at offset {a} does not start with a <page>")
        parts.append(text)
    body = b"".join(parts).rstrip()
    body = body.removesuffix(b"</mediawiki>")  # the last range holds the closing stream
    # the pages' bytes are in the encoding the header declares
    header = unit.header.encode(xml_codec(declared_xml_encoding(unit.header) or "utf-8", path))
    xml = header + b"\n" + body + b"\n</mediawiki>\n"
    where = f" of the streams at bytes {unit.offsets[0]}-{unit.end}"
    yield from _iter_mediawiki_xml(path, _TextStream(io.BytesIO(xml), path, stats), stats, True, where)


def _iter_wikiextractor_doc(path: Path, stream: _TextStream, stats: ReadStats) -> Iterator[Document]:
    attrs: dict[str, str] | None = None  # None while outside a <doc>
    body: list[str] = []
    docs, last = 0, None
    try:
        for line in stream:
            if attrs is None:
                if m := _DOC_OPEN.match(line.strip()):
                    attrs, body = dict(_ATTR.findall(m.group(1))), []
                elif line.strip():
                    stats.malformed_records += 1
                continue
            if line.strip() != "</doc>":
                body.append(line)
                continue
            title = html.unescape(attrs.get("title", ""))
            # WikiExtractor repeats the title as the first line
            if body and html.unescape(body[0]).strip() == title.strip():
                body = body[1:]
            docs += 1
            stats.pages_read += 1
            last = title or attrs.get("id", "")
            doc_id = title or attrs.get("id") or f"{path.name}:{docs}"
            if doc := _wiki_document(path, doc_id, html.unescape("\n".join(body)).strip(), stats):
                yield doc
            attrs = None
    except _BROKEN as err:
        _broke(path, stats, err, docs, last)
        return
    if attrs is not None:
        _broke(path, stats, EOFError("file ended inside a <doc>"), docs, last)


def _iter_jsonl(path: Path, stream: _TextStream, stats: ReadStats) -> Iterator[Document]:
    records, last, first = 0, None, True
    try:
        for lineno, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["text"]
                if not isinstance(text, str):
                    raise TypeError("`text` is not a string")
            except (ValueError, KeyError, TypeError) as err:
                if first:  # not a bad record but a different format (e.g. pretty-printed JSON)
                    raise ValueError(
                        f"{path}: not JSON lines with a `text` field ({err!r} on line {lineno})"
                    ) from None
                stats.malformed_records += 1
                log.warning("%s:%d: skipping malformed record (%s)", path, lineno, err)
                continue
            first = False
            records += 1
            stats.pages_read += 1
            doc_id = str(record.get("title") or record.get("id") or f"{path.name}:{lineno}")
            last = doc_id
            if doc := _wiki_document(path, doc_id, text, stats):
                yield doc
    except _BROKEN as err:
        _broke(path, stats, err, records, last)


def _iter_parquet(path: Path, stats: ReadStats, batch_rows: int = 256) -> Iterator[Document]:
    import pyarrow as pa  # local: only Parquet inputs need it
    import pyarrow.parquet as pq

    rows, last = 0, None
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if "text" not in names:
            raise ValueError(f"{path}: Parquet file has no `text` column (columns: {names})")
        columns = [c for c in ("id", "title", "text") if c in names]
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            data = batch.to_pydict()
            ids, titles = data.get("id"), data.get("title")
            for i, text in enumerate(data["text"]):
                rows += 1
                stats.pages_read += 1
                doc_id = str((titles and titles[i]) or (ids and ids[i]) or f"{path.name}:{rows}")
                last = doc_id
                if doc := _wiki_document(path, doc_id, text or "", stats):
                    yield doc
    except (pa.ArrowException, OSError, EOFError) as err:
        _broke(path, stats, err, rows, last)


# --------------------------------------------------------------------------------------- BookCorpus


def iter_bookcorpus(
    paths: Sequence[str], stats: ReadStats | None = None, lines_per_document: int = 2000
) -> Iterator[Document]:
    """Yield BookCorpus documents (`markup="plain"`, one sentence a line as in the source).

    Two layouts are supported, told apart by file name:

    * The original release's concatenated files (names starting with `books_large`, e.g.
      `books_large_p1.txt`): one sentence a line, lowercased and PTB-tokenized, with no book boundaries.
      They are cut into documents at blank lines and, where there are none (the usual case), every
      `lines_per_document` lines, so next-sentence pairs mostly come from the same book while documents
      stay bounded. doc_id is `<file name>:<first line>-<last line>` (1-based, inclusive).
    * Any other text file is one book (the `<Category>/<name>.txt` layout); doc_id is
      `<Category>/<name>`.

    Files may be bz2/gzip/xz compressed, and are UTF-8 unless a byte-order mark says UTF-16 or UTF-32.
    A binary file raises `ValueError`.
    """
    if lines_per_document < 1:
        raise ValueError(f"lines_per_document must be >= 1, got {lines_per_document}")
    stats = stats if stats is not None else ReadStats()
    for path in resolve_paths(paths, BOOKCORPUS_FILES):
        stats.files_read += 1
        with _open_binary(path) as raw:
            stream = _TextStream(raw, path, stats)
            if "\x00" in stream.head() or _sniff_magic(path).startswith(b"PAR1"):
                raise ValueError(f"{path}: unrecognised BookCorpus file format (expected UTF-8 text)")
            if path.name.startswith("books_large"):
                yield from _iter_book_lines(path, stream, stats, lines_per_document)
            else:
                yield from _iter_book(path, stream, stats)
    stats.log("iter_bookcorpus")


def _book_document(path: Path, doc_id: str, lines: list[str], stats: ReadStats) -> Document | None:
    text = "\n".join(lines).strip("\n")
    if not text.strip():
        stats.empty_skipped += 1
        return None
    stats.documents_yielded += 1
    return Document(source=str(path), doc_id=doc_id, text=text)


def _iter_book_lines(path: Path, stream: _TextStream, stats: ReadStats, per_doc: int) -> Iterator[Document]:
    lines: list[str] = []
    first = lineno = 0
    try:
        for lineno, line in enumerate(stream, 1):
            stats.lines_read += 1
            line = line.rstrip()
            if line:
                if not lines:
                    first = lineno
                lines.append(line)
            if lines and (not line or len(lines) == per_doc):
                end = lineno if line else lineno - 1
                if doc := _book_document(path, f"{path.name}:{first}-{end}", lines, stats):
                    yield doc
                lines = []
    except _BROKEN as err:
        _broke(path, stats, err, lineno, None, unit="lines")
    if lines and (doc := _book_document(path, f"{path.name}:{first}-{first + len(lines) - 1}", lines, stats)):
        yield doc


def _iter_book(path: Path, stream: _TextStream, stats: ReadStats) -> Iterator[Document]:
    name = path.name
    for suffix in (".bz2", ".gz", ".xz", ".txt"):
        name = name.removesuffix(suffix)
    lines: list[str] = []
    try:
        for line in stream:
            stats.lines_read += 1
            lines.append(line.rstrip())
    except _BROKEN as err:
        _broke(path, stats, err, len(lines), None, unit="lines")
    if doc := _book_document(path, f"{path.parent.name}/{name}", lines, stats):
        yield doc


# ----------------------------------------------------------------------------------- text cleaning

# `[[de:Foo]]` without a leading colon is an interlanguage link, shown in the sidebar, not the text.
_INTERLANGUAGE = re.compile(r"[a-z]{2,3}(?:-[a-z]+)*:")
# Tags whose content is not prose (references, tables, math, media, wiki-only machinery).
_DROP_TAGS = frozenset(
    {
        "ref", "references", "table", "tr", "td", "th", "caption", "gallery", "math", "chem", "ce",
        "score", "timeline", "graph", "imagemap", "mapframe", "maplink", "syntaxhighlight", "source",
        "templatestyles", "templatedata", "noinclude", "hiero", "inputbox", "categorytree", "hr", "br",
        "section", "indicator", "style", "script", "includeonly",
    }
)  # fmt: skip
_BLOCK_TAGS = frozenset({"blockquote", "poem", "div", "p", "center", "pre"})  # paragraphs of their own
_LIST_MARKUP = frozenset({"*", "#", ";"})  # bullet, numbered and definition-term lines
# Trailing sections made of citations and link lists, not article prose.
_STOP_SECTIONS = frozenset(
    {"references", "external links", "see also", "further reading", "notes", "bibliography", "sources",
     "citations", "footnotes", "notes and references", "references and notes"}
)  # fmt: skip

# The few inline templates whose visible output is prose; every other template is dropped.
_TEMPLATES_LAST_PARAM = frozenset({"lang", "transl", "transliteration"})  # and every "lang-xx"
_TEMPLATES_FIRST_PARAM = frozenset(
    {"nowrap", "nobr", "small", "big", "sic", "not a typo", "smallcaps", "nobold", "noitalic", "ruby", "ルビ"}
)
# Links to articles not yet written, shown as their local text: the parameters tried in order (English
# {{ill}}, Japanese {{仮リンク}}: a label, else the local title; Chinese {{le}} and {{link-xx}}: the shown
# text, else the local title; {{tsl}}: the shown text, else the local title after two foreign parameters).
_TEMPLATES_LOCAL_LINK: dict[str, tuple[str | int, ...]] = {
    "ill": ("lt", "label", 1), "ill2": ("label", 1), "仮リンク": ("label", 1), "le": (3, 1),
    "tsl": (4, 3), "translink": (4, 3),
}  # fmt: skip
_LINK_XX = re.compile(r"link-[a-z]{2,3}")
_TEMPLATES_CONVERT = frozenset({"convert", "cvt"})
_TEMPLATES_LITERAL = {
    "nbsp": " ", "space": " ", "ndash": " – ", "snd": " – ", "spaced ndash": " – ", "spnd": " – ",
    "mdash": " — ", "spaced mdash": " — ",
}  # fmt: skip
_KEPT_TEMPLATES = frozenset(
    {
        "as of",
        *_TEMPLATES_LAST_PARAM,
        *_TEMPLATES_FIRST_PARAM,
        *_TEMPLATES_CONVERT,
        *_TEMPLATES_LITERAL,
        *_TEMPLATES_LOCAL_LINK,
    }
)
_CONVERT_RANGE = re.compile(r"[-+\d.,/]+|to|and|or|by|x|-|–")

# Pre-pass, before parsing: these are always dropped and are most of the markup of a typical article
# (citations, infoboxes, navboxes, tables). Building mwparserfromhell's tree is the bottleneck, so
# cutting them first roughly doubles throughput; the parser still handles everything that is kept.
_PRE_STRIP = re.compile(
    r"<!--.*?(?:-->|$)|<ref\b[^>]*?/>|<ref\b[^>]*>.*?</ref\s*>"
    r"|<(math|gallery|timeline|score|graph|imagemap|syntaxhighlight|source|hiero|chem|ce)\b[^>]*>.*?</\1\s*>",
    re.DOTALL | re.IGNORECASE,
)
_BRACES = re.compile(r"\{\{|\}\}")
_TEMPLATE_NAME = re.compile(r"\{\{\s*([^|{}<\n]*)")
_TABLE_EDGE = re.compile(r"^[ \t:]*(\{\||\|\})", re.MULTILINE)  # tables open/close at line starts

# behaviour switches, in any script: `__NOTOC__`, `__ΕΥΡΕΤΗΡΙΟ__`, `__目次非表示__`, `＿＿目次＿＿` (never `__init__`)
_MAGIC_WORD = re.compile(r"(?:__|＿＿)([^\W_]+)(?:__|＿＿)")
# HTML tags left as text: a closing </div> whose opening tag came from a dropped template, ...
_STRAY_TAG = re.compile(
    r"</?(?:div|span|center|font|small|big|p|blockquote|poem|table|tr|td|th|caption|ref|references|gallery"
    r"|includeonly|noinclude|onlyinclude|nowiki|section|templatestyles|abbr|sup|sub|s|u|b|i|em|strong)\b"
    r"[^<>\n]*>",
    re.IGNORECASE,
)
_STYLE_QUOTES = re.compile(r"'{2,}")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)\]。、，．；：！？）」』】])")
# brackets emptied by dropped templates, ASCII and full-width: "()", "(; born 1900)", "（、1900年）"
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)|\[\s*\]|（\s*[、，,;；:：]?\s*）|［\s*］")
_PAREN_LEAD_PUNCT = re.compile(r"\(\s*[,;:]\s*")
_FULLWIDTH_PAREN_PUNCT = (
    (re.compile(r"（\s*[、，,;；:：]\s*"), "（"),
    (re.compile(r"\s*[、，,;；]\s*）"), "）"),
)
_TABLE_LINE = re.compile(rf"[\s{DROPPED}]*(?:\{{\||\|)")  # stray table rows mwparserfromhell left as text


def _template_name(raw: str) -> str:
    return raw.strip().lower().replace("_", " ").removeprefix("template:")


def _is_kept_template(name: str) -> bool:
    return name in _KEPT_TEMPLATES or name.startswith("lang-") or bool(_LINK_XX.fullmatch(name))


def _cut_templates(text: str) -> str:
    """Remove balanced top-level `{{...}}` that are not kept, nested ones with them; unbalanced braces
    are left for the parser, which treats them as text like MediaWiki does."""
    out: list[str] = []
    stack: list[tuple[int, bool]] = []  # (start offset, keep) of open templates
    last = 0
    for m in _BRACES.finditer(text):
        if m.group() == "{{":
            keep = False
            if not stack:
                name = _TEMPLATE_NAME.match(text, m.start())
                keep = bool(name) and _is_kept_template(_template_name(name.group(1)))
            stack.append((m.start(), keep))
        elif stack:
            start, keep = stack.pop()
            if not stack and not keep and start >= last:
                out += (text[last:start], DROPPED)
                last = m.end()
    out.append(text[last:])
    return "".join(out)


def _cut_tables(text: str) -> str:
    """Replace balanced (possibly nested) `{| ... |}` tables by a paragraph break."""
    out: list[str] = []
    depth = start = last = 0
    for m in _TABLE_EDGE.finditer(text):
        if m.group(1) == "{|":
            if depth == 0:
                start = m.start()
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                out += (text[last:start], "\n\n")
                last = m.end()
    out.append(text[last:])
    return "".join(out)


def _param(template: Template, name: str | int) -> Wikicode | None:
    key = str(name)
    return template.get(key).value if template.has(key) else None


def _template_text(template: Template, out: list[str], hidden: frozenset[str]) -> None:
    """Append the visible text of a kept inline template (see `_KEPT_TEMPLATES`)."""
    name = _template_name(str(template.name))
    if name in _TEMPLATES_LAST_PARAM or name.startswith("lang-"):
        positional = [p for p in template.params if not p.showkey]
        if positional:
            _render(positional[-1].value, out, hidden)
    elif name in _TEMPLATES_FIRST_PARAM:
        if (value := _param(template, 1)) is not None:
            _render(value, out, hidden)
    elif name in _TEMPLATES_LOCAL_LINK or _LINK_XX.fullmatch(name):
        for key in _TEMPLATES_LOCAL_LINK.get(name, (3, 1)):
            if (value := _param(template, key)) is not None and str(value).strip():
                _render(value, out, hidden)
                break
    elif name in _TEMPLATES_CONVERT:
        words: list[str] = []
        for param in template.params:  # numbers and range words, then the first unit
            if not param.showkey:
                words.append(str(param.value).strip())
                if not _CONVERT_RANGE.fullmatch(words[-1]):
                    break
        out.append(" ".join(words))
    elif name == "as of" and (value := _param(template, 1)) is not None:
        out.append(f"As of {str(value).strip()}")
    elif name in _TEMPLATES_LITERAL:
        out.append(_TEMPLATES_LITERAL[name])


def _render(code: Wikicode, out: list[str], hidden: frozenset[str]) -> None:
    """Append the visible prose of `code` to `out`, walking mwparserfromhell's node list once.

    "\\n\\n" marks a paragraph break; single newlines are joined later, as MediaWiki renders them.
    Links into the `hidden` namespaces (see `hidden_link_namespaces`) are dropped whole.
    """
    skip_line = False  # inside a list item: drop everything up to the next newline
    stop_level = 0  # inside a trailing References/External links... section of this level
    for node in code.nodes:
        if isinstance(node, Heading):
            # Headings are dropped (as in BERT's Wikipedia preprocessing) but end the paragraph.
            skip_line = False
            if stop_level and node.level > stop_level:
                continue
            title = node.title.strip_code().replace(DROPPED, "").strip().lower()
            stop_level = node.level if title in _STOP_SECTIONS else 0
            out.append("\n\n")
            continue
        if stop_level:
            continue
        if isinstance(node, Text):
            value = node.value
            if skip_line:
                cut = value.find("\n")
                if cut < 0:
                    continue
                value, skip_line = value[cut:], False
            # tags the parser left as text (unpaired); an entity-escaped `&lt;b&gt;` is an HTMLEntity
            out.append(_STRAY_TAG.sub(DROPPED, value) if "<" in value else value)
        elif skip_line:
            continue
        elif isinstance(node, Wikilink):
            title = str(node.title).strip()
            prefix, colon, _ = title.partition(":")
            # the whole link goes, image options and caption with it (their magic words are localised
            # too); `[[:Category:X]]` has an empty prefix: a visible link that keeps its text. A File link
            # under a local name that is not known is told by its shape.
            if colon and (
                namespace_key(prefix) in hidden
                or (
                    prefix.strip()
                    and looks_like_image(
                        title[len(prefix) + 1 :], None if node.text is None else str(node.text)
                    )
                )
            ):
                out.append(DROPPED)
                continue
            if node.text is not None:
                _render(node.text, out, hidden)
            elif not _INTERLANGUAGE.match(title):
                out.append(title.lstrip(":"))
        elif isinstance(node, Tag):
            tag = str(node.tag).strip().lower()
            if node.wiki_markup in _LIST_MARKUP:
                out.append("\n\n")
                skip_line = True
            elif node.wiki_markup == ":":  # an indented line is a paragraph of its own
                out.append("\n\n")
            elif tag in _DROP_TAGS:
                out.append(" " if tag == "br" else "\n\n" if tag in ("table", "hr") else DROPPED)
            elif node.contents is not None:
                block = "\n\n" if tag in _BLOCK_TAGS else ""
                out.append(block)
                _render(node.contents, out, hidden)
                out.append(block)
        elif isinstance(node, Template):
            _template_text(node, out, hidden)
        elif isinstance(node, ExternalLink):
            if node.title is not None:  # [http://x title] shows its title; bare and [n] links vanish
                _render(node.title, out, hidden)
        elif isinstance(node, HTMLEntity):
            out.append(node.normalize())
        # Comment and Argument nodes render as nothing


def _clean_paragraph(lines: list[str]) -> str:
    text = " ".join(close_gaps(join_lines(lines)).split())
    if (
        "(" in text or "[" in text or "（" in text or "［" in text
    ):  # "(; born 1900)", "()" left by dropped templates
        text = _PAREN_LEAD_PUNCT.sub("(", _EMPTY_PARENS.sub("", text))
        for pattern, bracket in _FULLWIDTH_PAREN_PUNCT:
            text = pattern.sub(bracket, text)
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text).strip()


def _pre_strip(m: re.Match) -> str:
    # a comment is nothing (a heading after it is still one); a <ref> or <math> is a mark (see `close_gaps`)
    return "" if m.group().startswith("<!--") else DROPPED


def _magic_word(m: re.Match) -> str:
    return m.group() if any(c.islower() for c in m.group(1)) else DROPPED


def wikitext_to_text(
    wikitext: str, hidden_namespaces: frozenset[str] = DEFAULT_HIDDEN_NAMESPACES, variant: str | None = None
) -> str:
    """Turn MediaWiki markup into plain prose, one paragraph a line.

    Kept: paragraph text, the visible text of wikilinks (`[[a|b]]` -> b, `[[a]]` -> a) and of titled
    external links, the contents of formatting tags, and the prose of a few inline templates (lang,
    convert, nowrap, ...). Dropped: other templates, `<ref>`s, comments, tables, links into the
    `hidden_namespaces` (File:/Image:/Media: with their options and caption, and Category:, under their
    English names and the local ones a dump declares, see `hidden_link_namespaces`), interlanguage links,
    math, galleries, list items, headings (as in BERT's own Wikipedia preprocessing; a heading still
    ends the paragraph before it) and trailing sections such as References and External links. Bold/italic
    quotes, behaviour switches (`__NOTOC__` in any language) and HTML tags left unpaired are removed,
    whitespace is collapsed; lines of one paragraph are joined and paragraphs are separated by a single
    "\\n". In Chinese and Japanese prose, where a template was dropped or two lines were joined, no space is
    put between two CJK characters. Language-variant markup (`-{zh-cn:域;zh-tw:體}-`) keeps the text of
    `variant` (see `wikitext.resolve_variants`; None: the first variant written).

    Pure and picklable, meant to run in worker processes; parsing uses mwparserfromhell.
    """
    text = resolve_variants(_cut_tables(_cut_templates(_PRE_STRIP.sub(_pre_strip, wikitext))), variant)
    # Style quotes ('' and ''') stay text and are removed afterwards: parsing them is the tokenizer's
    # slowest path, and unbalanced quotes make it backtrack.
    out: list[str] = []
    _render(mwparserfromhell.parse(text, skip_style_tags=True), out, hidden_namespaces)
    text = _STYLE_QUOTES.sub("", _MAGIC_WORD.sub(_magic_word, "".join(out)))
    paragraphs: list[str] = []
    current: list[str] = []
    for line in text.split("\n"):
        if line.replace(DROPPED, "").strip() and not _TABLE_LINE.match(line):
            current.append(line)
        elif current:
            paragraphs.append(_clean_paragraph(current))
            current = []
    if current:
        paragraphs.append(_clean_paragraph(current))
    return "\n".join(p for p in paragraphs if any(c.isalnum() for c in p))


def to_plain_text(doc: Document, variant: str | None = None) -> str:
    """The document as clean text, one paragraph (Wikipedia) or sentence (BookCorpus) a line; `variant`
    chooses the text of language-variant markup in wikitext (see `wikitext_to_text`)."""
    if doc.markup == "wikitext":
        return wikitext_to_text(doc.text, doc.hidden_namespaces, variant)
    lines = (" ".join(line.split()) for line in doc.text.split("\n"))
    return "\n".join(line for line in lines if line)


# ---------------------------------------------------------------------------------------- sentences

# Abbreviations that (almost) never end a sentence ("Dr. Smith", "e.g. this"): blingfire splits after
# some of them, so both splitters re-join such splits.
_NON_FINAL_ABBREVIATIONS = frozenset(
    ("mr", "mrs", "ms", "dr", "prof", "st", "gen", "col", "lt", "sgt", "capt", "cpt", "maj", "rev", "hon",
     "gov", "sen", "rep", "pres", "mt", "fr", "vs", "cf", "e.g", "i.e", "approx", "no")
)  # fmt: skip
_FALLBACK_BOUNDARY = re.compile(r"[.!?…]+[\"'”’)\]]*\s+")


def _load_blingfire() -> Callable[[str], str] | None:
    try:
        from blingfire import text_to_sentences  # ships its model and native library in the wheel
    except (ImportError, OSError) as err:  # OSError: no native library for this platform (e.g. arm64)
        log.info("blingfire unavailable (%s); using the regex sentence splitter", err)
        return None
    return text_to_sentences


_blingfire = _load_blingfire()


def _last_word(text: str) -> str:
    words = text.rsplit(None, 1)
    return words[-1].lstrip("(\"'“‘").lower() if words else ""


def _ends_with_abbreviation(sentence: str) -> bool:
    return sentence.endswith(".") and _last_word(sentence[:-1]) in _NON_FINAL_ABBREVIATIONS


def _regex_sentences(line: str) -> list[str]:
    """Fallback splitter: a boundary is .!? (plus closing quotes) and a space, followed by a word that
    does not start in lower case, unless the full stop ends an initial ("J."), an acronym ("U.S.") or
    a known abbreviation."""
    out, start = [], 0
    for m in _FALLBACK_BOUNDARY.finditer(line):
        nxt = line[m.end() : m.end() + 2].lstrip("\"'“‘([")[:1]
        if not nxt or nxt.islower():
            continue
        if line[m.start()] == ".":
            word = _last_word(line[start : m.start()])
            if len(word) == 1 or "." in word or word in _NON_FINAL_ABBREVIATIONS:
                continue
        out.append(line[start : m.end()].strip())
        start = m.end()
    out.append(line[start:].strip())
    return out


def split_sentences(text: str) -> list[str]:
    """Split text into sentences; every line is at least one sentence.

    Lines are split independently (paragraphs from `to_plain_text`, or BookCorpus's one sentence a line,
    must not be glued together). Within a line blingfire's model does the work when the `blingfire`
    wheel loads on this platform, else a regex splitter (used where blingfire's native library is missing,
    e.g. Linux arm64); both then re-join splits after abbreviations such as "Dr." and "e.g.". Nothing is
    downloaded. Like most splitters, all-lowercase text is rarely split within a line.
    """
    sentences: list[str] = []
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        parts = _blingfire(line).split("\n") if _blingfire is not None else _regex_sentences(line)
        merged: list[str] = []  # merges stay within the line
        for part in parts:
            if merged and _ends_with_abbreviation(merged[-1]):
                merged[-1] = f"{merged[-1]} {part}"
            elif part:
                merged.append(part)
        sentences.extend(merged)
    return sentences
