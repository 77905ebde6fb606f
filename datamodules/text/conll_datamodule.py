"""Named-entity recognition on CoNLL-2003-format files: one token per line (`token POS chunk NER`), blank
lines between sentences, `-DOCSTART-` lines between documents.

Words are split into word pieces; a word's label goes on its first piece and the other pieces get -100 (no
loss). Each batch also carries every word's gold tag and the position of its first piece, so entity scores
count whole sentences: a word cut off by `max_length` is predicted O.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from datamodules.masking import IGNORE_INDEX
from datamodules.sections import LoaderConfig, TokenizerConfig
from datamodules.text.glue_datamodule import FINETUNE_LOADER, FINETUNE_TOKENIZER, FineTuneDataModule
from datamodules.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

CONLL2003_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
# names of the splits as distributed: the original (eng.*) and the common text versions
SPLIT_FILES = {
    "train": ("train.txt", "eng.train", "train"),
    "val": ("valid.txt", "dev.txt", "eng.testa", "valid", "dev"),
    "test": ("test.txt", "eng.testb", "test"),
}


@dataclass
class Sentence:
    words: list[str]
    tags: list[str]
    line: int
    """Line of the file where the sentence starts, for messages."""


def read_conll(path: str | os.PathLike, tag_column: int = -1) -> tuple[list[Sentence], list[str]]:
    """Sentences of a CoNLL file and a message per skipped sentence ('FILE:LINE: reason').

    A sentence with a line of fewer than two columns is skipped whole (dropping one token would shift the
    tags of the others)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CoNLL file {path} does not exist")
    sentences: list[Sentence] = []
    skipped: list[str] = []
    words: list[str] = []
    tags: list[str] = []
    start, bad = 0, ""

    def close() -> None:
        nonlocal words, tags, bad
        if bad:
            skipped.append(bad)
        elif words:
            sentences.append(Sentence(words, tags, start))
        words, tags, bad = [], [], ""

    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                close()
                continue
            if not words and not bad:
                start = n
            if len(fields) < 2:
                bad = bad or f"{path}:{n}: {len(fields)} column(s), expected a token and its tags"
                continue
            words.append(fields[0])
            tags.append(fields[tag_column])
    close()  # a file without a final newline or blank line
    if skipped:
        log.warning(
            "%s: skipped %d malformed sentence(s), e.g. %s", path, len(skipped), "; ".join(skipped[:3])
        )
    return sentences, skipped


def first_piece_positions(word_ids: list[int | None], num_words: int, offset: int = 1) -> list[int]:
    """Position of each word's first word piece (+ `offset` for [CLS]); -1 for a word without one (cut off,
    or nothing left of it after normalisation)."""
    pos = [-1] * num_words
    for t, w in enumerate(word_ids):
        if w is not None and pos[w] < 0:
            pos[w] = t + offset
    return pos


def align_labels(word_pos: list[int], word_labels: list[int], length: int) -> list[int]:
    """Token labels: each word's label on its first piece, -100 everywhere else."""
    labels = [IGNORE_INDEX] * length
    for p, label in zip(word_pos, word_labels):
        if p >= 0:
            labels[p] = label
    return labels


def encode_words(
    tokenizer: TextTokenizer, sentences: list[list[str]], max_length: int
) -> tuple[list[list[int]], list[list[int]], int]:
    """`[CLS] pieces [SEP]` per sentence, first-piece positions per word, and how many sentences were cut."""
    encodings = tokenizer.tokenizer.encode_batch(sentences, is_pretokenized=True, add_special_tokens=False)
    ids, positions, truncated = [], [], 0
    for words, enc in zip(sentences, encodings):
        keep = max_length - 2
        truncated += len(enc.ids) > keep
        ids.append([tokenizer.cls_id, *enc.ids[:keep], tokenizer.sep_id])
        positions.append(first_piece_positions(enc.word_ids[:keep], len(words)))
    return ids, positions, truncated


class NERDataset(Dataset):
    def __init__(self, ids: list[list[int]], word_pos: list[list[int]], word_labels: list[list[int]]) -> None:
        self.ids, self.word_pos, self.word_labels = ids, word_pos, word_labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": self.ids[i],
            "word_pos": self.word_pos[i],
            "word_labels": self.word_labels[i],
            "index": i,  # the sentence's number, by which the prediction writer puts its tags back in the file
        }


