"""The documents the corpus readers yield, their read counters, and how input paths are resolved."""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from datamodules.text.wikitext import (
    NAMESPACE_ALIASES,
    fold_script,
)

log = logging.getLogger(__name__)


# Canonical names of the namespaces whose links render as images, category tags or nothing, never as
# prose: Media (-2), File (6, also "Image") and Category (14). Every wiki accepts them besides its own.
HIDDEN_NAMESPACE_IDS = (-2, 6, 14)
_CANONICAL_HIDDEN = ("media", "file", "image", "category")
# Namespace aliases are not in the XML export: `wikitext.NAMESPACE_ALIASES` holds the local names MediaWiki
# accepts besides the declared ones (Image for File, `[[Hình:...]]` in Vietnamese, `[[画像:...]]` in
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
