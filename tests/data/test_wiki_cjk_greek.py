"""Wikitext of Japanese, Chinese and Greek Wikipedia: image links under local names outside the alias table
(told by their shape), category links in the other Chinese script, language-variant markup, local link
templates ({{仮リンク}}, {{le}}), no spaces between CJK characters where a template was dropped or lines were
joined, full-width brackets emptied by dropped templates, localised behaviour switches and unpaired HTML tags.
Dumps are generated in tmp_path with each wiki's own <siteinfo> names and markup conventions."""

from __future__ import annotations

import re
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from datamodules.text.corpora import iter_wikipedia
from datamodules.text.documents import DEFAULT_HIDDEN_NAMESPACES, ReadStats, hidden_link_namespaces
from datamodules.text.mlm_datamodule import MLMDataModule
from datamodules.text.wikiclean import to_plain_text, wikitext_to_text
from datamodules.text.wikitext import looks_like_image, resolve_variants

# the namespace names each wiki's <siteinfo> declares (jawiki and zhwiki keep English File/Category names)
SITEINFO = {
    "ja": {-2: "メディア", -1: "特別", 1: "ノート", 2: "利用者", 4: "Wikipedia", 6: "ファイル", 10: "Template",
           14: "Category", 100: "Portal"},
    "zh": {-2: "Media", -1: "Special", 1: "Talk", 2: "User", 4: "Wikipedia", 6: "File", 10: "Template",
           14: "Category", 100: "Portal"},
    "el": {-2: "Μέσο", -1: "Ειδικό", 1: "Συζήτηση", 2: "Χρήστης", 4: "Βικιπαίδεια", 6: "Αρχείο",
           10: "Πρότυπο", 14: "Κατηγορία", 100: "Πύλη"},
}  # fmt: skip


def write_dump(folder: Path, lang: str, pages: dict[str, str]) -> Path:
    """A `<lang>wiki` pages-articles export of `pages` (title -> wikitext), all in namespace 0."""
    names = "".join(
        f'<namespace key="{k}" case="first-letter">{escape(v)}</namespace>' for k, v in SITEINFO[lang].items()
    )
    xml = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11" xml:lang="{lang}">\n'
        f"<siteinfo><sitename>Wikipedia</sitename><dbname>{lang}wiki</dbname>"
        f'<namespaces><namespace key="0" case="first-letter" />{names}</namespaces></siteinfo>\n'
        + "".join(
            f"<page><title>{escape(title)}</title><ns>0</ns><id>{k}</id><revision><id>{k}0</id>"
            f'<model>wikitext</model><format>text/x-wiki</format><text xml:space="preserve">{escape(text)}'
            "</text></revision></page>\n"
            for k, (title, text) in enumerate(pages.items(), 1)
        )
        + "</mediawiki>\n"
    )
    path = folder / f"{lang}wiki-20260101-pages-articles.xml"
    path.write_text(xml, encoding="utf-8")
    return path


def cleaned(folder: Path, lang: str, pages: dict[str, str], variant: str | None = None) -> dict[str, str]:
    docs = list(iter_wikipedia([str(write_dump(folder, lang, pages))], ReadStats()))
    return {d.doc_id: to_plain_text(d, variant) for d in docs}


# ------------------------------------------------------------------------------------- image links

JA_IMAGES = (
    "'''東京タワー'''は、[[東京都]][[港区 (東京都)|港区]]にある電波塔である。\n"
    "[[画像:Tokyo Tower and around Skyscrapers.jpg|thumb|556px|center|[[東京タワー]]と周辺の高層ビル群]]\n"
    "[[ファイル:Tokyo Tower 2023.jpg|サムネイル|右|250ピクセル|2023年の東京タワー]]\n"
    "[[画像:Tower at night|frameless|代替文=夜景|夜の東京タワー]]高さは333メートルである。"
)
EL_IMAGES = (
    "Η '''Αθήνα''' είναι η [[πρωτεύουσα]] της [[Ελλάδα|Ελλάδας]].\n"
    "[[Εικόνα:Acropolis of Athens.jpg|μικρογραφία|250εσ|Η [[Ακρόπολη Αθηνών|Ακρόπολη]] το 2019]]\n"
    "[[Αρχείο:Parthenon.jpg|thumb|left|Ο Παρθενώνας]]Η πόλη έχει ιστορία 3.400 ετών."
)


