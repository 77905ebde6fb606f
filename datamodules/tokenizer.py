"""WordPiece tokenizer shared by every task: trained locally with the `tokenizers` library, or loaded
from a BERT `vocab.txt` / `tokenizer.json`. Nothing is downloaded.

A `vocab.txt` is turned into the same pipeline `transformers.BertTokenizerFast` builds (BERT normaliser,
BERT pre-tokeniser, WordPiece with `##` continuation, `[CLS] A [SEP] B [SEP]` template), so both tokenize
identically.

Accents: as in BERT, `lowercase=True` also strips accents ("Việt Nam" -> "viet nam"), which suits English
but erases meaning in Vietnamese, French, German...; `strip_accents=False` lowercases and keeps them.
`strip_accents=None` follows `lowercase`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from datamodules.checkpoint_file import read_checkpoint

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# the same roles (pad, unk, cls, sep, mask) as RoBERTa, XLM-R and other BPE / SentencePiece encoders name them
ROBERTA_SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<mask>")
_HF_VOCAB_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.model",
)


class TokenizerError(ValueError):
    """A vocabulary or tokenizer file that cannot be used, with the file named in the message."""


def _bert_pipeline(tok: Tokenizer, lowercase: bool, strip_accents: bool | None = None) -> Tokenizer:
    # strip_accents=None is BertNormalizer's (and BERT-uncased's) rule: strip exactly when lowercasing
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _add_template(tok: Tokenizer) -> Tokenizer:
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tok


def read_vocab_txt(path: str | os.PathLike) -> dict[str, int]:
    """Read a BERT `vocab.txt` (one token a line, the line number is the id)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise TokenizerError(f"{path}: not valid UTF-8 ({err})") from None
    vocab: dict[str, int] = {}
    for i, line in enumerate(lines):
        token = line.rstrip("\n")
        if token and token not in vocab:
            vocab[token] = i
    return vocab


def wordpiece_from_vocab(
    path: str | os.PathLike, lowercase: bool = True, strip_accents: bool | None = None
) -> Tokenizer:
    vocab = read_vocab_txt(path)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise TokenizerError(f"{path}: vocabulary lacks the special token(s) {', '.join(missing)}")
    return _wordpiece(vocab, lowercase, strip_accents)


def _wordpiece(vocab: dict[str, int], lowercase: bool, strip_accents: bool | None) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # kept whole, as BertTokenizerFast does
    return _add_template(_bert_pipeline(tok, lowercase, strip_accents))


def train_wordpiece(
    texts: Iterable[str],
    vocab_size: int = 30522,
    lowercase: bool = True,
    min_frequency: int = 2,
    strip_accents: bool | None = None,
) -> Tokenizer:
    """Train a BERT-style WordPiece vocabulary on `texts` with the Rust trainer, the same for the same texts and
    settings in every process.

    The trainer gives each continuation piece (`##a`) its id in the order it meets the words in a hash map that
    is seeded anew in every process, and breaks ties between pairs of equal count by those ids: left alone it
    picks other merges, and so other tokens, in every run. So a first pass over the texts only collects the
    continuation pieces, and the real pass receives them, in code point order, among its special tokens, which
    it numbers first. The texts are written once to a temporary file (under TMPDIR) that both passes read:
    `texts` may be a generator. The result is rebuilt from its vocabulary as `wordpiece_from_vocab` builds one,
    ids in BERT's layout: special tokens, characters, continuation characters, then the merges in order.
    """
    with tempfile.TemporaryDirectory(prefix="wordpiece-texts-") as tmp:
        spool = Path(tmp) / "texts.txt"
        with spool.open("w", encoding="utf-8") as f:
            # one text a line: a newline inside a text changes no word, since BERT's pre-tokeniser splits at
            # every whitespace
            for text in texts:
                f.write(text)
                f.write("\n")

        def trained(vocab_size: int, special_tokens: list[str]) -> dict[str, int]:
            tok = _bert_pipeline(
                Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100)),
                lowercase,
                strip_accents,
            )
            trainer = trainers.WordPieceTrainer(
                vocab_size=vocab_size,
                min_frequency=min_frequency,
                special_tokens=special_tokens,
                continuing_subword_prefix="##",
                show_progress=False,
            )
            tok.train([str(spool)], trainer=trainer)
            return tok.get_vocab(with_added_tokens=False)

        # vocab_size 0: no merge, only the special tokens, the characters and the continuation characters
        pieces = sorted(t for t in trained(0, list(SPECIAL_TOKENS)) if t.startswith("##"))
        vocab = trained(vocab_size, [*SPECIAL_TOKENS, *pieces])
    continuations = set(pieces)

    def place(token: str) -> tuple[int, int]:
        group = 0 if token in SPECIAL_TOKENS else 1 if len(token) == 1 else 2 if token in continuations else 3
        return group, vocab[token]

    ordered = sorted(vocab, key=place)
    return _wordpiece({t: i for i, t in enumerate(ordered)}, lowercase, strip_accents)