class NERCollator:
    """Pads tokens (pad id), token labels and word labels (-100) and word positions (-1)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(x["input_ids"]) for x in items)
        words = max(len(x["word_labels"]) for x in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.bool)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        word_labels = torch.full((len(items), words), IGNORE_INDEX, dtype=torch.long)
        word_pos = torch.full((len(items), words), -1, dtype=torch.long)
        for i, x in enumerate(items):
            n, w = len(x["input_ids"]), len(x["word_labels"])
            input_ids[i, :n] = torch.tensor(x["input_ids"])
            attention_mask[i, :n] = True
            labels[i, :n] = torch.tensor(align_labels(x["word_pos"], x["word_labels"], n))
            word_labels[i, :w] = torch.tensor(x["word_labels"])
            word_pos[i, :w] = torch.tensor(x["word_pos"])
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "word_labels": word_labels,
            "word_pos": word_pos,
            "index": torch.tensor([x.get("index", -1) for x in items], dtype=torch.long),
        }


class CoNLLDataModule(FineTuneDataModule):
    """CoNLL-2003-format train / validation / test files of one folder, tagged with word pieces."""

    def __init__(
        self,
        root: str,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        labels: list[str] | None = None,
        tag_column: int = -1,
        tokenizer: TokenizerConfig = FINETUNE_TOKENIZER,
        max_length: int = 128,
        loader: LoaderConfig = FINETUNE_LOADER,
    ) -> None:
        """
        Args:
            root: folder of the split files.
            train_file: training file under root; None takes the first of train.txt, eng.train, train.
            val_file: validation file; None takes the first of valid.txt, dev.txt, eng.testa, valid, dev.
            test_file: test file; None takes the first of test.txt, eng.testb, test.
            labels: the tag set, IOB1 or IOB2 (class index = position); must equal the model's. None: CoNLL-2003's
                O, B-PER, I-PER, B-ORG, I-ORG, B-LOC, I-LOC, B-MISC, I-MISC.
            tag_column: column of the NER tag (CoNLL-2003: token POS chunk NER, the last).
            tokenizer: `path` a vocab.txt, tokenizer.json, a Hugging Face BERT folder, or a checkpoint (.ckpt) of
                this framework whose saved tokenizer is used (the finetune configs default it to --model.init_ckpt);
                `lowercase` lowercases text when it is a vocab.txt (False for a cased BERT). Nothing is trained.
            max_length: word pieces per sentence, [CLS] and [SEP] included; words beyond are predicted O.
            loader: batch sizes, workers (the data is tokenized in memory at setup) and the seed of the training
                order.
        """
        super().__init__()
        if not Path(root).is_dir():
            raise FileNotFoundError(f"CoNLL folder {root} does not exist")
        self._sections(loader, tokenizer)
        self.labels = list(labels or CONLL2003_LABELS)
        self.datasets: dict[str, NERDataset] = {}
        self.skipped: dict[str, list[str]] = {}
        self.sentences: dict[str, list[Sentence]] = {}

    def collator(self) -> NERCollator:
        return NERCollator(self.tokenizer.pad_id)

    def split_path(self, split: str) -> Path:
        root = Path(self.hparams.root)
        given = self.hparams[f"{split}_file"]
        if given:
            return root / given
        for name in SPLIT_FILES[split]:
            if (root / name).is_file():
                return root / name
        raise FileNotFoundError(f"{root} holds no {split} file (looked for {', '.join(SPLIT_FILES[split])})")

    def _encode(self, split: str) -> NERDataset:
        path = self.split_path(split)
        sentences, self.skipped[split] = read_conll(path, self.hparams.tag_column)
        self.sentences[split] = sentences
        label_ids = {tag: i for i, tag in enumerate(self.labels)}
        for s in sentences:
            unknown = [t for t in s.tags if t not in label_ids]
            if unknown:
                raise ValueError(
                    f"{path}:{s.line}: tag {unknown[0]!r} is not among the labels {self.labels} (set --data.labels "
                    "and --model.labels)"
                )
        ids, positions, truncated = encode_words(
            self.tokenizer, [s.words for s in sentences], self.hparams.max_length
        )
        if truncated:
            log.warning(
                "%s: %d of %d sentences are longer than %d word pieces; their last words are predicted O",
                path,
                truncated,
                len(sentences),
                self.hparams.max_length,
            )
        return NERDataset(ids, positions, [[label_ids[t] for t in s.tags] for s in sentences])

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, ("train", "val")):
            if split not in self.datasets:
                self.datasets[split] = self._encode(split)

    # predict: the test file, written back by the prediction writer with a predicted-tag column -------------
    def predict_file(self) -> Path:
        return self.split_path(self.predict_split)

    def predict_sentences(self) -> list[Sentence]:
        """The sentences read from `predict_file()`, in dataset order (their `line` says where each starts)."""
        if self.predict_split not in self.sentences:
            self.setup("predict")
        return self.sentences[self.predict_split]
