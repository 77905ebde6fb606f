"""Dumps that are wrong in themselves: a page without a title (skipped and counted), dumps in the legacy
encodings their XML declaration names (read as such), bytes that do not decode (one line naming the file and
the byte), a multistream index that does not fit its dump (one line before any vocabulary is trained), and
the `error:` line starting a line of its own after a progress bar. Dumps are generated in tmp_path."""

from __future__ import annotations

import bz2
import io
import json
import logging
import re
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from benchmarks.wiki_prep import write_multistream
from cli import main
from datamodules.text import corpora
from datamodules.text.corpora import iter_wikipedia
from datamodules.text.documents import ReadStats
from datamodules.tokenizer import TextTokenizer
from tests.helpers import cli_args

# jawiki's <siteinfo> names: ファイル for File, and the English Category kept as the local name
JA_SITEINFO = (
    "<siteinfo><sitename>Wikipedia</sitename><dbname>jawiki</dbname><namespaces>"
    '<namespace key="0" case="first-letter" /><namespace key="6" case="first-letter">ファイル</namespace>'
    '<namespace key="14" case="first-letter">Category</namespace></namespaces></siteinfo>'
)
ZH_SITEINFO = (
    "<siteinfo><sitename>Wikipedia</sitename><dbname>zhwiki</dbname><namespaces>"
    '<namespace key="0" case="first-letter" /><namespace key="6" case="first-letter">File</namespace>'
    '<namespace key="14" case="first-letter">Category</namespace></namespaces></siteinfo>'
)
JA_PAGES = [
    ("東京都", "'''東京都'''（とうきょうと）は、[[日本]]の[[首都]]である。\n\n人口は約1400万人である。"),
    ("大阪府", "'''大阪府'''（おおさかふ）は、[[近畿地方]]にある府である。[[Category:日本の都道府県]]"),
    ("京都府", "'''京都府'''は、かつて[[平安京]]が置かれた地である。"),
]
ZH_PAGES = [
    ("北京市", "'''北京市'''是[[中华人民共和国]]的首都。\n\n北京有三千多年的历史。"),
    ("上海市", "'''上海市'''是中国的经济中心之一。[[Category:中国城市]]"),
]


def _page(title: str | None, text: str, k: int) -> str:
    head = f"<title>{escape(title)}</title>" if title is not None else ""
    return (
        f"  <page>{head}<ns>0</ns><id>{k}</id><revision><id>{k}0</id><model>wikitext</model>"
        f'<format>text/x-wiki</format><text xml:space="preserve">{escape(text)}</text></revision></page>\n'
    )


def dump_xml(lang: str, pages: list[tuple[str | None, str]], encoding: str | None = "utf-8") -> str:
    declaration = f'<?xml version="1.0" encoding="{encoding}"?>\n' if encoding else ""
    return (
        f'{declaration}<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11" '
        f'xml:lang="{lang}">\n{JA_SITEINFO if lang == "ja" else ZH_SITEINFO}\n'
        + "".join(_page(t, x, k) for k, (t, x) in enumerate(pages, 1))
        + "</mediawiki>\n"
    )


def _args(tmp_path: Path, wikipedia: Path, *extra: str) -> list[str]:
    """A quickstart fit of no step on `wikipedia`: reading, vocabulary, instances, then an empty fit."""
    return cli_args(
        "fit",
        f"--data.init_args.wikipedia=[{wikipedia}]",
        "--data.init_args.sample_corpus=false",
        "--data.init_args.tokenizer.vocab_size=300",
        "--data.init_args.examples.val_fraction=0",
        "--data.init_args.examples.test_fraction=0",
        "--data.init_args.num_proc=1",
        "--data.init_args.loader.num_workers=0",
        f"--data.init_args.tokenizer.cache_dir={tmp_path / 'cache'}",
        "--trainer.max_steps=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=false",
        *extra,
        config="mlm/quickstart.yaml",
        root=tmp_path / "run",
    )


def _one_error_line(args: list[str], capsys: pytest.CaptureFixture) -> tuple[str, str]:
    """The `error:` line of a CLI call that must exit with status 2, and the whole of stderr. Lines are cut at
    "\\n" only: a progress bar redraws itself after "\\r", on the same terminal line."""
    with pytest.raises(SystemExit) as exit_info:
        main(args, friendly_errors=True)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.split("\n") if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("error: "), f"the error does not start its own line: {errors[0]!r}"
    return errors[0].removesuffix("  [MMPRETRAIN_DEBUG=1 shows the traceback]"), err