class TextTokenizer:
    """A `tokenizers.Tokenizer` with the special-token ids and batch helpers the tasks need."""

    def __init__(
        self, tokenizer: Tokenizer, source: str = "<memory>", special_tokens: Sequence[str] | None = None
    ) -> None:
        """`special_tokens`: the pad, unk, cls, sep and mask tokens; by default BERT's ([PAD] ...) or, when the
        vocabulary has none of those, RoBERTa's (<pad>, <unk>, <s>, </s>, <mask>)."""
        self.tokenizer = tokenizer
        self.source = source
        if special_tokens is None:
            bert_style = any(tokenizer.token_to_id(t) is not None for t in SPECIAL_TOKENS)
            special_tokens = SPECIAL_TOKENS if bert_style else ROBERTA_SPECIAL_TOKENS
        ids = {t: tokenizer.token_to_id(t) for t in special_tokens}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise TokenizerError(f"{source}: tokenizer lacks the special token(s) {', '.join(missing)}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (ids[t] for t in special_tokens)
        self.special_ids = frozenset(ids.values())

    # construction -------------------------------------------------------------------------------
    @classmethod
    def from_file(
        cls, path: str | os.PathLike, lowercase: bool = True, strip_accents: bool | None = None
    ) -> TextTokenizer:
        """Load a `vocab.txt`, a `tokenizer.json`, a folder holding one of them, a Hugging Face model folder (with
        tokenizer_config.json: `from_hf_folder`), or a checkpoint (`.ckpt`) of this
        framework, whose saved tokenizer is used.

        `lowercase` and `strip_accents` apply to a `vocab.txt`; a `tokenizer.json` carries its own normaliser.
        """
        path = Path(path)
        if path.is_dir() and (path / "tokenizer_config.json").is_file():
            return cls.from_hf_folder(path)
        if path.is_dir():
            for name in ("tokenizer.json", "vocab.txt"):
                if (path / name).is_file():
                    return cls.from_file(path / name, lowercase, strip_accents)
            raise FileNotFoundError(f"{path} holds neither tokenizer.json nor vocab.txt")
        if path.suffix == ".ckpt":
            return cls.from_checkpoint(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        if path.suffix == ".json":
            try:
                tok = Tokenizer.from_file(str(path))
            except Exception as err:  # the Rust error names no file
                raise TokenizerError(f"{path}: not a valid tokenizer.json ({err})") from None
            return cls(tok, str(path))
        return cls(wordpiece_from_vocab(path, lowercase, strip_accents), str(path))

    @classmethod
    def from_hf_folder(cls, folder: str | os.PathLike) -> TextTokenizer:
        """The fast tokenizer of a Hugging Face model folder (tokenizer.json, or vocab.txt / vocab.json + merges.txt
        that transformers converts), read locally, with the special tokens its tokenizer_config.json names."""
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not any((folder / name).is_file() for name in _HF_VOCAB_FILES):
            # transformers would build a tokenizer of its special tokens alone and say nothing
            raise TokenizerError(
                f"{folder} holds no vocabulary: give a folder with tokenizer.json, or vocab.txt, or vocab.json and "
                "merges.txt, or a SentencePiece model, beside tokenizer_config.json"
            )
        try:
            hf = AutoTokenizer.from_pretrained(folder, local_files_only=True, use_fast=True)
        except (OSError, ValueError) as err:
            raise TokenizerError(
                f"{folder}: no usable Hugging Face tokenizer ({str(err).splitlines()[0]}); give a folder with "
                "tokenizer.json, or vocab.txt, or vocab.json and merges.txt, and tokenizer_config.json"
            ) from None
        if not hf.is_fast:
            raise TokenizerError(f"{folder}: transformers has no fast tokenizer for it; add a tokenizer.json")
        roles = (
            hf.pad_token,
            hf.unk_token,
            hf.cls_token or hf.bos_token,
            hf.sep_token or hf.eos_token,
            hf.mask_token,
        )
        if any(t is None for t in roles):
            names = ("pad", "unk", "cls/bos", "sep/eos", "mask")
            lacking = [n for n, t in zip(names, roles) if t is None]
            raise TokenizerError(f"{folder}: the tokenizer names no {', '.join(lacking)} token")
        return cls(hf.backend_tokenizer, str(folder), [str(t) for t in roles])

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> TextTokenizer:
        """The tokenizer a checkpoint of this framework carries (`tokenizer_json`), read by `read_checkpoint`
        (weights_only; memory-mapped, so the weights are not read, only the few kilobytes of the tokenizer)."""
        path = Path(path)
        tokenizer = cls.carried_by(read_checkpoint(path, needs=()), str(path))
        if tokenizer is None:
            raise TokenizerError(
                f"{path} holds no tokenizer: pass its vocab.txt or tokenizer.json as --data.tokenizer.path"
            )
        return tokenizer

    @classmethod
    def carried_by(cls, ckpt: dict, source: str) -> TextTokenizer | None:
        """The tokenizer in a checkpoint already read (`tokenizer_json`), or None when it carries none."""
        return cls(Tokenizer.from_str(ckpt["tokenizer_json"]), source) if "tokenizer_json" in ckpt else None

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 30522,
        lowercase: bool = True,
        min_frequency: int = 2,
        strip_accents: bool | None = None,
    ) -> TextTokenizer:
        return cls(train_wordpiece(texts, vocab_size, lowercase, min_frequency, strip_accents), "<trained>")

    def save(self, folder: str | os.PathLike) -> None:
        """Write `tokenizer.json` and a BERT `vocab.txt` (ids in line order) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        vocab = self.tokenizer.get_vocab()
        by_id = sorted(vocab.items(), key=lambda kv: kv[1])
        (folder / "vocab.txt").write_text("".join(t + "\n" for t, _ in by_id), encoding="utf-8")

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()[:16]

    # use ----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids without special tokens."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def word_starts(self, ids: Sequence[int]) -> list[bool]:
        """True where a token begins a word (no `##` prefix); used by whole-word masking. Only a WordPiece
        vocabulary marks its continuation pieces so: any other (BPE, SentencePiece) is refused, since every
        token would count as a word and whole-word masking would quietly become per-token masking."""
        model = self.tokenizer.model
        if not isinstance(model, models.WordPiece):
            raise ValueError(
                f"whole-word masking needs a WordPiece vocabulary (continuation pieces marked ##); {self.source} "
                f"is a {type(model).__name__} vocabulary: set data.masking.whole_word false"
            )
        prefix = model.continuing_subword_prefix
        return [not self.tokenizer.id_to_token(i).startswith(prefix) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def __call__(self, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        """`[CLS] text [SEP]`, truncated to `max_length` and right-padded to the longest in the batch."""
        return self.pack(self.encode_batch(texts), max_length)

    def pack(self, bodies: Sequence[Sequence[int]], max_length: int) -> dict[str, torch.Tensor]:
        """Token ids without specials -> `[CLS] ids [SEP]` rows, truncated to `max_length` and right-padded to the
        longest, with their attention mask."""
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
        rows = [[self.cls_id, *ids[: max_length - 2], self.sep_id] for ids in bodies]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            attention_mask[i, : len(r)] = True
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def build_tokenizer(
    path: str | None,
    texts: Iterable[str] | Callable[[], Iterable[str]] | None,
    cache_dir: str | os.PathLike,
    vocab_size: int,
    lowercase: bool,
    key: str | None = None,
    strip_accents: bool | None = None,
) -> TextTokenizer:
    """Load `path` when given; otherwise train on `texts` once and cache the result under `cache_dir`.

    The one lazy-tokenizer helper of every DataModule: `texts` may be a function, called only when there is no
    `path`, so giving a tokenizer (or a checkpoint's) never reads the training data. `key` identifies the
    training corpus (for example a hash of its files), so a changed corpus or setting trains a new vocabulary
    instead of reusing a stale one; None keys it by the texts themselves. `strip_accents=None` strips accents
    exactly when `lowercase` (BERT-uncased); False keeps them in lowercased text.
    """
    if path:
        return TextTokenizer.from_file(path, lowercase, strip_accents)
    if callable(texts):
        texts = texts()
    if texts is None:
        raise ValueError("no tokenizer path given and no texts to train one on")
    if key is None:
        texts = list(texts)
        key = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    # the recipe is keyed too: a vocabulary of the upstream trainer alone, whose ids depend on the process, is
    # never reused
    settings: list = [key, vocab_size, lowercase, "canonical-wordpiece"]
    if (lowercase if strip_accents is None else strip_accents) != lowercase:
        # only a departure from BERT's rule is keyed: True with lowercase shares the default's vocabulary
        settings.append(f"strip_accents={strip_accents}")
    digest = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"wordpiece-{digest}"
    if (folder / "tokenizer.json").is_file():
        return TextTokenizer.from_file(folder / "tokenizer.json")
    log.info(
        "training a WordPiece vocabulary of %d tokens (lowercase=%s, strip_accents=%s)",
        vocab_size,
        lowercase,
        strip_accents,
    )
    tok = TextTokenizer.train(texts, vocab_size, lowercase, strip_accents=strip_accents)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary folder, then rename: a half-written vocabulary is never picked up.
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-wordpiece-"))
    tok.save(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process won the race; use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return TextTokenizer.from_file(folder / "tokenizer.json")
