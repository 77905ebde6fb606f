"""Wikitext conventions that vary between Wikipedias, as data and small pure functions for the cleaner in
`wikiclean.wikitext_to_text`.

    namespace aliases   local names of Media, File and Category that a dump does not declare, with Chinese
                        script variants folded, so `[[分類:X]]` is a category where the dump declares `分类`
    image links         a link with image options (`thumb`, `250px` and their localised forms) is an image
                        whatever its namespace is called locally
    language variants   `-{zh-cn:域;zh-tw:體}-` keeps one variant's text (`resolve_variants`)
    CJK spacing         `close_gaps` removes the whitespace around a `DROPPED` mark or a joined line end
                        when the characters on both sides are CJK"""

from __future__ import annotations

import re

# Local names of Media (-2), File (6, also called Image) and Category (14) that a dump's <siteinfo> does
# not list, by language: MediaWiki accepts them besides the declared ones.
NAMESPACE_ALIASES: dict[str, tuple[str, ...]] = {
    "bg": ("Картинка",), "de": ("Bild",), "es": ("Imagen",), "it": ("Immagine",), "nl": ("Afbeelding",),
    "pl": ("Grafika",), "pt": ("Imagem",), "ru": ("Изображение",), "sv": ("Bild",), "vi": ("Hình",),
    "el": ("Εικόνα", "Μέσον"),
    "ja": ("画像",),
    # zh-hans and zh-hant names: a zhwiki dump declares the English ones
    "zh": ("文件", "档案", "图像", "图片", "媒体", "分类"),
}  # fmt: skip

# Traditional -> simplified for the characters of Chinese namespace names, so either script matches.
_HAN_FOLD = str.maketrans("檔圖像媒體類", "档图像媒体类")


def fold_script(name: str) -> str:
    """`name` with its traditional Chinese characters folded to simplified ones (namespace names only)."""
    return name.translate(_HAN_FOLD)


# ------------------------------------------------------------------------------------------ images

_MEDIA_FILE = re.compile(
    r"\.(?:jpe?g|png|gif|svg|tiff?|webp|bmp|xcf|pdf|djvu|ogg|ogv|oga|opus|webm|mp3|wav|flac|midi?|stl)\s*$",
    re.IGNORECASE,
)
# Image options (MediaWiki's img_* magic words) in English and in the languages' own forms
_IMAGE_WORDS = frozenset(
    {
        # English, every wiki
        "thumb", "thumbnail", "frame", "framed", "enframed", "frameless", "border", "left", "right",
        "center", "centre", "none", "upright", "baseline", "middle", "sub", "super", "sup", "top",
        "text-top", "bottom", "text-bottom",
        # Japanese
        "サムネイル", "右", "左", "なし", "中央", "フレーム", "フレームなし", "ボーダー",
        # Chinese
        "缩略图", "縮圖", "缩图", "居中", "无", "無", "有框", "无框", "無框", "边框", "邊框", "右上",
        # Greek
        "μικρογραφία", "μινιατούρα", "δεξιά", "αριστερά", "καθόλου", "κέντρο", "με-πλαίσιο",
        "χωρίς-πλαίσιο", "κατακόρυφα", "πλαίσιο",
        # German, French, Spanish, Italian, Russian, Vietnamese
        "mini", "miniatur", "links", "rechts", "zentriert", "hochkant", "rahmenlos", "gerahmt",
        "vignette", "gauche", "droite", "centré", "miniatura", "izquierda", "derecha", "centro",
        "sinistra", "destra", "мини", "миниатюра", "слева", "справа", "центр", "nhỏ", "trái", "phải",
        "giữa",
    }
)  # fmt: skip
_IMAGE_KEYED = re.compile(
    r"(?:alt|link|page|lang|class|upright|thumb|thumbnail|代替文|リンク|ページ|链接|連結|页数|"
    r"σύνδεσμος|εναλλ\.|κατακόρυφα|σελίδα|hochkant|verweis)\s*=",
    re.IGNORECASE,
)
_IMAGE_WIDTH = re.compile(r"\d*(?:x\d+)?\s*(?:px|ピクセル|像素|εσ|пкс|пикс)", re.IGNORECASE)


def is_image_option(option: str) -> bool:
    option = option.strip()
    return (
        option.casefold() in _IMAGE_WORDS
        or bool(_IMAGE_WIDTH.fullmatch(option))
        or bool(_IMAGE_KEYED.match(option))
    )


def looks_like_image(target: str, options: str | None) -> bool:
    """Whether `[[Prefix:target|options]]` is an image by its shape: a media file name, or an image option
    among the `|`-separated options. For links whose prefix is not a known File name."""
    if _MEDIA_FILE.search(target):
        return True
    return options is not None and any(is_image_option(part) for part in options.split("|"))


# ------------------------------------------------------------------------------ language variants

