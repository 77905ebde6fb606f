"""GLUE sentence and sentence-pair classification from the TSV files as distributed (train.tsv, dev.tsv, test.tsv).

The GLUE test files carry no labels, so the `test` stage evaluates on the dev file (its metrics are logged as
`test/...`) and `predict` runs on the test file. Regression (STS-B) is not supported.
"""

from __future__ import annotations

import csv
import inspect
import itertools
import logging
import os
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.loading import ResumableDataLoader, seeded_loader
from datamodules.sections import LoaderConfig, TokenizerConfig, as_section, plain_sections
from datamodules.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

NO_TOKENIZER = (
    "no tokenizer: pass --model.init_ckpt (the checkpoint's tokenizer is used) or --data.tokenizer.path "
    "(vocab.txt, tokenizer.json, a Hugging Face BERT folder or a .ckpt)"
)
# the fine-tuning DataModules' section defaults (each DataModule works on copies of its own)
FINETUNE_TOKENIZER = TokenizerConfig()
FINETUNE_LOADER = LoaderConfig(num_workers=0, seed=12345)


@dataclass(frozen=True)
class GlueTask:
    """Where a task's texts and label are in its TSV files."""

    text_columns: tuple[str, ...]
    """One column (single sentence) or two (a pair, encoded `[CLS] A [SEP] B [SEP]`)."""
    label_column: str
    labels: tuple[str, ...]
    """Label strings as written in the files; the class index is the position here."""
    dev_file: str = "dev.tsv"
    test_file: str = "test.tsv"
    columns: tuple[str, ...] | None = None
    """Column names for files without a header line (CoLA's train and dev files)."""


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(
        ("sentence",), "label", ("0", "1"), columns=("source", "label", "original_label", "sentence")
    ),
    "sst2": GlueTask(("sentence",), "label", ("0", "1")),
    "mrpc": GlueTask(("#1 String", "#2 String"), "Quality", ("0", "1")),
    "qqp": GlueTask(("question1", "question2"), "is_duplicate", ("0", "1")),
    "qnli": GlueTask(("question", "sentence"), "label", ("entailment", "not_entailment")),
    "rte": GlueTask(("sentence1", "sentence2"), "label", ("entailment", "not_entailment")),
    "wnli": GlueTask(("sentence1", "sentence2"), "label", ("0", "1")),
    "mnli": GlueTask(
        ("sentence1", "sentence2"),
        "gold_label",
        ("contradiction", "entailment", "neutral"),
        dev_file="dev_matched.tsv",
        test_file="test_matched.tsv",
    ),
}
TaskName = Literal["cola", "sst2", "mrpc", "qqp", "qnli", "rte", "wnli", "mnli"]


@dataclass
class GlueExample:
    texts: tuple[str, ...]
    label: int
    """Class index; -1 in unlabelled (test) files."""
    index: int
    """The file's `index` column where it has one, else the row number."""


