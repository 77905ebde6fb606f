"""Wikitext to clean prose (`wikitext_to_text`, `to_plain_text`): a pure function, so preprocessing can run it
in worker processes. Per-wiki conventions (namespace aliases, variants, CJK spacing) are in `wikitext`."""

from __future__ import annotations

import re

import mwparserfromhell
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

from datamodules.text.documents import DEFAULT_HIDDEN_NAMESPACES, Document, namespace_key
from datamodules.text.wikitext import (
    DROPPED,
    close_gaps,
    join_lines,
    looks_like_image,
    resolve_variants,
)

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