_VARIANT_BLOCK = re.compile(r"-\{(?!\{)((?:(?!-\{|\}-).)*)\}-", re.DOTALL)  # "-{{" opens a template
_VARIANT_FLAGS = re.compile(r"\s*([A-Za-z-])(?:\s*;\s*[A-Za-z-])*\s*")
# a conversion rule "zh-cn:text" (languages with variants: Chinese, Serbian, Kazakh, Kurdish, Uzbek, ...)
_VARIANT_CODE = r"(?:zh|sr|kk|ku|uz|tg|iu|ike|shi|gan|crh|wuu|ban|tly|zgh)(?:-[a-z]{2,5})*"
_VARIANT_RULE = re.compile(rf"(?:^|;)\s*(?:[^;=]*=>\s*)?({_VARIANT_CODE})\s*:")
# variants that stand in for each other when the one asked for is not written
_VARIANT_GROUPS = (
    ("zh-hans", "zh-cn", "zh-sg", "zh-my"),
    ("zh-hant", "zh-tw", "zh-hk", "zh-mo"),
    ("sr-ec", "sr-cyrl"),
    ("sr-el", "sr-latn"),
)


def _pick(rules: list[tuple[str, str]], variant: str | None) -> str:
    if variant is not None:
        codes = [code for code, _ in rules]
        if variant in codes:
            return rules[codes.index(variant)][1]
        for group in _VARIANT_GROUPS:
            if variant in group:
                for code, text in rules:
                    if code in group:
                        return text
        language = variant.split("-")[0]
        if language in codes:
            return rules[codes.index(language)][1]
    return rules[0][1]


def _variant_text(body: str, variant: str | None) -> str:
    flags, bar, rest = body.partition("|")
    if bar and _VARIANT_FLAGS.fullmatch(flags):
        letters = {f.strip() for f in flags.split(";")}
        if "R" in letters:  # raw: shown as written
            return rest
        if "A" not in letters:  # H (a rule for the page), T (the title), D, N, "-": nothing in the text
            return ""
        body = rest
    starts = list(_VARIANT_RULE.finditer(body))
    if not starts or starts[0].start() != 0 and body[: starts[0].start()].strip():
        return body  # -{text}-: text protected from conversion, shown as written
    rules = [
        (m.group(1), body[m.end() : nxt.start() if nxt else len(body)].strip().rstrip(";"))
        for m, nxt in zip(starts, [*starts[1:], None])
    ]
    return _pick(rules, variant)


def resolve_variants(text: str, variant: str | None = None) -> str:
    """Replace language-variant markup by the text of one variant.

    `variant` (e.g. "zh-cn", "zh-tw") picks the rule written for it, or for a variant of the same script
    (zh-hans, zh-cn, zh-sg, zh-my stand in for each other; so do zh-hant, zh-tw, zh-hk, zh-mo); None, or a
    variant the markup does not name, keeps the first rule written. The rest of an article is left in the
    script its authors wrote it in: MediaWiki converts whole pages with tables this reader does not have.
    `-{R|x}-` and `-{x}-` show x; rules for the whole page (`-{H|...}-`) and the title (`-{T|...}-`) show
    nothing.
    """
    if "-{" not in text:
        return text
    previous = None
    while previous != text:  # nested markup: innermost first
        previous, text = text, _VARIANT_BLOCK.sub(lambda m: _variant_text(m.group(1), variant), text)
    return text


# ---------------------------------------------------------------------------------- CJK spacing

DROPPED = "\ue000"  # a private-use character: where the cleaner removed a template, tag or link
_CJK = re.compile(
    r"[\u2e80-\u2fdf\u3001-\u303f\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    r"\uff01-\uff60\uffe0-\uffe6\U00020000-\U0003134f]"
)
_AROUND_DROPPED = re.compile(rf"\s*{DROPPED}[\s{DROPPED}]*")


def is_cjk(char: str) -> bool:
    """Han, kana and CJK punctuation (full-width forms included): scripts written without spaces. Not
    Hangul, which Korean separates with spaces."""
    return bool(char) and bool(_CJK.match(char))


def join_lines(lines: list[str]) -> str:
    """Lines of one paragraph joined as a browser shows them: by a space, but by nothing between two CJK
    characters."""
    if not any(_CJK.search(line) for line in lines):
        return " ".join(lines)
    out = lines[0]
    for line in lines[1:]:
        left, right = out.rstrip(f" \t{DROPPED}")[-1:], line.lstrip(f" \t{DROPPED}")[:1]
        out += ("" if is_cjk(left) and is_cjk(right) else " ") + line
    return out


def close_gaps(text: str) -> str:
    """Remove the `DROPPED` marks; the whitespace around a mark goes too when CJK characters are on both
    sides (a template cut out of Japanese or Chinese prose leaves no gap), else stays as one space."""

    def gap(m: re.Match) -> str:
        if not m.group().strip(DROPPED):
            return ""
        before, after = text[m.start() - 1 : m.start()], text[m.end() : m.end() + 1]
        return "" if is_cjk(before) and is_cjk(after) else " "

    if DROPPED not in text:
        return text
    if not _CJK.search(text):  # the whitespace is collapsed by the caller
        return text.replace(DROPPED, "")
    return _AROUND_DROPPED.sub(gap, text)
