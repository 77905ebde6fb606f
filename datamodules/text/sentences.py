"""Sentence splitting for BookCorpus-style text and NSP pairs: blingfire where installed, a regex fallback,
both re-joining splits after abbreviations that never end a sentence."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

log = logging.getLogger(__name__)


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
