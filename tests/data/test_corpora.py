"""Tests for the streaming corpus readers: generated fixtures for every format and failure mode, plus the
genuine samples in ../shared/data/real when present."""

from __future__ import annotations

import bz2
import json
import logging
import pickle
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from datamodules.text import sentences, textstream
from datamodules.text.corpora import iter_bookcorpus, iter_wikipedia
from datamodules.text.documents import Document, ReadStats, resolve_paths
from datamodules.text.sentences import split_sentences
from datamodules.text.wikiclean import to_plain_text, wikitext_to_text
from tests.helpers import REPO

REAL = REPO.parent / "shared" / "data" / "real"
ENWIKI = REAL / "wikipedia" / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def real_file(relative: str) -> Path:
    path = REAL / relative
    if not path.exists():
        pytest.skip(f"genuine sample {relative} not available")
    return path


# ------------------------------------------------------------------------------------------ fixtures

ARTICLE = """{{Infobox country|name=Alphaland|capital=[[Alpha City]]}}
'''Alphaland''' is a ''fictional'' [[country]] in [[Europe|western Europe]].<ref>{{cite web|url=http://x.org|title=Cite}}</ref> Its area is {{convert|5|km2}}.<ref name="a"/>
It borders the sea.<!-- hidden comment --> Its name in French is {{lang|fr|Alphalande}}.

[[File:Flag.svg|thumb|The [[flag]] of Alphaland]]
== History ==
The state was founded in 1900 &amp; grew [http://example.org quickly] since.
* A list item that is dropped
* Another [[list]] item
{| class="wikitable"
! Year !! Population
|-
| 1900 || {{formatnum:1000}}
|}
After the table comes prose with <math>x^2</math> math.

== References ==
{{reflist}}
Some reference prose.

[[Category:Fictional countries]]
[[de:Alphaland]]"""


def mediawiki_xml(pages: list[str], siteinfo: bool = True) -> str:
    site = (
        "<siteinfo><sitename>Test</sitename><dbname>testwiki</dbname><namespaces>"
        '<namespace key="0" case="first-letter" /><namespace key="4" case="first-letter">Project</namespace>'
        "</namespaces></siteinfo>"
        if siteinfo
        else ""
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">\n'
        + site
        + "\n".join(pages)
        + "\n</mediawiki>\n"
    )


def page(title: str, text: str, ns: int = 0, redirect: str | None = None, page_id: int = 1) -> str:
    from xml.sax.saxutils import escape

    red = f'<redirect title="{redirect}" />' if redirect else ""
    return (
        f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>{page_id}</id>{red}"
        f"<revision><id>{page_id}0</id><model>wikitext</model><format>text/x-wiki</format>"
        f'<text xml:space="preserve">{escape(text)}</text></revision></page>'
    )


PAGES = [
    page("Alphaland", ARTICLE, page_id=1),
    page("Alpha", "#REDIRECT [[Alphaland]]", redirect="Alphaland", page_id=2),
    page("Project:About", "About this wiki.", ns=4, page_id=3),
    page("Empty", "   ", page_id=4),
    page("Beta", "'''Beta''' is the second letter.", page_id=5),
    page("Gamma", "Gamma is the third letter.", page_id=6),
]


@pytest.fixture
def xml_dump(tmp_path: Path) -> Path:
    path = tmp_path / "dump.xml"
    path.write_text(mediawiki_xml(PAGES), encoding="utf-8")
    return path


def multistream_bz2(xml: str) -> bytes:
    """Like enwiki's multistream dumps: the header and each page in a bz2 stream of its own."""
    head, _, rest = xml.partition("<page>")
    parts = [head] + ["<page>" + p for p in rest.split("<page>")]
    return b"".join(bz2.compress(p.encode()) for p in parts)


# --------------------------------------------------------------------------------------- resolve_paths