def _prepared_index(tmp_path: Path) -> dict:
    (index,) = (tmp_path / "cache").glob("mlm-*/index.json")
    return json.loads(index.read_text())


def _no_vocabulary_or_cache(tmp_path: Path) -> None:
    assert not list(tmp_path.rglob("tokenizer.json")) and not list(tmp_path.rglob("index.json"))


# ------------------------------------------------------------------------------------ page without a title


def test_page_without_title_is_skipped_counted_and_named(tmp_path: Path, caplog) -> None:
    pages = [JA_PAGES[0], (None, "題名のない記事の本文である。"), JA_PAGES[2]]
    path = tmp_path / "jawiki-notitle.xml.bz2"
    path.write_bytes(bz2.compress(dump_xml("ja", pages).encode()))
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        docs = list(iter_wikipedia([str(path)], stats))
    assert [d.doc_id for d in docs] == ["東京都", "京都府"]
    assert stats.malformed_pages == 1 and stats.pages_read == 3 and stats.problem_files == [str(path)]
    assert f"{path}: page 2, after '東京都' has no <title>; skipped" in caplog.text


def test_page_without_title_cli_run_goes_on_and_counts_it(tmp_path: Path) -> None:
    path = tmp_path / "jawiki-notitle.xml"
    path.write_text(dump_xml("ja", [(None, "題名のない記事。"), *JA_PAGES]), encoding="utf-8")
    main(_args(tmp_path, path), friendly_errors=True)
    stats = _prepared_index(tmp_path)["reader_stats"]
    assert stats["malformed_pages"] == 1 and stats["documents_yielded"] == 3


# ------------------------------------------------------------------------------------- legacy encodings


@pytest.mark.parametrize(
    ("lang", "label", "codec"),
    [("ja", "Shift_JIS", "cp932"), ("zh", "GB18030", "gb18030"), ("zh", "GB2312", "gb18030")],
)
def test_declared_legacy_encoding_is_honoured(lang: str, label: str, codec: str, tmp_path: Path) -> None:
    pages = JA_PAGES if lang == "ja" else ZH_PAGES
    utf8 = tmp_path / "utf8.xml"
    utf8.write_text(dump_xml(lang, pages), encoding="utf-8")
    legacy = tmp_path / f"{lang}wiki-{label}.xml.bz2"
    legacy.write_bytes(bz2.compress(dump_xml(lang, pages, label).encode(codec)))
    stats = ReadStats()
    got = [(d.doc_id, d.text, d.hidden_namespaces) for d in iter_wikipedia([str(legacy)], stats)]
    assert got == [(d.doc_id, d.text, d.hidden_namespaces) for d in iter_wikipedia([str(utf8)])]
    assert len(got) == len(pages) and stats.invalid_utf8_files == 0
    assert "\ufffd" not in "".join(text for _, text, _ in got)


@pytest.mark.parametrize(
    ("lang", "label", "codec"), [("ja", "Shift_JIS", "shift_jis"), ("zh", "GB18030", "gb18030")]
)
def test_legacy_encoded_dump_cli_run_trains_on_its_text(
    lang: str, label: str, codec: str, tmp_path: Path
) -> None:
    path = tmp_path / f"{lang}wiki.xml"
    path.write_bytes(dump_xml(lang, JA_PAGES if lang == "ja" else ZH_PAGES, label).encode(codec))
    cli = main(_args(tmp_path, path), friendly_errors=True)
    vocab = cli.datamodule.tokenizer.tokenizer.get_vocab()
    assert ("都" if lang == "ja" else "京") in vocab and "\ufffd" not in vocab
    stats = _prepared_index(tmp_path)["reader_stats"]
    assert stats["invalid_utf8_files"] == 0 and stats["documents_yielded"] == 3 - (lang == "zh")


# --------------------------------------------------------------------------------------- undecodable bytes


def _undecodable(tmp_path: Path) -> tuple[Path, int]:
    """A Japanese dump declared as UTF-8 whose second article was pasted in Shift_JIS."""
    good = dump_xml("ja", JA_PAGES).encode("utf-8")
    pasted = JA_PAGES[1][1].encode("utf-8")
    raw = good.replace(escape(JA_PAGES[1][1]).encode(), escape(JA_PAGES[1][1]).encode("shift_jis"))
    assert raw != good and pasted not in raw
    path = tmp_path / "jawiki-mixed.xml.bz2"
    path.write_bytes(bz2.compress(raw))
    return path, raw.index("'''大阪府".encode("shift_jis")) + 3  # the first non-ASCII byte