@pytest.mark.parametrize(
    ("lang", "text", "expected"),
    [
        ("ja", JA_IMAGES, "東京タワーは、東京都港区にある電波塔である。\n高さは333メートルである。"),
        ("el", EL_IMAGES, "Η Αθήνα είναι η πρωτεύουσα της Ελλάδας.\nΗ πόλη έχει ιστορία 3.400 ετών."),
    ],
    ids=["ja", "el"],
)
def test_old_image_alias_drops_options_and_caption(
    lang: str, text: str, expected: str, tmp_path: Path
) -> None:
    assert cleaned(tmp_path, lang, {"記事": text}) == {"記事": expected}


@pytest.mark.parametrize(("lang", "text"), [("ja", JA_IMAGES), ("el", EL_IMAGES)], ids=["ja", "el"])
def test_image_link_is_told_by_its_shape_without_any_alias(lang: str, text: str) -> None:
    """The dump's declared names only, no language (so no alias table): `画像:` and `Εικόνα:` are unknown
    names, and their links are still images by their file names and options."""
    hidden = hidden_link_namespaces(SITEINFO[lang], None)
    assert "画像" not in hidden and "εικόνα" not in hidden
    text = wikitext_to_text(text, hidden)
    assert not re.search(r"thumb|556px|center|サムネイル|ピクセル|μικρογραφία|250εσ|Ακρόπολη|夜景|left", text)


@pytest.mark.parametrize(
    ("target", "options", "image"),
    [
        ("Tokyo.JPG", None, True),
        ("Map of Japan", "thumb|200px|地図", True),
        ("Map of Japan", "x120px", True),
        ("Χάρτης", "κέντρο|Χάρτης της Ελλάδας", True),
        ("地図", "缩略图|居中|地图", True),
        ("井戸端", "井戸端", False),  # [[Wikipedia:井戸端|井戸端]]: a visible link
        ("Άρθρο", None, False),
    ],
)
def test_image_shape(target: str, options: str | None, image: bool) -> None:
    assert looks_like_image(target, options) is image


def test_links_into_other_namespaces_keep_their_text() -> None:
    hidden = hidden_link_namespaces(SITEINFO["ja"], "ja")
    text = "[[Wikipedia:井戸端|井戸端]]で議論された。[[:画像:Tokyo.jpg]]を参照。[[Portal:日本]]"
    assert wikitext_to_text(text, hidden) == "井戸端で議論された。画像:Tokyo.jpgを参照。Portal:日本"


# ----------------------------------------------------------------------------- categories, both scripts

ZH_CATEGORIES = (
    "'''天體物理學'''是[[天文學]]的一個分支。\n\n"
    "[[分類:天體物理學]]\n[[分类:天文学分支]]\n[[Category:物理學| ]]\n[[:分類:天文學|天文學分類]]也值得一看。"
)


def test_category_in_either_chinese_script(tmp_path: Path) -> None:
    got = cleaned(tmp_path, "zh", {"天體物理學": ZH_CATEGORIES})
    assert got == {"天體物理學": "天體物理學是天文學的一個分支。\n天文學分類也值得一看。"}


def test_declared_chinese_name_matches_its_other_script() -> None:
    # a wiki that declares the traditional name: the simplified one is the same namespace
    hidden = hidden_link_namespaces({14: "分類", 6: "檔案"}, None)
    assert wikitext_to_text("正文。[[分类:天文学]][[档案:星云.jpg|缩略图|星云]]", hidden) == "正文。"


# ----------------------------------------------------------------------------- language variants

ZH_VARIANTS = (
    "{{NoteTA|G1=Physics|1=zh-cn:域;zh-tw:體;}}\n"
    "-{H|zh-cn:软件;zh-tw:軟體;}-在數學中，-{zh-cn:域;zh-tw:體}-是一種代數結構。"
    "計算使用-{A|zh-hans:软件;zh-hant:軟體}-完成，例如-{R|Mathematica}-與-{T-1000}-。"
    "-{T|zh-cn:域 (数学);zh-tw:體 (數學)}-"
)


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        (None, "在數學中，域是一種代數結構。計算使用软件完成，例如Mathematica與T-1000。"),
        ("zh-tw", "在數學中，體是一種代數結構。計算使用軟體完成，例如Mathematica與T-1000。"),
        ("zh-hk", "在數學中，體是一種代數結構。計算使用軟體完成，例如Mathematica與T-1000。"),
        ("zh-sg", "在數學中，域是一種代數結構。計算使用软件完成，例如Mathematica與T-1000。"),
    ],
    ids=["first-written", "zh-tw", "zh-hk", "zh-sg"],
)
def test_variant_markup_keeps_one_variant(variant: str | None, expected: str, tmp_path: Path) -> None:
    assert cleaned(tmp_path, "zh", {"體": ZH_VARIANTS}, variant) == {"體": expected}


def test_variant_markup_forms() -> None:
    assert resolve_variants("-{zh-cn:域; zh-tw:體;}-", "zh-tw") == "體"
    assert resolve_variants("-{zh-hans:[[计算机]];zh-hant:[[電腦]]}-", "zh-hant") == "[[電腦]]"
    assert resolve_variants("a-{{lang|fr|x}}-b") == "a-{{lang|fr|x}}-b"  # a template after a hyphen
    assert resolve_variants("-{sr-ec:Београд;sr-el:Beograd}-", "sr-latn") == "Beograd"


def test_language_variant_setting_reaches_the_vocabulary_texts(tmp_path: Path) -> None:
    path = write_dump(tmp_path, "zh", {"體": ZH_VARIANTS})
    for variant, word in ((None, "域是"), ("zh-tw", "體是")):
        dm = MLMDataModule(
            wikipedia=[str(path)],
            language_variant=variant,
            tokenizer={"cache_dir": str(tmp_path / "c")},
        )
        assert dm.settings.variant == variant
        assert word in "".join(dm._training_texts())


# ----------------------------------------------------------------------------- local link templates


@pytest.mark.parametrize(
    ("lang", "text", "expected"),
    [
        (
            "ja",
            "1919年には暴動が頻発した（{{仮リンク|米騒動 (1919年)|en|Rice riots of 1919}}）。"
            "{{仮リンク|ジョン・スミス (政治家)|en|John Smith (politician)|label=スミス}}が鎮圧した。",
            "1919年には暴動が頻発した（米騒動 (1919年)）。スミスが鎮圧した。",
        ),
        (
            "zh",
            "{{le|哈勃定律|Hubble's law}}描述宇宙膨脹，由{{link-en|埃德溫·哈勃|Edwin Hubble|哈勃}}提出，"
            "見{{tsl|en|Cosmic distance ladder|宇宙距離階梯}}。",
            "哈勃定律描述宇宙膨脹，由哈勃提出，見宇宙距離階梯。",
        ),
    ],
    ids=["ja", "zh"],
)
def test_local_link_templates_keep_their_text(lang: str, text: str, expected: str, tmp_path: Path) -> None:
    assert cleaned(tmp_path, lang, {"記事": text}) == {"記事": expected}


# ------------------------------------------------------------------------ CJK spacing and brackets