def test_resolve_paths_expands_folders_globs_and_dedupes(tmp_path: Path):
    (tmp_path / "AA").mkdir()
    (tmp_path / "AB").mkdir()
    for name in ("AA/wiki_01", "AA/wiki_00", "AB/wiki_00", "AA/.hidden"):
        (tmp_path / name).write_text("x")
    got = resolve_paths([str(tmp_path), str(tmp_path / "AA" / "wiki_*")])
    assert got == [tmp_path / "AA/wiki_00", tmp_path / "AA/wiki_01", tmp_path / "AB/wiki_00"]
    assert resolve_paths(str(tmp_path / "AB")) == [tmp_path / "AB/wiki_00"]  # a lone str is one path
    assert resolve_paths([str(tmp_path / "**" / "wiki_00")]) == [
        tmp_path / "AA/wiki_00",
        tmp_path / "AB/wiki_00",
    ]


def test_resolve_paths_missing_path_and_empty_glob_raise(tmp_path: Path):
    missing = tmp_path / "nope.xml.bz2"
    with pytest.raises(FileNotFoundError, match="nope.xml.bz2 does not exist"):
        resolve_paths([str(missing)])
    with pytest.raises(FileNotFoundError, match=r"wiki_\*.*does not exist"):
        resolve_paths([str(tmp_path / "wiki_*")])
    with pytest.raises(FileNotFoundError, match="nope.xml.bz2"):
        list(iter_wikipedia([str(missing)]))
    with pytest.raises(FileNotFoundError, match="nope.xml.bz2"):
        list(iter_bookcorpus([str(missing)]))


# ------------------------------------------------------------------------------- MediaWiki XML dumps


def test_xml_dump_filters_redirects_namespaces_and_empty(xml_dump: Path):
    stats = ReadStats()
    docs = list(iter_wikipedia([str(xml_dump)], stats))
    assert [d.doc_id for d in docs] == ["Alphaland", "Beta", "Gamma"]
    assert all(d.markup == "wikitext" and d.source == str(xml_dump) for d in docs)
    assert docs[0].text == ARTICLE  # raw wikitext, entity-decoded by the XML parser
    assert (stats.pages_read, stats.redirects_skipped, stats.non_article_skipped) == (6, 1, 1)
    assert (stats.empty_skipped, stats.documents_yielded, stats.truncated_files) == (1, 3, 0)


def test_xml_dump_without_siteinfo_and_latest_revision(tmp_path: Path):
    two_revisions = page("Multi", "old text", page_id=7).replace(
        "</revision>",
        '</revision><revision><id>71</id><model>wikitext</model><text xml:space="preserve">new text</text></revision>',
    )
    path = tmp_path / "export.xml"
    path.write_text(mediawiki_xml([two_revisions, PAGES[4]], siteinfo=False), encoding="utf-8")
    docs = list(iter_wikipedia([str(path)]))
    assert [(d.doc_id, d.text) for d in docs] == [
        ("Multi", "new text"),
        ("Beta", "'''Beta''' is the second letter."),
    ]


def test_bz2_and_multistream_bz2_match_plain_xml(xml_dump: Path, tmp_path: Path):
    xml = xml_dump.read_text(encoding="utf-8")
    single = tmp_path / "dump.xml.bz2"
    single.write_bytes(bz2.compress(xml.encode()))
    multi = tmp_path / "dump-multistream.xml.bz2"
    multi.write_bytes(multistream_bz2(xml))
    assert bz2.decompress(multi.read_bytes()).decode() == xml  # really several streams
    expected = [(d.doc_id, d.text) for d in iter_wikipedia([str(xml_dump)])]
    for path in (single, multi):
        assert [(d.doc_id, d.text) for d in iter_wikipedia([str(path)])] == expected


