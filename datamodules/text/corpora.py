"""Streaming readers for the BERT pretraining corpora (English Wikipedia and BookCorpus): each yields
`Document`s in constant memory (XML dumps parsed incrementally with `mwxml`, text decoded chunk by chunk,
Parquet read in row-group batches), with formats and compression told by content, not name. Bad input that
loses nothing else is survived (truncated files keep what was read, undecodable bytes become U+FFFD), each
case counted in `ReadStats` and logged by file; a missing path, an unknown format or an undecodable XML dump
raises, naming the path (docs/data.md). Documents and counters live in `documents`, decoding in `textstream`,
multistream planning in `multistream`, cleaning in `wikiclean` and sentence splitting in `sentences`."""

from __future__ import annotations

import html
import io
import json
import logging
import re
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import mwxml
from mwxml.element_iterator import ElementIterator

from datamodules.text.documents import (
    BOOKCORPUS_FILES,
    DEFAULT_HIDDEN_NAMESPACES,
    WIKIPEDIA_FILES,
    Document,
    ReadStats,
    hidden_link_namespaces,
    resolve_paths,
)
from datamodules.text.multistream import (
    MEDIAWIKI_TAG,
    StreamRange,
    decompress_streams,
    index_mismatch,
    is_index_beside_dump,
)
from datamodules.text.textstream import (
    BROKEN_READ_ERRORS,
    TextStream,
    UndecodableText,
    count_broken,
    declared_xml_encoding,
    open_binary,
    sniff_magic,
    xml_codec,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- Wikipedia

_REDIRECT = re.compile(r"\s*#redirect", re.IGNORECASE)
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
    return [p for p in resolve_paths(paths, WIKIPEDIA_FILES) if not is_index_beside_dump(p)]


def iter_wikipedia_file(path: Path, stats: ReadStats) -> Iterator[Document]:
    """The articles of one Wikipedia file, in any format `iter_wikipedia` reads; counts it in `stats`."""
    stats.files_read += 1
    if sniff_magic(path).startswith(b"PAR1"):
        yield from _iter_parquet(path, stats)
        return
    with open_binary(path) as raw:
        stream = TextStream(raw, path, stats)
        head = stream.head().lstrip("\ufeff \t\r\n")
        if not head and stream.error is not None:
            count_broken(path, stats, stream.error, 0, None)
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
    path: Path, stream: TextStream, stats: ReadStats, quiet: bool = False, where: str = ""
) -> Iterator[Document]:
    """The articles of a MediaWiki export; `where` places its pages in `path` for warnings (a byte range
    of a multistream dump)."""
    # mwxml insists on a <siteinfo> block, which some exports lack: give those an empty one right after
    # the root tag.
    head = stream.head(1 << 16)
    if root := MEDIAWIKI_TAG.search(head):
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
    except BROKEN_READ_ERRORS as err:
        count_broken(path, stats, err, pages, last_title, unit="pages")


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
        text = decompress_streams(data[a - bounds[0] : b - bounds[0]])
        if text is None:
            raise index_mismatch(unit.index, path, f"bytes {a}-{b} are not whole bz2 streams")
        if not text.lstrip().startswith(b"<page"):
            raise index_mismatch(unit.index, path, f"the stream at offset {a} does not start with a <page>")
        parts.append(text)
    body = b"".join(parts).rstrip()
    body = body.removesuffix(b"</mediawiki>")  # the last range holds the closing stream
    # the pages' bytes are in the encoding the header declares
    header = unit.header.encode(xml_codec(declared_xml_encoding(unit.header) or "utf-8", path))
    xml = header + b"\n" + body + b"\n</mediawiki>\n"
    where = f" of the streams at bytes {unit.offsets[0]}-{unit.end}"
    yield from _iter_mediawiki_xml(path, TextStream(io.BytesIO(xml), path, stats), stats, True, where)


def _iter_wikiextractor_doc(path: Path, stream: TextStream, stats: ReadStats) -> Iterator[Document]:
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
    except BROKEN_READ_ERRORS as err:
        count_broken(path, stats, err, docs, last)
        return
    if attrs is not None:
        count_broken(path, stats, EOFError("file ended inside a <doc>"), docs, last)


def _iter_jsonl(path: Path, stream: TextStream, stats: ReadStats) -> Iterator[Document]:
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
    except BROKEN_READ_ERRORS as err:
        count_broken(path, stats, err, records, last)


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
        count_broken(path, stats, err, rows, last)


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
        with open_binary(path) as raw:
            stream = TextStream(raw, path, stats)
            if "\x00" in stream.head() or sniff_magic(path).startswith(b"PAR1"):
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


def _iter_book_lines(path: Path, stream: TextStream, stats: ReadStats, per_doc: int) -> Iterator[Document]:
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
    except BROKEN_READ_ERRORS as err:
        count_broken(path, stats, err, lineno, None, unit="lines")
    if lines and (doc := _book_document(path, f"{path.name}:{first}-{first + len(lines) - 1}", lines, stats)):
        yield doc


def _iter_book(path: Path, stream: TextStream, stats: ReadStats) -> Iterator[Document]:
    name = path.name
    for suffix in (".bz2", ".gz", ".xz", ".txt"):
        name = name.removesuffix(suffix)
    lines: list[str] = []
    try:
        for line in stream:
            stats.lines_read += 1
            lines.append(line.rstrip())
    except BROKEN_READ_ERRORS as err:
        count_broken(path, stats, err, len(lines), None, unit="lines")
    if doc := _book_document(path, f"{path.parent.name}/{name}", lines, stats):
        yield doc