def read_glue_tsv(
    path: str | os.PathLike, task: GlueTask, labelled: bool = True
) -> tuple[list[GlueExample], list[str]]:
    """Examples of one GLUE TSV file and a message per skipped line ('FILE:LINE: reason').

    Fields are split on tabs with no quote handling (csv.QUOTE_NONE): GLUE texts contain bare quotes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GLUE file {path} does not exist")
    csv.field_size_limit(sys.maxsize)
    examples: list[GlueExample] = []
    skipped: list[str] = []
    with path.open(encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        first = next(rows, None)
        if first is None:
            return examples, skipped
        if set(task.text_columns) <= set(first):
            header, pending = first, []
        elif task.columns is not None:
            header, pending = list(task.columns), [first]
        else:
            raise ValueError(f"{path}: the first line is not a header with the columns {task.text_columns}")
        wanted = [*task.text_columns, *([task.label_column] if labelled else [])]
        absent = [c for c in wanted if c not in header]
        if absent:
            raise ValueError(f"{path}: no column {absent[0]!r} in the header {header}")
        text_at = [header.index(c) for c in task.text_columns]
        label_at = header.index(task.label_column) if labelled else None
        index_at = header.index("index") if "index" in header else None
        label_ids = {label: i for i, label in enumerate(task.labels)}
        first_line = 1 if pending else 2  # line numbers of the file, for messages
        for line, row in enumerate(itertools.chain(pending, rows), first_line):
            if not row:  # a blank line, e.g. at the end
                continue
            where = f"{path}:{line}"
            if len(row) != len(header):
                skipped.append(f"{where}: {len(row)} fields, the header has {len(header)}")
                continue
            label = -1
            if label_at is not None:
                if row[label_at] not in label_ids:
                    skipped.append(f"{where}: label {row[label_at]!r} is not one of {task.labels}")
                    continue
                label = label_ids[row[label_at]]
            index = int(row[index_at]) if index_at is not None and row[index_at].isdigit() else len(examples)
            examples.append(GlueExample(tuple(row[i] for i in text_at), label, index))
    if skipped:
        log.warning("%s: skipped %d malformed line(s), e.g. %s", path, len(skipped), "; ".join(skipped[:3]))
    return examples, skipped


def load_tokenizer(path: str | os.PathLike | None, lowercase: bool = True) -> TextTokenizer:
    """A vocab.txt, a tokenizer.json, a folder holding one (a Hugging Face BERT folder), or a checkpoint of this
    framework (`.ckpt`, read with weights_only=True) whose saved `tokenizer_json` is used."""
    if not path:
        raise ValueError(NO_TOKENIZER)
    return TextTokenizer.from_file(path, lowercase)


def encode_texts(
    tokenizer: TextTokenizer, texts: list[tuple[str, ...]], max_length: int
) -> tuple[list[list[int]], list[list[int]], int]:
    """`[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` ids and segment ids; pairs are cut longest-first.

    Returns the ids, the segment ids and how many examples were truncated."""
    pieces = [tokenizer.encode_batch([t[k] for t in texts]) for k in range(len(texts[0]))] if texts else []
    ids, types, truncated = [], [], 0
    cls, sep = tokenizer.cls_id, tokenizer.sep_id
    for parts in zip(*pieces):
        budget = max_length - 1 - len(parts)  # [CLS] and one [SEP] per text
        keep = [len(p) for p in parts]
        truncated += sum(keep) > budget
        while sum(keep) > budget:  # one token off the end of the longer text (the first on a tie)
            keep[keep.index(max(keep))] -= 1
        parts = [p[:n] for p, n in zip(parts, keep)]
        row, seg = [cls], [0]
        for k, p in enumerate(parts):
            row += [*p, sep]
            seg += [k] * (len(p) + 1)
        ids.append(row)
        types.append(seg)
    return ids, types, truncated


class EncodedDataset(Dataset):
    """Token ids, segment ids, label and example index per item, all in memory."""

    def __init__(
        self, ids: list[list[int]], types: list[list[int]], labels: list[int], index: list[int]
    ) -> None:
        self.ids, self.types, self.labels, self.index = ids, types, labels, index

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": self.ids[i],
            "token_type_ids": self.types[i],
            "label": self.labels[i],
            "index": self.index[i],
        }


class PadCollator:
    """Right-pads to the longest sequence of the batch."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(x["input_ids"]) for x in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        token_type_ids = torch.zeros((len(items), width), dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.bool)
        for i, x in enumerate(items):
            n = len(x["input_ids"])
            input_ids[i, :n] = torch.tensor(x["input_ids"])
            token_type_ids[i, :n] = torch.tensor(x["token_type_ids"])
            attention_mask[i, :n] = True
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "labels": torch.tensor([x["label"] for x in items]),
            "index": torch.tensor([x["index"] for x in items]),
        }