def test_truncated_bz2_keeps_pages_read_so_far(xml_dump: Path, tmp_path: Path, caplog):
    data = multistream_bz2(xml_dump.read_text(encoding="utf-8"))
    path = tmp_path / "cut.xml.bz2"
    path.write_bytes(data[: len(data) - 30])  # inside the last page's stream
    stats = ReadStats()
    with caplog.at_level(logging.WARNING, logger="datamodules.text.corpora"):
        docs = list(iter_wikipedia([str(path)], stats))
    assert [d.doc_id for d in docs] == ["Alphaland", "Beta"]
    assert stats.truncated_files == 1 and stats.problem_files == [str(path)]
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "cut.xml.bz2" in message and "after 5 pages" in message and "'Beta'" in message


def test_truncated_plain_xml_keeps_pages_read_so_far(xml_dump: Path, tmp_path: Path, caplog):
    xml = xml_dump.read_text(encoding="utf-8")
    path = tmp_path / "cut.xml"
    path.write_text(xml[: xml.index("Gamma is the third")], encoding="utf-8")
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        docs = list(iter_wikipedia([str(path)], stats))
    assert [d.doc_id for d in docs] == ["Alphaland", "Beta"]
    assert stats.truncated_files == 1
    assert "cut.xml" in caplog.text and "truncated" in caplog.text


def test_invalid_utf8_in_xml_stops_naming_the_byte(xml_dump: Path, tmp_path: Path):
    # XML's decoding errors are fatal: replacement characters would become training text
    raw = xml_dump.read_bytes().replace(b"second letter", b"second \xff\xfe letter")
    path = tmp_path / "bad.xml"
    path.write_bytes(raw)
    offset = raw.index(b"\xff")
    message = f"{path}: byte {offset} does not decode as utf-8 (the encoding its XML declaration names)"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        list(iter_wikipedia([str(path)], ReadStats()))


# ----------------------------------------------------------------- WikiExtractor, JSON lines, Parquet


def test_wikiextractor_doc_format_unescapes_entities(tmp_path: Path):
    folder = tmp_path / "extracted" / "AA"
    folder.mkdir(parents=True)
    (folder / "wiki_00").write_text(
        '<doc id="12" url="https://en.wikipedia.org/wiki?curid=12" title="Rock &amp; Roll">\n'
        "Rock &amp; Roll\n\nRock &amp; roll is a genre; 3 &lt; 4.\nSecond paragraph.\n</doc>\n"
        '<doc id="13" url="u" title="Empty">\nEmpty\n\n</doc>\n'
        '<doc id="14" url="u" title="Ünïcödé">\nÜnïcödé\nText with “quotes”.\n</doc>\n',
        encoding="utf-8",
    )
    stats = ReadStats()
    docs = list(iter_wikipedia([str(tmp_path / "extracted")], stats))
    assert [(d.doc_id, d.text, d.markup) for d in docs] == [
        ("Rock & Roll", "Rock & roll is a genre; 3 < 4.\nSecond paragraph.", "plain"),
        ("Ünïcödé", "Text with “quotes”.", "plain"),
    ]
    assert (stats.pages_read, stats.empty_skipped) == (3, 1)


def test_wikiextractor_doc_cut_mid_document(tmp_path: Path, caplog):
    path = tmp_path / "wiki_01"
    path.write_text(
        '<doc id="1" url="u" title="A">\nA\nText a.\n</doc>\n<doc id="2" url="u" title="B">\nB\nText', "utf-8"
    )
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        assert [d.doc_id for d in iter_wikipedia([str(path)], stats)] == ["A"]
    assert stats.truncated_files == 1 and "wiki_01" in caplog.text and "'A'" in caplog.text


