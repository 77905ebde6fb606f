"""WordPiece tokenizer: a `vocab.txt` tokenizes exactly as `transformers.BertTokenizerFast`, plus file errors,
save/load round trips, the training cache of `build_tokenizer` and batch padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertTokenizerFast

from datamodules import tokenizer as tokenizer_module
from datamodules.tokenizer import SPECIAL_TOKENS, TextTokenizer, TokenizerError, build_tokenizer

# Training text: every script and accent the comparison texts use, so the vocabulary has real pieces
# for them (a vocabulary of [UNK]s would make every tokenizer agree).
CORPUS = [
    "Hello, World! How's it going? The quick brown fox jumps over the lazy dog.",
    "Café naïve résumé façade Zürich ÅNGSTRÖM crème brûlée señor",
    "中文字符 和 日本語 mixed with English words",
    "Ελληνικά Русский язык Português Ñandú",
    "Pretraining tokenizers tokenizes tokenization tokenized token tokens",
    "MiXeD CaSe WoRdS with UPPER and lower letters",
    "3.14159 1,000,000 2024-01-01 well... (yes) [no] {maybe} <tag> @user #hash $5 100% a&b",
    "international internationalization nationalities rationalise unbelievable",
]

TEXTS = [
    "Hello, World! How's it going?",
    "Café naïve résumé façade Zürich ÅNGSTRÖM",
    "cafe\u0301 with a combining accent",
    "中文字符 and 日本語 mixed with English",
    "Ελληνικά Русский Ñandú",
    "unknownwordxyzzy qqqq zzzz~",
    "a" * 101 + " short",
    "b" * 100 + " exactly one hundred",
    "supercalifragilistic" * 6,
    "tab\there\nnew line\r\x00null\x07bell zero\u200bwidth no\u00a0break",
    "MiXeD CaSe WoRdS tokenization INTERNATIONALIZATION",
    "well...--!?;:()[]{}<>@#$%^&*~`|\\/ 3.14159 1,000,000",
    "emoji 😀 👍🏽 ♥",
    "",
    "   \t\n  ",
]


@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """vocab.txt of an uncased (True) and a cased (False) WordPiece trained on CORPUS."""
    out = {}
    for lowercase in (True, False):
        folder = tmp_path_factory.mktemp(f"vocab-lower{lowercase}")
        TextTokenizer.train(CORPUS * 3, vocab_size=400, lowercase=lowercase, min_frequency=1).save(folder)
        out[lowercase] = folder / "vocab.txt"
    return out


def _hf(vocab: Path, lowercase: bool) -> BertTokenizerFast:
    # positional: `vocab_file` in transformers 4, `vocab` in 5 (where vocab_file= is silently ignored)
    return BertTokenizerFast(str(vocab), do_lower_case=lowercase)


@pytest.mark.parametrize("lowercase", [True, False], ids=["uncased", "cased"])
def test_vocab_txt_matches_bert_tokenizer_fast_single(vocab_files, lowercase: bool) -> None:
    ours = TextTokenizer.from_file(vocab_files[lowercase], lowercase=lowercase)
    hf = _hf(vocab_files[lowercase], lowercase)
    assert ours.vocab_size == hf.vocab_size > 100
    for text in TEXTS:
        assert ours.tokenizer.encode(text).ids == hf(text)["input_ids"], text


@pytest.mark.parametrize("lowercase", [True, False], ids=["uncased", "cased"])
def test_vocab_txt_matches_bert_tokenizer_fast_pair(vocab_files, lowercase: bool) -> None:
    ours = TextTokenizer.from_file(vocab_files[lowercase], lowercase=lowercase)
    hf = _hf(vocab_files[lowercase], lowercase)
    texts = [t for t in TEXTS if t.strip()]  # BertTokenizerFast drops an empty text_pair altogether
    for a, b in zip(texts, texts[1:] + texts[:1]):
        mine, theirs = ours.tokenizer.encode(a, b), hf(a, b)
        assert mine.ids == theirs["input_ids"], (a, b)
        assert mine.type_ids == theirs["token_type_ids"], (a, b)
        # segment B (and its closing [SEP]) is type 1; everything up to the first [SEP] is type 0
        first_sep = mine.ids.index(ours.sep_id)
        assert mine.type_ids == [0] * (first_sep + 1) + [1] * (len(mine.ids) - first_sep - 1)


def test_vocab_txt_matches_bert_tokenizer_fast_on_literal_special_tokens(vocab_files) -> None:
    ours = TextTokenizer.from_file(vocab_files[True])
    hf = _hf(vocab_files[True], True)
    text = "the [MASK] sat [SEP] there"
    assert ours.tokenizer.encode(text).ids == hf(text)["input_ids"]


def test_uncased_and_cased_vocabularies_differ_where_expected(vocab_files) -> None:
    uncased = TextTokenizer.from_file(vocab_files[True], lowercase=True)
    cased = TextTokenizer.from_file(vocab_files[False], lowercase=False)
    # uncased lowercases and strips accents before WordPiece; cased keeps both
    assert uncased.tokenizer.encode("Café", add_special_tokens=False).tokens == ["cafe"]
    assert cased.tokenizer.encode("Café", add_special_tokens=False).tokens == ["Café"]
    assert uncased.tokenizer.encode("HELLO", add_special_tokens=False).ids == (
        uncased.tokenizer.encode("hello", add_special_tokens=False).ids
    )
    # each CJK character is a word of its own; a word over 100 characters is one [UNK]
    assert cased.tokenizer.encode("中文", add_special_tokens=False).tokens == ["中", "文"]
    assert uncased.tokenizer.encode("a" * 101, add_special_tokens=False).tokens == ["[UNK]"]


def test_special_token_ids_follow_the_vocab_lines(tmp_path: Path) -> None:
    lines = ["[UNK]", "[PAD]", "hello", "[SEP]", "[CLS]", "world", "[MASK]", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = TextTokenizer.from_file(tmp_path / "vocab.txt")
    assert (tok.unk_id, tok.pad_id, tok.sep_id, tok.cls_id, tok.mask_id) == (0, 1, 3, 4, 6)
    assert tok.special_ids == {0, 1, 3, 4, 6}
    assert tok.tokenizer.encode("Hello worlds").ids == [4, 2, 5, 7, 3]
    assert tok.word_starts([2, 7, 5]) == [True, False, True]


def test_whole_word_masking_refuses_a_vocabulary_that_does_not_mark_word_pieces() -> None:
    # byte-level BPE (RoBERTa's kind): no ## pieces, every token would count as a word
    from tokenizers import Tokenizer, models

    bpe = Tokenizer(
        models.BPE(vocab={"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "<mask>": 4, "a": 5}, merges=[])
    )
    with pytest.raises(ValueError, match="whole-word masking needs a WordPiece vocabulary .* BPE vocabulary"):
        TextTokenizer(bpe, "roberta/tokenizer.json").word_starts([5])


def test_vocab_without_mask_raises_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(t for t in SPECIAL_TOKENS if t != "[MASK]") + "\nhello\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"\[MASK\]") as err:
        TextTokenizer.from_file(path)
    assert str(path) in str(err.value)


def test_missing_file_raises_naming_it(tmp_path: Path) -> None:
    for path in (tmp_path / "nowhere" / "vocab.txt", tmp_path / "absent.json"):
        with pytest.raises(FileNotFoundError) as err:
            TextTokenizer.from_file(path)
        assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError) as err:
        TextTokenizer.from_file(tmp_path)  # a folder with neither file
    assert str(tmp_path) in str(err.value)


def test_invalid_tokenizer_json_raises_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError) as err:
        TextTokenizer.from_file(path)
    assert str(path) in str(err.value)


def test_save_and_reload_give_identical_ids(tmp_path: Path) -> None:
    trained = TextTokenizer.train(CORPUS * 3, vocab_size=400, min_frequency=1)
    trained.save(tmp_path / "tok")
    from_json = TextTokenizer.from_file(tmp_path / "tok")  # the folder: tokenizer.json wins
    from_vocab = TextTokenizer.from_file(tmp_path / "tok" / "vocab.txt")
    assert from_json.source == str(tmp_path / "tok" / "tokenizer.json")
    assert from_json.fingerprint() == trained.fingerprint()
    vocab_lines = (tmp_path / "tok" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert {t: i for i, t in enumerate(vocab_lines)} == trained.tokenizer.get_vocab()
    for other in (from_json, from_vocab):
        assert other.vocab_size == trained.vocab_size
        assert (other.pad_id, other.cls_id, other.sep_id, other.mask_id) == (
            trained.pad_id,
            trained.cls_id,
            trained.sep_id,
            trained.mask_id,
        )
        assert other.encode_batch(TEXTS) == trained.encode_batch(TEXTS)
        for a, b in zip(TEXTS, TEXTS[::-1]):
            assert other.tokenizer.encode(a, b).ids == trained.tokenizer.encode(a, b).ids


def _count_training(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = TextTokenizer.train.__func__

    def counting(cls, texts, vocab_size=30522, lowercase=True, min_frequency=2, strip_accents=None):
        calls.append(vocab_size)
        return real(cls, texts, vocab_size, lowercase, min_frequency, strip_accents)

    monkeypatch.setattr(tokenizer_module.TextTokenizer, "train", classmethod(counting))
    return calls


def test_build_tokenizer_trains_once_per_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_training(monkeypatch)
    cache = tmp_path / "cache"
    first = build_tokenizer(None, iter(CORPUS * 3), cache, vocab_size=300, lowercase=True, key="corpus-a")
    assert calls == [300]
    folders = sorted(p.name for p in cache.iterdir())
    assert len(folders) == 1 and folders[0].startswith("wordpiece-")
    mtime = (cache / folders[0] / "tokenizer.json").stat().st_mtime_ns

    # same key: loaded from the cache, even with no usable texts
    again = build_tokenizer(None, iter([]), cache, vocab_size=300, lowercase=True, key="corpus-a")
    assert calls == [300]
    assert again.fingerprint() == first.fingerprint()
    assert (cache / folders[0] / "tokenizer.json").stat().st_mtime_ns == mtime

    # a different key, vocabulary size or casing trains a new vocabulary in a new folder
    build_tokenizer(None, iter(CORPUS * 3), cache, vocab_size=300, lowercase=True, key="corpus-b")
    build_tokenizer(None, iter(CORPUS * 3), cache, vocab_size=250, lowercase=True, key="corpus-a")
    build_tokenizer(None, iter(CORPUS * 3), cache, vocab_size=300, lowercase=False, key="corpus-a")
    assert calls == [300, 300, 250, 300]
    assert len([p for p in cache.iterdir() if p.name.startswith("wordpiece-")]) == 4
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp")]


def test_build_tokenizer_loads_a_given_path_without_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vocab_files
) -> None:
    calls = _count_training(monkeypatch)
    tok = build_tokenizer(str(vocab_files[True]), None, tmp_path, vocab_size=10, lowercase=True)
    assert calls == []
    assert tok.vocab_size == TextTokenizer.from_file(vocab_files[True]).vocab_size
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="no texts"):
        build_tokenizer(None, None, tmp_path, vocab_size=300, lowercase=True)


def test_call_truncates_pads_and_masks(vocab_files) -> None:
    tok = TextTokenizer.from_file(vocab_files[True])
    texts = ["the quick brown fox jumps over the lazy dog", "hello", ""]
    body = tok.encode_batch(texts)
    assert len(body[0]) > 6 and len(body[1]) >= 1 and body[2] == []

    out = tok(texts, max_length=8)
    assert out["input_ids"].dtype == torch.long and out["attention_mask"].dtype == torch.bool
    assert out["input_ids"].shape == (3, 8)  # the longest row after truncation
    assert out["input_ids"][0].tolist() == [tok.cls_id, *body[0][:6], tok.sep_id]
    n1 = len(body[1]) + 2
    assert out["input_ids"][1, :n1].tolist() == [tok.cls_id, *body[1], tok.sep_id]
    assert (out["input_ids"][1, n1:] == tok.pad_id).all()
    assert out["input_ids"][2].tolist() == [tok.cls_id, tok.sep_id] + [tok.pad_id] * 6
    assert out["attention_mask"].sum(1).tolist() == [8, n1, 2]
    assert out["attention_mask"][1].tolist() == [True] * n1 + [False] * (8 - n1)

    # no truncation needed: width is the longest row, not max_length
    short = tok(["hello", ""], max_length=64)
    assert short["input_ids"].shape == (2, n1)
    assert short["attention_mask"].tolist() == [[True] * n1, [True, True] + [False] * (n1 - 2)]