class FineTuneDataModule(L.LightningDataModule):
    """What the fine-tuning DataModules share: the tokenizer (from `hparams.tokenizer`, see `load_tokenizer`), and
    seeded, resumable loaders over `self.datasets`. A subclass sets `test_split` and `predict_split` and gives
    its `collator()`."""

    test_split = "test"
    predict_split = "test"

    def collator(self):
        raise NotImplementedError

    loader_config: LoaderConfig
    tokenizer_config: TokenizerConfig

    def _sections(self, loader: LoaderConfig | dict, tokenizer: TokenizerConfig | dict) -> None:
        """Keep the sections, and save every argument of the subclass's `__init__` (this frame's caller)."""
        self.save_hyperparameters(frame=inspect.currentframe().f_back)
        plain_sections(self.hparams)
        self.loader_config = as_section(LoaderConfig, loader)
        self.tokenizer_config = as_section(TokenizerConfig, tokenizer)
        if not self.tokenizer_config.path:
            raise ValueError(NO_TOKENIZER)

    @cached_property
    def tokenizer(self) -> TextTokenizer:
        return load_tokenizer(self.tokenizer_config.path, self.tokenizer_config.lowercase)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _loader(self, split: str, train: bool) -> ResumableDataLoader:
        return seeded_loader(
            self.datasets[split],
            self.trainer,
            train,
            self.loader_config.batch_size if train else self.loader_config.eval_size,
            self.loader_config.seed,
            self.loader_config.num_workers,
            self.collator(),
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_split, False)

    def predict_dataloader(self) -> DataLoader:
        # a plain loader: Lightning swaps in its own batch sampler to track which example each prediction is
        return DataLoader(
            self.datasets[self.predict_split],
            batch_size=self.loader_config.eval_size,
            num_workers=self.loader_config.num_workers,
            collate_fn=self.collator(),
        )


class GlueDataModule(FineTuneDataModule):
    """A GLUE task folder: train.tsv for fit, the dev file for validate and test, the test file for predict."""

    def __init__(
        self,
        root: str,
        task: TaskName = "sst2",
        tokenizer: TokenizerConfig = FINETUNE_TOKENIZER,
        max_length: int = 128,
        loader: LoaderConfig = FINETUNE_LOADER,
    ) -> None:
        """
        Args:
            root: the task folder as distributed (train.tsv, dev.tsv, test.tsv; MNLI: dev_matched.tsv, ...).
            task: which GLUE task: the columns and label set of its files.
            tokenizer: `path` a vocab.txt, tokenizer.json, a Hugging Face BERT folder, or a checkpoint (.ckpt) of
                this framework whose saved tokenizer is used (the finetune configs default it to --model.init_ckpt);
                `lowercase` lowercases text (uncased BERT) when it is a vocab.txt. Nothing is trained.
            max_length: tokens per example, special tokens included; longer pairs are cut longest-first.
            loader: batch sizes, workers (the data is tokenized in memory at setup; padding is all they do) and
                the seed of the training order.
        """
        super().__init__()
        if not Path(root).is_dir():
            raise FileNotFoundError(f"GLUE task folder {root} does not exist")
        self._sections(loader, tokenizer)
        self.task = GLUE_TASKS[task]
        self.datasets: dict[str, EncodedDataset] = {}
        self.skipped: dict[str, list[str]] = {}

    test_split = "val"  # GLUE's test labels are not public: `test` scores dev.tsv
    predict_split = "predict"

    def collator(self) -> PadCollator:
        return PadCollator(self.tokenizer.pad_id)

    @property
    def labels(self) -> list[str]:
        return list(self.task.labels)

    @property
    def num_labels(self) -> int:
        return len(self.task.labels)

    def _encode(self, split: str, file: str, labelled: bool) -> EncodedDataset:
        examples, self.skipped[split] = read_glue_tsv(Path(self.hparams.root) / file, self.task, labelled)
        ids, types, truncated = encode_texts(
            self.tokenizer, [e.texts for e in examples], self.hparams.max_length
        )
        if truncated:
            log.info(
                "%s: %d of %d examples cut to %d tokens", file, truncated, len(ids), self.hparams.max_length
            )
        return EncodedDataset(ids, types, [e.label for e in examples], [e.index for e in examples])

    def setup(self, stage: str | None = None) -> None:
        wanted = {
            "fit": [("train", "train.tsv"), ("val", self.task.dev_file)],
            "validate": [("val", self.task.dev_file)],
            "test": [("val", self.task.dev_file)],  # GLUE test labels are not public
            "predict": [("predict", self.task.test_file)],
        }
        for split, file in wanted.get(stage, wanted["fit"]):
            if split not in self.datasets:
                self.datasets[split] = self._encode(split, file, labelled=split != "predict")
