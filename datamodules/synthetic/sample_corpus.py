"""The bundled sample corpus for `make demo` and the quickstart: generated, so it is ours to ship.

It writes the genuine formats the real corpora come in: a MediaWiki export XML dump compressed with bz2
(articles with templates, references, tables, categories, file links and a redirect, so the wikitext
cleaner does real work) and BookCorpus-style one-sentence-per-line, lowercased text. The sentences come
from a small grammar about fictional places, people and animals, with facts that recur across documents,
so a small BERT can learn to fill in masked words in minutes on a CPU.
"""

from __future__ import annotations

import bz2
import os
import random
from pathlib import Path
from xml.sax.saxutils import escape

from datamodules.generated import claim_folder, written_whole

GENERATOR = "datamodules.synthetic.sample_corpus.generate_sample_corpus"

TOWNS = ["Arlen", "Brisk", "Corvel", "Dunmore", "Elsby", "Fenwick", "Galder", "Hollin", "Ivra", "Jorvik"]
RIVERS = ["Ash", "Bree", "Colne", "Derrow", "Esk", "Fal"]
TRADES = ["bakers", "weavers", "smiths", "fishers", "potters", "brewers", "masons", "tanners"]
ANIMALS = ["fox", "otter", "heron", "badger", "hare", "owl", "stag", "wren"]
COLOURS = ["red", "green", "blue", "yellow", "white", "black"]
SEASONS = ["spring", "summer", "autumn", "winter"]
NAMES = ["Anna", "Bram", "Cora", "Dale", "Edith", "Finn", "Greta", "Hugo", "Ida", "Jonas"]


def _town_facts(rng: random.Random) -> dict[str, dict[str, str]]:
    facts = {}
    for t in TOWNS:
        facts[t] = {
            "river": rng.choice(RIVERS),
            "trade": rng.choice(TRADES),
            "animal": rng.choice(ANIMALS),
            "colour": rng.choice(COLOURS),
            "season": rng.choice(SEASONS),
            "founder": rng.choice(NAMES),
        }
    return facts


def _article_sentences(town: str, f: dict[str, str], rng: random.Random) -> list[str]:
    pool = [
        f"{town} is a small town on the river {f['river']}.",
        f"The town of {town} lies on the banks of the {f['river']}.",
        f"{town} was founded by {f['founder']} many years ago.",
        f"Most people in {town} are {f['trade']}.",
        f"The {f['trade']} of {town} sell their goods at the market.",
        f"The symbol of {town} is a {f['colour']} {f['animal']}.",
        f"A {f['colour']} {f['animal']} is painted on the gate of {town}.",
        f"Every {f['season']} the people of {town} hold a great fair.",
        f"The fair of {town} takes place in {f['season']}.",
        f"Children in {town} learn the story of {f['founder']} at school.",
    ]
    rng.shuffle(pool)
    return pool[: rng.randint(5, len(pool))]


def _wikitext(town: str, f: dict[str, str], rng: random.Random) -> str:
    sents = _article_sentences(town, f, rng)
    body = " ".join(
        s.replace(f["river"], f"[[{f['river']} River|{f['river']}]]", 1).replace(town, f"'''{town}'''", 1)
        for s in sents[:3]
    )
    rest = " ".join(sents[3:])
    return (
        "{{Infobox settlement\n| name = " + town + "\n| river = " + f["river"] + "\n}}\n"
        f"{body}<ref>{{{{cite book |title=Towns of the {f['river']} |year=1901}}}}</ref>\n\n"
        "== History ==\n"
        f'{rest}<ref name="hist">Local records.</ref>\n\n'
        f"[[File:{town} gate.jpg|thumb|The gate of {town}]]\n"
        '{| class="wikitable"\n|-\n! Year !! People\n|-\n| 1900 || 1200\n|}\n'
        f"[[Category:Towns on the {f['river']}]]\n"
    )