JA_SPACING = (
    "'''東京都'''（とうきょうと、{{lang-en-short|Tokyo Metropolis}}）は、[[日本]]の首都である"
    '<ref name="a">{{Cite web|title=東京都について}}</ref>。{{Efn|特別区を含む。}}\n'
    "江戸時代には[[江戸幕府]]が置かれ {{要出典|date=2020年5月}} 、\n"
    "明治以降は首都として発展した<ref>出典</ref> 。\n"
    "首都圏の人口は{{Sfn|総務省|2020}}約3700万人である。山田 太郎はここで生まれた。\n\n"
    "'''夏目漱石'''（{{要出典}}）は作家である。\n"
    "'''森鷗外'''（{{IPA|moɾi oːɡai}}、1862年 - 1922年）は軍医である。\n"
    "'''樋口一葉'''（1872年、{{没年齢|1872|5|2|1896|11|23}}）は作家である。\n\n"
    "The {{efn|x}} tower is '''Tokyo Tower''' ({{lang-ja|東京タワー}})."
)
JA_SPACING_EXPECTED = (
    "東京都（とうきょうと、Tokyo Metropolis）は、日本の首都である。江戸時代には江戸幕府が置かれ、"
    "明治以降は首都として発展した。首都圏の人口は約3700万人である。山田 太郎はここで生まれた。\n"
    "夏目漱石は作家である。森鷗外（1862年 - 1922年）は軍医である。樋口一葉（1872年）は作家である。\n"
    "The tower is Tokyo Tower (東京タワー)."
)


def test_no_space_between_cjk_characters_where_markup_was_dropped(tmp_path: Path) -> None:
    """Only the source's own space ("山田 太郎") stays between CJK characters; next to a Latin character (the
    English paragraph) a space where markup was dropped stays one space."""
    got = cleaned(tmp_path, "ja", {"東京都": JA_SPACING})["東京都"]
    assert got == JA_SPACING_EXPECTED
    cjk = r"[\u3001-\u30ff\u4e00-\u9fff\uff01-\uff60]"
    assert re.findall(rf"{cjk} {cjk}", got) == ["田 太"]


def test_chinese_spacing_and_full_width_brackets(tmp_path: Path) -> None:
    text = (
        "'''北京市'''（{{lang-en|Beijing}}，{{Audio|Beijing.ogg|聆听}}）是[[中华人民共和国]]的首都"
        "{{NoteTag|直辖市}}，\n位于华北平原北部。{{Citation needed}}\n人口约2189万（{{as of|2020}}）。"
    )
    got = cleaned(tmp_path, "zh", {"北京市": text})
    assert got == {
        "北京市": "北京市（Beijing）是中华人民共和国的首都，位于华北平原北部。人口约2189万（As of 2020）。"
    }


# --------------------------------------------------------------------- behaviour switches, stray tags


@pytest.mark.parametrize(
    ("lang", "text", "expected"),
    [
        (
            "el",
            "__ΕΥΡΕΤΗΡΙΟ__\nΗ '''Αθήνα''' είναι πόλη.\n__ΧΩΡΙΣΠΠ__\n{{Στήλες-αρχή}}\n"
            'Ο Παρθενώνας είναι ναός.\n</div>\n<div style="column-count:2">\nΗ Πλάκα είναι συνοικία.\n'
            "{{Στήλες-τέλος}}\n[[Κατηγορία:Πρωτεύουσες]]",
            "Η Αθήνα είναι πόλη.\nΟ Παρθενώνας είναι ναός.\nΗ Πλάκα είναι συνοικία.",
        ),
        (
            "ja",
            "__目次非表示__\n＿＿目次＿＿\n'''東京'''は首都である。\n</div>\n__NOEDITSECTION__\n"
            "Pythonの__init__メソッドは初期化を行う。",
            "東京は首都である。\nPythonの__init__メソッドは初期化を行う。",
        ),
    ],
    ids=["el", "ja"],
)
def test_localised_switches_and_unpaired_tags_are_removed(
    lang: str, text: str, expected: str, tmp_path: Path
) -> None:
    assert cleaned(tmp_path, lang, {"記事": text}) == {"記事": expected}


def test_escaped_tags_stay_text() -> None:
    assert wikitext_to_text("The tag &lt;/div&gt; closes a block.", DEFAULT_HIDDEN_NAMESPACES) == (
        "The tag </div> closes a block."
    )