def test_undecodable_dump_stops_the_cli_in_one_line_before_any_vocabulary(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path, offset = _undecodable(tmp_path)
    error, _ = _one_error_line(_args(tmp_path, path), capsys)
    assert error == (
        f"error: {path}: byte {offset} does not decode as utf-8 (the encoding its XML declaration names); "
        "its text would be read as replacement characters"
    )
    _no_vocabulary_or_cache(tmp_path)


class _Pieces(io.RawIOBase):
    """A file that hands out its bytes in the given pieces, one a read: where the parser stands when the
    next piece is decoded is then known."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)

    def readable(self) -> bool:
        return True

    def read1(self, size: int = -1) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""

    read = read1


def test_bad_byte_met_inside_a_page_header_stops_the_read(tmp_path: Path, monkeypatch) -> None:
    """The decoder fails while mwxml reads the second page's <title>: that is not a page without a title to
    skip (after which the rest of the file would be lost without a word), but the file's error."""
    xml = dump_xml("ja", [("長い記事", "あ" * 70_000), ("東京", "首都である。")]).encode()
    cut = xml.index("東京</title>".encode())
    path = tmp_path / "jawiki.xml"
    path.write_bytes(xml)
    monkeypatch.setattr(corpora, "open_binary", lambda p: _Pieces([xml[:cut], b"\xff" + xml[cut + 1 :]]))
    stats = ReadStats()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: byte {cut} does not decode as utf-8"):
        list(iter_wikipedia([str(path)], stats))
    assert stats.malformed_pages == 0 and stats.truncated_files == 0


def test_declared_encoding_that_does_not_fit_names_it(tmp_path: Path) -> None:
    # declared Shift_JIS, written in UTF-8: a UTF-8 lead byte followed by bytes Shift_JIS does not allow
    path = tmp_path / "jawiki-sjis.xml"
    raw = dump_xml("ja", [("ヴ", "ヴァイオリン・ヴィオラ。")], "Shift_JIS").encode("utf-8")
    path.write_bytes(raw)
    with pytest.raises(ValueError) as raised:
        list(iter_wikipedia([str(path)]))
    match = re.fullmatch(
        rf"{re.escape(str(path))}: byte (\d+) does not decode as Shift_JIS \(the encoding its XML declaration "
        r"names\); its text would be read as replacement characters",
        str(raised.value),
    )
    assert match and int(match.group(1)) > raw.index(b"<page>")


def test_unknown_declared_encoding_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "jawiki.xml"
    path.write_bytes(dump_xml("ja", JA_PAGES[:1], "x-mac-klingon").encode("utf-8"))
    with pytest.raises(ValueError) as raised:
        list(iter_wikipedia([str(path)]))
    assert (
        str(raised.value) == f"{path}: the XML declaration names the encoding x-mac-klingon, which is unknown"
    )


def test_error_line_starts_after_the_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """With a given vocabulary the dump is first read by the worker processes, under the "tokenizing
    documents" bar: the error raised there must not continue the bar's line."""
    tokenizer = tmp_path / "vocab"
    TextTokenizer.train([text for _, text in JA_PAGES] * 5, vocab_size=120).save(tokenizer)
    path, offset = _undecodable(tmp_path)
    args = _args(tmp_path, path, f"--data.init_args.tokenizer.path={tokenizer / 'tokenizer.json'}")
    error, err = _one_error_line(args, capsys)
    assert "tokenizing documents" in err  # the bar was drawn
    assert error.startswith(f"error: {path}: byte {offset} does not decode as utf-8")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("index.json"))


# ------------------------------------------------------------------------------------ multistream index


def test_mismatched_index_is_one_line_before_any_vocabulary(tmp_path: Path, capsys) -> None:
    pages = [_page(f"記事{k}", f"これは{k}番目の記事である。", k) for k in range(1, 31)]
    header = dump_xml("ja", [])[: -len("</mediawiki>\n")]
    dump, index = write_multistream(
        tmp_path / "wiki", "jawiki-multistream", header, pages, pages_per_stream=10
    )
    lines = bz2.decompress(index.read_bytes()).decode().splitlines()
    offset, rest = lines[-1].split(":", 1)
    lines[-1] = f"{int(offset) + 5}:{rest}"  # the index of another dump
    index.write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    error, _ = _one_error_line(_args(tmp_path, dump.parent), capsys)
    assert error == (
        f"error: multistream index {index} does not match the dump {dump}: "
        f"no bz2 stream starts at offset {int(offset) + 5}"
    )
    _no_vocabulary_or_cache(tmp_path)
