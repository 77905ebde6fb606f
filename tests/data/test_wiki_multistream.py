"""Parallel Wikipedia preparation: multistream dumps read by byte ranges of bz2 streams in worker processes,
the same documents and byte-identical instances as a plain read whatever the number of processes, and a
one-line error when an index does not match its dump. Dumps are generated in tmp_path."""

from __future__ import annotations

import bz2
import json
import random
from pathlib import Path

import pytest

from benchmarks.wiki_prep import write_multistream
from datamodules.text.corpora import iter_multistream_range, iter_wikipedia, wikipedia_files
from datamodules.text.documents import ReadStats
from datamodules.text.mlm_prepare import PrepareSettings, cache_key, prepare_mlm_cache
from datamodules.text.multistream import multistream_index, plan_multistream
from datamodules.tokenizer import TextTokenizer
from tests.helpers import sha256_of_files

_PROSE = (
    "the river city was built in old stone and its people have kept a market near the bridge since one "
    "winter when many ships came from north to trade salt wool iron for grain wine"
)
WORDS = _PROSE.split()
NAME = "xxwiki-20260101-pages-articles-multistream"
# a German dump: `Datei:` links are images and `Kategorie:` links categories, declared in <siteinfo>
HEADER = (
    '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="de">\n'
    "  <siteinfo><sitename>Wikipedia</sitename><dbname>dewiki</dbname><namespaces>"
    '<namespace key="-2" case="first-letter">Medium</namespace>'
    '<namespace key="0" case="first-letter" />'
    '<namespace key="1" case="first-letter">Diskussion</namespace>'
    '<namespace key="6" case="first-letter">Datei</namespace>'
    '<namespace key="14" case="first-letter">Kategorie</namespace>'
    "</namespaces></siteinfo>\n"
)


def _page(k: int, rng: random.Random) -> str:
    ns, text = 0, ""
    if k % 11 == 5:
        text = "#REDIRECT [[Seite 1]]"
    elif k % 13 == 7:
        ns, text = 1, "Eine Diskussion."
    else:
        paragraphs = [
            " ".join(" ".join(rng.choices(WORDS, k=rng.randint(5, 12))).capitalize() + "." for _ in range(4))
            for _ in range(rng.randint(2, 5))
        ]
        text = f"[[Datei:Bild {k}.jpg|mini|caption words]]'''Seite {k}''' {{{{Infobox|a=b}}}}" + "\n\n".join(
            paragraphs
        )
        text += f"\n[[Kategorie:Thema {k % 3}]]"
    return (
        f"  <page>\n    <title>Seite {k}</title>\n    <ns>{ns}</ns>\n    <id>{k + 1}</id>\n"
        f"    <revision><id>{k + 1000}</id><model>wikitext</model><format>text/x-wiki</format>"
        f'<text xml:space="preserve">{text.replace("&", "&amp;").replace("<", "&lt;")}</text></revision>\n'
        "  </page>\n"
    )


PAGES = [_page(k, random.Random(k)) for k in range(60)]


