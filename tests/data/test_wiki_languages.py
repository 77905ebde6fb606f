"""Wikipedia in other languages: localised File/Category namespaces from the dump's <siteinfo>, dumps with a
UTF-16 byte-order mark, a Wikipedia folder with no files, and accent stripping in the tokenizer."""

from __future__ import annotations

import bz2
import codecs
import logging
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from cli import main
from datamodules.text.corpora import iter_bookcorpus, iter_wikipedia
from datamodules.text.documents import DEFAULT_HIDDEN_NAMESPACES, ReadStats, hidden_link_namespaces
from datamodules.text.mlm_datamodule import MLMDataModule
from datamodules.text.wikiclean import to_plain_text, wikitext_to_text
from datamodules.tokenizer import TextTokenizer, build_tokenizer
from tests.helpers import REPO, cli_args

# ------------------------------------------------------------------------------------------ fixtures

# namespace names as each wiki's <siteinfo> declares them: Media (-2), File (6), Category (14)
NAMESPACES = {
    "vi": {-2: "Phương tiện", 4: "Wikipedia", 6: "Tập tin", 10: "Bản mẫu", 14: "Thể loại"},
    "bg": {-2: "Медия", 4: "Уикипедия", 6: "Файл", 10: "Шаблон", 14: "Категория"},
    "de": {-2: "Medium", 4: "Wikipedia", 6: "Datei", 10: "Vorlage", 14: "Kategorie"},
}

ARTICLES = {
    "vi": (
        "Việt Nam",
        "'''Việt Nam''' là một quốc gia ở [[Đông Nam Á]].\n"
        "[[Tập tin:Vietnam map.png|nhỏ|trái|250px|Bản đồ [[Việt Nam]] năm 2020]]\n"
        "Thủ đô là [[Hà Nội|thành phố Hà Nội]]. [[hình:Flag of Vietnam.svg|phải|Cờ đỏ sao vàng]]\n"
        "<gallery>\nTập tin:Hạ Long.jpg|Vịnh Hạ Long\nHình:Huế.jpg|Cố đô Huế\n</gallery>\n"
        "Xem [[:Thể loại:Quốc gia]].\n\n"
        "[[Thể loại:Quốc gia Đông Nam Á]]\n[[thể_loại:Việt Nam| ]]\n[[en:Vietnam]]",
        ["Việt Nam là một quốc gia ở Đông Nam Á.", "Thủ đô là thành phố Hà Nội.", "Xem Thể loại:Quốc gia."],
    ),
    "bg": (
        "България",
        "'''България''' е държава в [[Югоизточна Европа]].\n"
        "[[Файл:Bulgaria map.png|мини|ляво|Карта на [[България]]]]\n"
        "[[Картинка:Flag of Bulgaria.svg|дясно|200п|Знаме]]\n"
        "Столицата е [[София]].<gallery mode=packed>\nФайл:Рила.jpg|Рила\n</gallery>\n"
        "[[Категория:Държави в Европа]]\n[[категория:България]]",
        ["България е държава в Югоизточна Европа.", "Столицата е София."],
    ),
    "de": (
        "Deutschland",
        "'''Deutschland''' ist ein Staat in [[Mitteleuropa]].\n"
        "[[Datei:Karte.png|mini|links|hochkant=1.2|Karte von [[Deutschland]]]]\n"
        "[[Bild:Flagge.svg|rahmenlos]] Die Hauptstadt ist [[Berlin]].\n"
        "[[ Kategorie : Staat in Europa]]\n[[Medium:Hymne.ogg]]",
        ["Deutschland ist ein Staat in Mitteleuropa.", "Die Hauptstadt ist Berlin."],
    ),
}


def dump_xml(lang: str, declare_lang: bool = True, encoding: str = "utf-8", article: bool = True) -> str:
    """A small `<lang>wiki` export: one article, one category page; `xml:lang` optional (dbname remains)."""
    title, text, _ = ARTICLES[lang]
    names = "".join(
        f'<namespace key="{k}" case="first-letter">{escape(v)}</namespace>'
        for k, v in NAMESPACES[lang].items()
    )
    attr = f' xml:lang="{lang}"' if declare_lang else ""
    category = f"{NAMESPACES[lang][14]}:{title}"
    pages = [(title, 0, text)] * article + [(category, 14, "A category page.")]
    return (
        f'<?xml version="1.0" encoding="{encoding}"?>\n'
        f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11"{attr}>\n'
        f"<siteinfo><sitename>Wikipedia</sitename><dbname>{lang}wiki</dbname>"
        f'<namespaces><namespace key="0" case="first-letter" />{names}</namespaces></siteinfo>\n'
        + "".join(
            f"<page><title>{escape(t)}</title><ns>{ns}</ns><id>{i}</id><revision><id>{i}0</id>"
            f'<model>wikitext</model><format>text/x-wiki</format><text xml:space="preserve">{escape(body)}'
            "</text></revision></page>\n"
            for i, (t, ns, body) in enumerate(pages, 1)
        )
        + "</mediawiki>\n"
    )


# ------------------------------------------------------------------------------ localised namespaces


def test_hidden_link_namespaces_from_siteinfo_names_and_language_aliases():
    assert sorted(DEFAULT_HIDDEN_NAMESPACES) == ["category", "file", "image", "media"]
    hidden = hidden_link_namespaces(NAMESPACES["vi"], "vi")
    # the declared Media/File/Category names, the English ones, and the old Image name; not Wikipedia:
    assert hidden == DEFAULT_HIDDEN_NAMESPACES | {"phương tiện", "tập tin", "thể loại", "hình"}
    assert hidden_link_namespaces({6: "Datei", 14: "Kategorie"}, "de-AT") >= {"datei", "kategorie", "bild"}
    assert hidden_link_namespaces({14: "Thể_loại"}, None) == DEFAULT_HIDDEN_NAMESPACES | {"thể loại"}


@pytest.mark.parametrize("lang", sorted(ARTICLES))
def test_localised_dump_drops_images_galleries_and_categories(lang: str, tmp_path: Path):
    path = tmp_path / f"{lang}wiki-pages-articles.xml.bz2"
    path.write_bytes(bz2.compress(dump_xml(lang, declare_lang=lang != "vi").encode()))  # vi: via dbname
    stats = ReadStats()
    docs = list(iter_wikipedia([str(path)], stats))
    assert [d.doc_id for d in docs] == [ARTICLES[lang][0]]
    assert stats.non_article_skipped == 1  # the category page itself
    assert to_plain_text(docs[0]).split("\n") == ARTICLES[lang][2]


def test_english_names_alone_leave_localised_categories_in_the_text():
    """Images are known by their shape (a file name, image options), categories only by their names: without
    the dump's names the category list stays in the prose."""
    text = wikitext_to_text(ARTICLES["vi"][1])
    assert "nhỏ" not in text and "250px" not in text and "Bản đồ" not in text
    assert text.endswith("\nThể loại:Quốc gia Đông Nam Á")  # and `[[thể_loại:Việt Nam| ]]` left " "
    assert wikitext_to_text(ARTICLES["vi"][1], hidden_link_namespaces(NAMESPACES["vi"], "vi")) == "\n".join(
        ARTICLES["vi"][2]
    )


@pytest.mark.parametrize(
    ("wikitext", "expected"),
    [
        ("A [[TẬP TIN:x.png|nhỏ|B]] C.", "A C."),  # any case
        ("A [[tập_tin:x.png|B]] C.", "A C."),  # underscores
        ("A [[:Tập tin:x.png]] C.", "A Tập tin:x.png C."),  # leading colon: a visible link
        ("A [[:Thể loại:X|các nước]] C.", "A các nước C."),
        ("A [[Wikipedia:Giới thiệu|trang]] C.", "A trang C."),  # other namespaces keep their text
        ("A [[Tập tin:x.png|nhỏ|Chú thích [[Huế|có liên kết]]]] C.", "A C."),
    ],
)
def test_localised_link_forms(wikitext: str, expected: str):
    assert wikitext_to_text(wikitext, hidden_link_namespaces(NAMESPACES["vi"], "vi")) == expected