def test_json_lines_wikiextractor_and_hf_with_malformed_line(tmp_path: Path, caplog):
    records = [
        {
            "id": "12",
            "revid": "1",
            "url": "u",
            "title": "Anarchism",
            "text": "Anarchism is a philosophy.\nMore.",
        },
        {"id": "25", "revid": "2", "url": "u", "title": "Autism", "text": ""},
        {"id": "39", "url": "u", "text": "No title here."},
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    extractor = tmp_path / "wiki_00"  # WikiExtractor --json: no extension
    extractor.write_text(
        "\n".join(lines[:2] + ['{"id": "x", "text": "unterminated'] + lines[2:]) + "\n", "utf-8"
    )
    hf = tmp_path / "train.jsonl"
    record = {"id": "7", "url": "u", "title": "Łódź", "text": "Łódź is a city."}
    hf.write_text(json.dumps(record) + "\r\n", "utf-8-sig")  # byte-order mark, Windows line ends
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        docs = list(iter_wikipedia([str(extractor), str(hf)], stats))
    assert [(d.doc_id, d.text) for d in docs] == [
        ("Anarchism", "Anarchism is a philosophy.\nMore."),
        ("39", "No title here."),
        ("Łódź", "Łódź is a city."),
    ]
    assert (stats.malformed_records, stats.empty_skipped, stats.pages_read) == (1, 1, 4)
    assert "wiki_00:3" in caplog.text


def test_parquet_read_in_row_groups(tmp_path: Path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = {
        "id": ["1", "2", "3", "4", "5"],
        "url": ["u"] * 5,
        "title": ["One", "Two", "Three", "Four", "Five"],
        "text": ["First.", "", "Third.", "Fourth.", "Fifth."],
    }
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.table(rows), path, row_group_size=2)
    assert pq.ParquetFile(path).num_row_groups == 3
    stats = ReadStats()
    docs = list(iter_wikipedia([str(path)], stats))
    assert [(d.doc_id, d.text) for d in docs] == [
        ("One", "First."),
        ("Three", "Third."),
        ("Four", "Fourth."),
        ("Five", "Fifth."),
    ]
    assert (stats.pages_read, stats.empty_skipped) == (5, 1)
    no_text = tmp_path / "other.parquet"
    pq.write_table(pa.table({"title": ["x"]}), no_text)
    with pytest.raises(ValueError, match="other.parquet"):
        list(iter_wikipedia([str(no_text)]))
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(path.read_bytes()[:-40])
    stats = ReadStats()
    assert list(iter_wikipedia([str(cut)], stats)) == [] and stats.truncated_files == 1


def test_unrecognised_wikipedia_format_names_file(tmp_path: Path):
    for name, content in (
        ("notes.txt", "just some text\n"),
        ("array.json", '[{"text": "x"}]'),
        ("obj.json", '{\n "a": 1}'),
    ):
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(ValueError, match=name):
            list(iter_wikipedia([str(path)]))


# ---------------------------------------------------------------------------------------- BookCorpus


def test_bookcorpus_concatenated_file_is_cut_at_blank_lines_and_every_n_lines(tmp_path: Path):
    path = tmp_path / "books_large_p1.txt"
    lines = ["s1 .", "s2 .", "s3 .", "s4 .", "s5 .", "", "s7 .", "s8 .", "s9 ."]
    path.write_text("\n".join(lines) + "\n")
    stats = ReadStats()
    docs = list(iter_bookcorpus([str(path)], stats, lines_per_document=3))
    assert [(d.doc_id, d.text) for d in docs] == [
        ("books_large_p1.txt:1-3", "s1 .\ns2 .\ns3 ."),
        ("books_large_p1.txt:4-5", "s4 .\ns5 ."),
        ("books_large_p1.txt:7-9", "s7 .\ns8 .\ns9 ."),
    ]
    assert stats.lines_read == 9 and stats.documents_yielded == 3
    bz = tmp_path / "books_large_p2.txt.bz2"
    bz.write_bytes(bz2.compress(path.read_bytes()))
    assert [d.text for d in iter_bookcorpus([str(bz)], lines_per_document=3)] == [d.text for d in docs]
    with pytest.raises(ValueError, match="lines_per_document"):
        list(iter_bookcorpus([str(path)], lines_per_document=0))


def test_bookcorpus_folder_of_books_one_document_each(tmp_path: Path):
    for rel, text in (
        ("Romance/silence.txt", "First sentence.\nSecond “quoted” one.\n"),
        ("Fantasy/dragons.txt", "Once upon a time.\r\n\r\nThe end."),
        ("Fantasy/empty.txt", "\n\n"),
    ):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8", newline="")
    stats = ReadStats()
    docs = list(iter_bookcorpus([str(tmp_path)], stats))
    assert [(d.doc_id, d.text, d.markup) for d in docs] == [
        ("Fantasy/dragons", "Once upon a time.\n\nThe end.", "plain"),
        ("Romance/silence", "First sentence.\nSecond “quoted” one.", "plain"),
    ]
    assert stats.empty_skipped == 1
    assert to_plain_text(docs[0]) == "Once upon a time.\nThe end."


def test_bookcorpus_invalid_utf8_decoded_with_replacement(tmp_path: Path, caplog):
    path = tmp_path / "Horror" / "bad.txt"
    path.parent.mkdir()
    path.write_bytes("Caf\u00e9 one.\n".encode() + b"Broken \xe9 byte.\nEnd \xf0\x9f\x98\n")
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        (doc,) = iter_bookcorpus([str(path)], stats)
    assert doc.text == "Café one.\nBroken \ufffd byte.\nEnd \ufffd"
    assert stats.invalid_utf8_files == 1 and stats.problem_files == [str(path)]
    assert "bad.txt: invalid UTF-8 at byte 18" in caplog.text


def test_bookcorpus_rejects_binary_file(tmp_path: Path):
    path = tmp_path / "cover.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")
    with pytest.raises(ValueError, match="cover.jpg"):
        list(iter_bookcorpus([str(path)]))