@pytest.fixture(scope="module")
def dumps(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The multistream dump (7 pages a stream) and its index, and the same XML as a plain, one-stream
    dump of the same file name in another folder (documents are assigned to splits by file name)."""
    root = tmp_path_factory.mktemp("wiki")
    dump, index = write_multistream(root / "multi", NAME, HEADER, PAGES, pages_per_stream=7)
    plain = root / "plain" / f"{NAME}.xml.bz2"
    plain.parent.mkdir()
    plain.write_bytes(bz2.compress((HEADER + "".join(PAGES) + "</mediawiki>\n").encode()))
    return dump, index, plain


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.train([" ".join(WORDS).capitalize() + "."] * 20, vocab_size=200)


def test_index_is_found_beside_its_dump_and_not_read_as_a_corpus(dumps) -> None:
    dump, index, plain = dumps
    assert multistream_index(dump) == index
    assert multistream_index(plain) is None  # no index beside it: a plain read
    assert wikipedia_files([str(dump.parent)]) == [dump]


def test_ranges_yield_the_documents_of_the_whole_dump(dumps) -> None:
    dump, index, plain = dumps
    whole_stats, range_stats = ReadStats(), ReadStats()
    whole = list(iter_wikipedia([str(dump)], whole_stats))
    units = plan_multistream(dump, index, unit_bytes=1)  # one stream a unit
    assert len(units) == 9  # ceil(60 / 7) page streams
    assert units[-1].end == dump.stat().st_size  # the closing stream is read with the last one
    ranges = [d for u in units for d in iter_multistream_range(u, range_stats)]
    assert [(d.source, d.doc_id, d.text, d.markup, d.hidden_namespaces) for d in ranges] == [
        (d.source, d.doc_id, d.text, d.markup, d.hidden_namespaces) for d in whole
    ]
    assert len(whole) == 60 - 5 - 5  # redirects (k % 11 == 5) and talk pages (k % 13 == 7) dropped
    assert "datei" in whole[0].hidden_namespaces and "kategorie" in whole[0].hidden_namespaces
    range_stats.files_read += 1  # counted once by the caller, not per range
    assert range_stats.as_dict() == whole_stats.as_dict()
    assert len(plan_multistream(dump, index, unit_bytes=10**9)) == 1


SETTINGS = PrepareSettings(
    max_seq_length=48, val_fraction=0.2, test_fraction=0.0, shards=4, min_shard_tokens=1
)


def _write_wikiextractor(folder: Path, files: int, docs: int) -> None:
    rng = random.Random(7)
    for f in range(files):
        path = folder / "AA" / f"wiki_{f:02d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        body = []
        for d in range(docs):
            title = f"Artikel {f}-{d}"
            text = " ".join(" ".join(rng.choices(WORDS, k=8)).capitalize() + "." for _ in range(5))
            body.append(f'<doc id="{f}{d}" url="u" title="{title}">\n{title}\n\n{text}\n</doc>\n')
        path.write_text("".join(body), encoding="utf-8")


def test_one_and_three_processes_give_identical_shards_and_index(dumps, tokenizer, tmp_path: Path) -> None:
    """A multistream dump read by ranges and a WikiExtractor folder read by file, in that order."""
    dump, _, _ = dumps
    extracted = tmp_path / "extracted"
    _write_wikiextractor(extracted, files=4, docs=6)
    inputs = [str(dump.parent), str(extracted)]
    folders = [
        prepare_mlm_cache(
            inputs, [], tokenizer, SETTINGS, tmp_path / f"c{n}", n, progress=False, stream_unit_bytes=1
        )
        for n in (1, 3)
    ]
    assert folders[0].name == folders[1].name
    one, three = (sha256_of_files(f) for f in folders)
    assert one == three
    index = json.loads((folders[0] / "index.json").read_text())
    assert index["sentences"]["train"]["documents"] + index["sentences"]["val"]["documents"] == 50 + 24
    stats = index["reader_stats"]
    assert stats["files_read"] == 1 + 4 and stats["pages_read"] == 60 + 24
    assert stats["redirects_skipped"] == 5 and stats["non_article_skipped"] == 5
    assert len(index["shards"]["train"]) > 1


def test_multistream_and_plain_dump_give_identical_instances(dumps, tokenizer, tmp_path: Path) -> None:
    dump, _, plain = dumps
    multi = prepare_mlm_cache([str(dump)], [], tokenizer, SETTINGS, tmp_path / "m", 2, progress=False)
    # file_unit_bytes=0: the plain dump is parsed by the main process and fed to the workers
    single = prepare_mlm_cache(
        [str(plain)], [], tokenizer, SETTINGS, tmp_path / "p", 2, progress=False, file_unit_bytes=0
    )
    shards_m, shards_p = (sha256_of_files(f) for f in (multi, single))
    shards_m.pop("index.json"), shards_p.pop("index.json")
    assert shards_m == shards_p and len(shards_m) > 4
    index_m, index_p = (json.loads((f / "index.json").read_text()) for f in (multi, single))
    for key in ("reader_stats", "sentences", "shards"):
        assert index_m[key] == index_p[key]


def test_cache_key_covers_the_index(dumps, tokenizer, tmp_path: Path) -> None:
    dump, index, _ = dumps
    copy = tmp_path / dump.name
    copy.write_bytes(dump.read_bytes())
    without = cache_key([copy], tokenizer, SETTINGS)
    (tmp_path / index.name).write_bytes(index.read_bytes())
    prepared = prepare_mlm_cache([str(copy)], [], tokenizer, SETTINGS, tmp_path / "c", 1, progress=False)
    assert prepared.name != f"mlm-{without}"
    assert prepared.name == f"mlm-{cache_key([copy, tmp_path / index.name], tokenizer, SETTINGS)}"


def _offsets(index: Path) -> list[str]:
    return bz2.decompress(index.read_bytes()).decode().splitlines()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("beyond", "is beyond the dump's"),
        ("shifted", "no bz2 stream starts at offset"),
        ("header", "are not one <mediawiki><siteinfo> header stream"),
    ],
)
def test_index_that_does_not_match_its_dump_is_one_line_naming_both(
    dumps, tokenizer, tmp_path: Path, change: str, message: str
) -> None:
    dump, index, _ = dumps
    bad_dump = tmp_path / dump.name
    bad_dump.write_bytes(dump.read_bytes())
    lines = _offsets(index)
    if change == "beyond":  # e.g. the index of a newer, longer dump
        lines[-1] = f"{bad_dump.stat().st_size + 10}:999:Seite X"
    elif change == "shifted":  # a stream that does not start where the index says
        offset, rest = lines[-1].split(":", 1)
        lines = [line for line in lines if not line.startswith(f"{offset}:")] + [f"{int(offset) + 3}:{rest}"]
    else:  # the first page stream listed too late: the "header" then holds pages
        first = lines[0].split(":", 1)[0]
        lines = [line for line in lines if not line.startswith(f"{first}:")]
    bad_index = tmp_path / index.name
    bad_index.write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(ValueError) as err:
        prepare_mlm_cache([str(bad_dump)], [], tokenizer, SETTINGS, tmp_path / "c", 2, progress=False)
    text = str(err.value)
    assert "\n" not in text and message in text
    assert str(bad_index) in text and str(bad_dump) in text
    assert not list((tmp_path / "c").iterdir())  # no cache, no temporary folder left behind