def test_real_enwiki_declares_the_english_names_only():
    dump = (
        REPO.parent
        / "shared/data/real/wikipedia/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    )
    if not dump.exists():
        pytest.skip("genuine enwiki sample not available")
    docs = iter_wikipedia([str(dump)])
    assert next(docs).hidden_namespaces == DEFAULT_HIDDEN_NAMESPACES


# ------------------------------------------------------------------------------------- byte-order marks


@pytest.mark.parametrize(
    ("codec", "bom", "declared"),
    [
        ("utf-16-le", codecs.BOM_UTF16_LE, "UTF-16"),
        ("utf-16-be", codecs.BOM_UTF16_BE, "UTF-16"),
        ("utf-32-le", codecs.BOM_UTF32_LE, "UTF-32"),
        ("utf-8", codecs.BOM_UTF8, "UTF-8"),
    ],
)
def test_dump_with_byte_order_mark_reads_as_utf8(
    codec: str, bom: bytes, declared: str, tmp_path: Path, caplog
):
    utf8 = tmp_path / "viwiki.xml"
    utf8.write_bytes(dump_xml("vi").encode())
    marked = tmp_path / f"viwiki-{codec}.xml.bz2"
    marked.write_bytes(bz2.compress(bom + dump_xml("vi", encoding=declared).encode(codec)))
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        got = list(iter_wikipedia([str(marked)], stats))
    expected = list(iter_wikipedia([str(utf8)]))
    assert [(d.doc_id, d.text, d.hidden_namespaces) for d in got] == [
        (d.doc_id, d.text, d.hidden_namespaces) for d in expected
    ]
    assert len(got) == 1 and stats.invalid_utf8_files == 0 and not caplog.records


def test_utf16_jsonl_and_book_and_invalid_utf16_offset(tmp_path: Path, caplog):
    jsonl = tmp_path / "wiki.jsonl"
    jsonl.write_bytes(codecs.BOM_UTF16_BE + '{"title": "Huế", "text": "Cố đô Huế."}\n'.encode("utf-16-be"))
    assert [(d.doc_id, d.text) for d in iter_wikipedia([str(jsonl)])] == [("Huế", "Cố đô Huế.")]
    book = tmp_path / "books" / "Sử ký.txt"
    book.parent.mkdir()
    # a lone high surrogate (0xD800) at byte 2 + 2 * 4: invalid UTF-16 after "Một."
    book.write_bytes(
        codecs.BOM_UTF16_LE + "Một.".encode("utf-16-le") + b"\x00\xd8" + "\nHai.".encode("utf-16-le")
    )
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        docs = list(iter_bookcorpus([str(book.parent)], stats))
    assert docs[0].text == "Một.\ufffd\nHai." and stats.invalid_utf8_files == 1
    assert f"{book}: invalid UTF-16-LE at byte 10" in caplog.text


# -------------------------------------------------------------------------------- no usable inputs


def test_empty_wikipedia_folder_fails_before_a_tokenizer_is_trained(tmp_path: Path, capsys):
    folder = tmp_path / "extracted"
    (folder / "AA").mkdir(parents=True)
    (folder / ".DS_Store").write_text("x")  # hidden: ignored
    cache = tmp_path / "cache"
    args = cli_args(
        "fit",
        f"--data.init_args.wikipedia=[{folder}]",
        f"--data.init_args.tokenizer.cache_dir={cache}",
        config="mlm/quickstart.yaml",
        root=tmp_path / "run",
    )
    with pytest.raises(SystemExit) as exit_info:
        main(args, friendly_errors=True)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert (
        f"input folder {folder} holds no files (hidden ones are ignored); expected MediaWiki XML" in errors[0]
    )
    assert "*.jsonl or *.parquet" in errors[0]
    assert not list(tmp_path.rglob("tokenizer.json")) and not cache.exists()


def test_folder_without_text_stops_the_tokenizer_training(tmp_path: Path):
    folder = tmp_path / "wiki"
    folder.mkdir()
    (folder / "categories.xml").write_text(dump_xml("de", article=False), encoding="utf-8")
    dm = MLMDataModule(
        wikipedia=[str(folder)],
        tokenizer={"cache_dir": str(tmp_path / "cache"), "vocab_size": 100},
    )
    counts = "files_read=1, pages_read=1, non_article_skipped=1"
    with pytest.raises(
        ValueError, match=rf"^no text found in the inputs \['{folder}'\] \({counts}\); nothing"
    ):
        _ = dm.tokenizer
    assert not list(tmp_path.rglob("tokenizer.json"))


# ------------------------------------------------------------------------------------------- accents


VIETNAMESE = ["Việt Nam là một quốc gia.", "Thủ đô của Việt Nam là Hà Nội."] * 20


@pytest.mark.parametrize(
    ("lowercase", "strip_accents", "expected"),
    [
        (True, None, "viet nam"),  # BERT-uncased
        (True, False, "việt nam"),
        (False, None, "Việt Nam"),
        (False, True, "Viet Nam"),
    ],
)
def test_strip_accents_setting(lowercase: bool, strip_accents: bool | None, expected: str, tmp_path: Path):
    trained = TextTokenizer.train(VIETNAMESE, 200, lowercase, strip_accents=strip_accents)
    assert trained.tokenizer.normalizer.normalize_str("Việt Nam") == expected
    assert trained.decode(trained.encode_batch(["Việt Nam"])[0]) == expected
    trained.save(tmp_path)
    loaded = TextTokenizer.from_file(tmp_path / "vocab.txt", lowercase, strip_accents)
    assert loaded.tokenizer.normalizer.normalize_str("Việt Nam") == expected


def test_strip_accents_in_tokenizer_cache_key(tmp_path: Path):
    def build(strip_accents: bool | None) -> TextTokenizer:
        return build_tokenizer(None, VIETNAMESE, tmp_path, 200, True, "corpus", strip_accents=strip_accents)

    default, kept, stripped = build(None), build(False), build(True)
    assert "việt" in kept.tokenizer.get_vocab() and "việt" not in default.tokenizer.get_vocab()
    # True with lowercase is BERT's default rule: the same vocabulary, cached once
    assert stripped.source == default.source != kept.source
    assert len(list(tmp_path.glob("wordpiece-*"))) == 2


def test_mlm_datamodule_passes_strip_accents(tmp_path: Path):
    path = tmp_path / "viwiki.xml"
    path.write_text(dump_xml("vi"), encoding="utf-8")
    dm = MLMDataModule(
        wikipedia=[str(path)],
        tokenizer={"cache_dir": str(tmp_path / "cache"), "vocab_size": 120, "strip_accents": False},
    )
    tok = dm.tokenizer
    assert tok.tokenizer.normalizer.normalize_str("Đông Nam Á") == "đông nam á"
    assert tok.decode(tok.encode_batch(["Thủ đô Hà Nội"])[0]) == "thủ đô hà nội"
    assert "ệ" in tok.tokenizer.get_vocab()  # the vocabulary was trained on accented text