def test_text_stream_multibyte_characters_across_chunk_boundaries(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(textstream, "_CHUNK_BYTES", 5)
    text = "ŁódźЖ😀 é\n" * 50 + "last line without newline ü"
    path = tmp_path / "books" / "unicode.txt"
    path.parent.mkdir()
    path.write_text(text, encoding="utf-8")
    stats = ReadStats()
    (doc,) = iter_bookcorpus([str(path)], stats)
    assert doc.text == text and stats.invalid_utf8_files == 0


# ------------------------------------------------------------------------------------------- cleaning


def test_wikitext_to_text_drops_markup_keeps_prose():
    text = wikitext_to_text(ARTICLE)
    assert text.split("\n") == [
        "Alphaland is a fictional country in western Europe. Its area is 5 km2. It borders the sea. "
        "Its name in French is Alphalande.",
        "The state was founded in 1900 & grew quickly since.",
        "After the table comes prose with math.",
    ]


@pytest.mark.parametrize(
    ("wikitext", "expected"),
    [
        ("[[a|b]] and [[a]] and [[a (x)|]]", "b and a and"),
        ("[[Image:x.png|left|A [[nested]] caption]]Text.", "Text."),
        ("x [[:Category:Foo]] y", "x Category:Foo y"),
        ("See [https://x.org the site] or https://bare.org or [https://n.org].", "See the site or or."),
        ("'''''Both''''' and <b>tag</b> and <span style=x>span</span>.", "Both and tag and span."),
        (
            "Line one\nline two of the same paragraph.\n\nNext paragraph.",
            "Line one line two of the same paragraph.\nNext paragraph.",
        ),
        ("Born (; {{IPA|x}} 1900) here.", "Born (1900) here."),
        ("A {{nowrap|1 km}} walk.{{Citation needed|date=May 2020}} Next.", "A 1 km walk. Next."),
        ("Outer {{a|{{b|{{c}}}}|x=[[y]]}}text", "Outer text"),
        ("{{Infobox\n| a = {|\n|x\n|}\n}}\nProse __NOTOC__ here.", "Prose here."),
        ("Text<ref group=n>note</ref> <references/>", "Text"),
        ("; Term\n: Indented definition.", "Indented definition."),
        ("# numbered\n#: more\nAfter.", "After."),
        ("&nbsp;Caf&eacute; &#8212; &lt;b&gt;", "Café — <b>"),
        ("", ""),
    ],
)
def test_wikitext_to_text_cases(wikitext: str, expected: str):
    assert wikitext_to_text(wikitext) == expected


def test_wikitext_to_text_runs_in_worker_processes():
    assert pickle.loads(pickle.dumps(wikitext_to_text)) is wikitext_to_text
    with ProcessPoolExecutor(max_workers=1) as pool:
        assert list(pool.map(wikitext_to_text, ["[[a|b]] c", "''d''"])) == ["b c", "d"]


def test_to_plain_text_dispatches_on_markup():
    assert to_plain_text(Document("f", "d", "[[x|y]]  z\n\n\n w", markup="wikitext")) == "y z\nw"
    assert to_plain_text(Document("f", "d", "[[x|y]]  z\n\n\n w\t v ")) == "[[x|y]] z\nw v"


# ------------------------------------------------------------------------------------------ sentences


@pytest.mark.parametrize("backend", ["default", "regex"])
def test_split_sentences(backend: str, monkeypatch):
    if backend == "regex":
        monkeypatch.setattr(sentences, "_blingfire", None)
    text = (
        "Dr. Smith went to Washington, D.C. on Monday. He said “hello.” Was it 3.5 km away? Yes!\n"
        "A line without a full stop\n\n  the next line is lowercase .  "
    )
    assert split_sentences(text) == [
        "Dr. Smith went to Washington, D.C. on Monday.",
        "He said “hello.”",
        "Was it 3.5 km away?",
        "Yes!",
        "A line without a full stop",
        "the next line is lowercase .",
    ]
    assert split_sentences("") == [] and split_sentences(" \n ") == []


# --------------------------------------------------------------------------------- genuine samples


def test_real_enwiki_dump_counts_and_cleaning():
    path = real_file(ENWIKI.relative_to(REAL).as_posix())
    stats = ReadStats()
    docs = list(iter_wikipedia([str(path)], stats))
    # 206 pages: 100 redirects (the one namespace-4 page among them) and 106 articles
    assert len(docs) == 106 and stats.documents_yielded == 106
    assert (stats.pages_read, stats.redirects_skipped) == (206, 100)
    assert (stats.truncated_files, stats.invalid_utf8_files, stats.empty_skipped) == (0, 0, 0)
    assert docs[0].doc_id == "Anarchism" and not any(d.doc_id.startswith("Wikipedia:") for d in docs)
    cleaned = [wikitext_to_text(d.text) for d in docs]
    for marker in ("{{", "}}", "[[", "]]", "<ref", "&lt;", "'''", "{|", "[[Category:", "thumb|"):
        assert not any(marker in t for t in cleaned), marker
    anarchism = cleaned[0]
    assert anarchism.startswith("Anarchism is a political philosophy that advocates self-governed societies")
    assert "often described as stateless societies, although" in anarchism  # piped link text, ref gone
    assert "non-hierarchical free associations." in anarchism
    # lists are dropped (as BERT did), so a page that is only a list cleans to nothing
    assert [d.doc_id for d, t in zip(docs, cleaned) if not t] == ["List of anthropologists"]
    assert sum(map(len, cleaned)) > 2_000_000
    sentences = split_sentences(anarchism)
    assert (
        sentences[0]
        == "Anarchism is a political philosophy that advocates self-governed societies based on voluntary institutions."
    )
    assert len(sentences) > 100


def test_real_enwiki_matches_wikiextractor_json_titles():
    path = real_file(ENWIKI.relative_to(REAL).as_posix())
    folder = real_file("wikipedia/wikiextractor-json")
    stats = ReadStats()
    extracted = list(iter_wikipedia([str(folder)], stats))
    assert (stats.files_read, stats.pages_read, stats.empty_skipped) == (3, 106, 1)
    titles = [d.doc_id for d in iter_wikipedia([str(path)])]
    assert [d.doc_id for d in extracted] == [t for t in titles if t in {d.doc_id for d in extracted}]
    assert len(extracted) == 105 and extracted[0].text.startswith("Anarchism is a political philosophy")


def test_real_truncated_enwiki_bz2(tmp_path: Path, caplog):
    data = real_file(ENWIKI.relative_to(REAL).as_posix()).read_bytes()
    path = tmp_path / "enwiki-cut.xml.bz2"
    path.write_bytes(data[: len(data) // 2])
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        docs = list(iter_wikipedia([str(path)], stats))
    assert 0 < len(docs) < 106 and stats.truncated_files == 1
    assert "enwiki-cut.xml.bz2" in caplog.text and "last good:" in caplog.text


def test_real_table_markup_dump_without_siteinfo():
    path = real_file("wikipedia/enwiki-table-markup.xml.bz2")
    docs = list(iter_wikipedia([str(path)]))
    assert [d.doc_id for d in docs] == [
        "Constructive vote of no confidence",
        "List of Prison Break characters",
        "Academy Award for Best Production Design",
        "Economy of Estonia",
        "Brahui language",
    ]
    cleaned = [wikitext_to_text(d.text) for d in docs]
    for marker in ("{|", "|}", "||", "|-", "{{", "[["):
        assert not any(marker in t for t in cleaned), marker
    assert "seat in the Reichstag, it was possible" in cleaned[0]  # [[Reichstag (Weimar Republic)|Reichstag]]


def test_real_handwritten_export_latest_revision():
    path = real_file("wikipedia/export-0.8-handwritten.xml")
    stats = ReadStats()
    docs = list(iter_wikipedia([str(path)], stats))
    assert [(d.doc_id, d.text) for d in docs] == [("Foo", "Revision 2 text")]
    assert stats.non_article_skipped == 1


def test_real_wikiextractor_doc_output():
    path = real_file("wikipedia/wikiextractor-doc/AA/wiki_00")
    stats = ReadStats()
    docs = list(iter_wikipedia([str(path)], stats))
    assert (stats.pages_read, stats.empty_skipped, len(docs)) == (9, 3, 6)
    assert docs[1].doc_id == "Internet Society" and docs[1].text.startswith(
        "Internet Society hay ISOC là một tổ chức"
    )
    assert not any("&amp;" in d.text or "&lt;" in d.text for d in docs)


def test_real_bookcorpus_concatenated_sample():
    path = real_file("bookcorpus/books_large_p1.first10k.txt")
    stats = ReadStats()
    docs = list(iter_bookcorpus([str(path)], stats))
    assert [d.doc_id for d in docs] == [
        f"books_large_p1.first10k.txt:{i}-{i + 1999}" for i in range(1, 10_000, 2000)
    ]
    assert stats.lines_read == 10_000 and all(d.text.count("\n") == 1999 for d in docs)
    assert docs[0].text.startswith("the half-ling book one in the fall of igneeria series")
    assert docs[0].text == docs[0].text.lower()
    assert split_sentences(docs[0].text)[:2] == docs[0].text.split("\n")[:2]  # a line is a sentence


def test_real_bookcorpus_book_folder():
    folder = real_file("bookcorpus/books")
    (doc,) = iter_bookcorpus([str(folder)])
    assert doc.doc_id == "Romance/silence" and doc.source.endswith("silence.txt")
    lines = doc.text.split("\n")
    assert lines[0] == "This is a work of fiction." and len(lines) == 50
    assert "’" in doc.text or "“" in doc.text  # curly quotes kept
    assert len(split_sentences(doc.text)) >= 50