def _story_lines(facts: dict[str, dict[str, str]], rng: random.Random, n: int) -> list[str]:
    lines = []
    for _ in range(n):
        town = rng.choice(TOWNS)
        f = facts[town]
        name = rng.choice(NAMES)
        lines.append(
            rng.choice(
                [
                    f"{name} walked to {town} along the {f['river']} .",
                    f"in {town} , {name} met the {f['trade']} at the market .",
                    f"{name} saw a {f['colour']} {f['animal']} near the gate of {town} .",
                    f"`` the fair is in {f['season']} , '' said {name} .",
                    f"{name} did n't know that {f['founder']} founded {town} .",
                    f"the {f['trade']} of {town} gave {name} some bread .",
                ]
            ).lower()
        )
    return lines


def _page(title: str, page_id: int, text: str, ns: int = 0, redirect: str | None = None) -> str:
    red = f'    <redirect title="{escape(redirect)}" />\n' if redirect else ""
    return (
        "  <page>\n"
        f"    <title>{escape(title)}</title>\n    <ns>{ns}</ns>\n    <id>{page_id}</id>\n{red}"
        f"    <revision>\n      <id>{page_id + 100000}</id>\n      <timestamp>2024-01-01T00:00:00Z</timestamp>\n"
        "      <contributor><username>Sample</username><id>1</id></contributor>\n"
        "      <model>wikitext</model>\n      <format>text/x-wiki</format>\n"
        f'      <text bytes="{len(text.encode())}" xml:space="preserve">{escape(text)}</text>\n'
        "    </revision>\n  </page>\n"
    )


def generate_sample_corpus(
    root: str | os.PathLike, articles_per_town: int = 30, story_lines: int = 6000, seed: int = 0
) -> dict[str, Path]:
    """Write `root/enwiki-sample-pages-articles.xml.bz2` and `root/bookcorpus/books_large_sample.txt`.

    Idempotent: an existing complete sample is reused. Writes only into a `root` that does not exist, is empty
    or carries this generator's marker (`datamodules/generated.py`); any other folder raises `ForeignDataError`.
    A new sample is written to a temporary folder inside `root` and moved into place, so an interrupted run
    leaves nothing half-written.
    """
    root = Path(root)
    paths = {
        "wikipedia": root / "enwiki-sample-pages-articles.xml.bz2",
        "bookcorpus": root / "bookcorpus" / "books_large_sample.txt",
    }
    if all(p.is_file() for p in paths.values()):
        return paths
    params = {"articles_per_town": articles_per_town, "story_lines": story_lines, "seed": seed}
    advice = (
        "point data.tokenizer.cache_dir to an empty or new folder (the sample goes to its sample_corpus/), "
        "or read a corpus of your own with data.wikipedia / data.bookcorpus"
    )
    claim_folder(root, GENERATOR, params, advice)
    rng = random.Random(seed)
    facts = _town_facts(rng)
    entries = ("bookcorpus", paths["wikipedia"].name)  # the dump last: its presence completes the set
    with written_whole(
        root, GENERATOR, params, entries, lambda: all(p.is_file() for p in paths.values())
    ) as tmp:
        pages, pid = [], 10
        for k in range(articles_per_town):
            for town in TOWNS:
                title = town if k == 0 else f"{town} ({k})"
                pages.append(_page(title, pid, _wikitext(town, facts[town], rng)))
                pid += 1
        pages.append(_page("Arlen Town", pid, "#REDIRECT [[Arlen]]", redirect="Arlen"))
        pages.append(_page("Wikipedia:About", pid + 1, "A project page, not an article.", ns=4))
        header = (
            '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">\n'
            "  <siteinfo>\n    <sitename>Sample</sitename>\n    <dbname>samplewiki</dbname>\n"
            "    <base>https://example.org/wiki/Main_Page</base>\n    <generator>mmpretrain</generator>\n"
            '    <case>first-letter</case>\n    <namespaces>\n      <namespace key="0" case="first-letter" />\n'
            '      <namespace key="4" case="first-letter">Wikipedia</namespace>\n    </namespaces>\n'
            "  </siteinfo>\n"
        )
        with bz2.open(tmp / paths["wikipedia"].name, "wt", encoding="utf-8") as f:
            f.write(header + "".join(pages) + "</mediawiki>\n")
        (tmp / "bookcorpus").mkdir()
        lines = _story_lines(facts, rng, story_lines)
        (tmp / "bookcorpus" / "books_large_sample.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths
