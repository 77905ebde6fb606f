"""DataModule for BERT pretraining on Wikipedia dumps and BookCorpus."""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from datamodules.loading import SPLIT_STAGE, ResumableDataLoader, seeded_loader, stage_splits
from datamodules.masking import MLMCollator
from datamodules.predict_data import MaskedLinesCollate, TextLines
from datamodules.sections import LoaderConfig, TokenizerConfig, as_section, plain_sections
from datamodules.synthetic.sample_corpus import generate_sample_corpus
from datamodules.text.documents import BOOKCORPUS_FILES, WIKIPEDIA_FILES, ReadStats, resolve_paths
from datamodules.text.mlm_prepare import InstanceShards, PrepareSettings, iter_documents, prepare_mlm_cache
from datamodules.text.multistream import check_multistream, multistream_index
from datamodules.text.sentences import split_sentences
from datamodules.text.wikiclean import to_plain_text
from datamodules.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


class MLMInstanceDataset(Dataset):
    """Prepared instances of one split; the epoch lives in shared memory so forked workers see updates."""

    def __init__(self, folder: Path, split: str) -> None:
        self.shards = InstanceShards(folder, split)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> dict:
        tokens, a_len, nsp = self.shards[i]
        token_type_ids = np.zeros(tokens.size, dtype=np.int64)
        if a_len:
            token_type_ids[a_len:] = 1
        sample = {
            "input_ids": tokens,
            "token_type_ids": token_type_ids,
            "index": i,
            "epoch": int(self._epoch),
        }
        if a_len:  # an NSP pair; packed FULL-SENTENCES instances have no segment B
            sample["nsp_label"] = nsp
        return sample


@dataclass
class ExamplesConfig:
    """How documents become training instances (BERT's `create_pretraining_data`), and which are held out."""

    max_seq_length: int = 128
    """Tokens per instance, [CLS] and [SEP] included."""
    nsp: bool = True
    """Next-sentence-prediction pairs; False packs full sentences (RoBERTa)."""
    short_seq_prob: float = 0.1
    """Probability of a shorter target length (NSP instances)."""
    dupe_factor: int = 1
    """Times each document is turned into instances, with different segment choices."""
    lines_per_document: int = 2000
    """BookCorpus lines per document when a file has no blank-line boundaries."""
    val_fraction: float = 0.005
    """Documents held out for validation (by a stable hash of the document)."""
    test_fraction: float = 0.005
    """Documents held out for test."""


@dataclass
class MaskingConfig:
    """Which tokens the model is asked to predict."""

    mask_prob: float = 0.15
    """Fraction of tokens chosen for prediction (0.15 in BERT; 0.3 also works)."""
    whole_word: bool = False
    """Choose whole words instead of single word pieces (needs a WordPiece vocabulary)."""


@dataclass
class FillMaskPredict:
    """What `predict` fills in."""

    texts: str | None = None
    """A UTF-8 file whose lines (one sentence each) hold `[MASK]`s, filled in with the checkpoint's tokenizer;
    no corpus is read then."""
    top_k: int = 5
    """Tokens proposed per `[MASK]`, with their probabilities."""


# defaults of the sections (each DataModule works on copies of its own)
_TOKENIZER = TokenizerConfig(vocab_size=30522)
_EXAMPLES = ExamplesConfig()
_MASKING = MaskingConfig()
_LOADER = LoaderConfig(seed=12345)
_PREDICT = FillMaskPredict()


class MLMDataModule(L.LightningDataModule):
    """Reads the corpora, trains or loads the tokenizer, prepares instance shards once, serves masked batches.

    With no corpus given it generates the bundled sample corpus (a MediaWiki XML dump and BookCorpus-style
    lines) under `tokenizer.cache_dir`, so the quickstart needs no download.
    """

    def __init__(
        self,
        wikipedia: list[str] | None = None,
        bookcorpus: list[str] | None = None,
        sample_corpus: bool = False,
        prepared: str | None = None,
        tokenizer: TokenizerConfig = _TOKENIZER,
        tokenizer_train_docs: int = 200_000,
        examples: ExamplesConfig = _EXAMPLES,
        masking: MaskingConfig = _MASKING,
        language_variant: str | None = None,
        loader: LoaderConfig = _LOADER,
        num_proc: int | None = None,
        predict: FillMaskPredict = _PREDICT,
    ) -> None:
        """
        Args:
            wikipedia: MediaWiki XML dumps (.xml, .xml.bz2), WikiExtractor output, JSON lines or Parquet; paths or globs.
            bookcorpus: one-sentence-per-line files or folders of per-book .txt files; paths or globs.
            sample_corpus: use the bundled sample corpus (generated into <tokenizer.cache_dir>/sample_corpus, which
                must be new, empty or a generated sample) when no corpus is given.
            prepared: a folder of instances prepared earlier (`<cache_dir>/mlm-<key>`, holding index.json), read
                instead of the corpora, which then need not exist; its own settings (max_seq_length, nsp, ...)
                apply. To evaluate on a machine without the corpora, copy index.json and the val/ or test/
                folder: a stage opens only its own split. Needs the tokenizer the instances were made with.
            tokenizer: `path` a BERT vocab.txt or tokenizer.json, or a checkpoint (.ckpt) of this framework (the
                CLI's validate and test set it to --ckpt_path); None trains WordPiece on the corpus. Like
                BERT-uncased, `lowercase` also strips accents unless `strip_accents` is False: "Việt Nam" becomes
                "viet nam"; set it False for languages where accents carry meaning. `cache_dir` keeps the sample
                corpus, the tokenizer (under tokenizers/) and the prepared instances (under mlm-<key>/).
            tokenizer_train_docs: documents read to train the vocabulary.
            examples: instance length, NSP, duplication and the held-out fractions.
            masking: the masking rate and whole-word masking.
            language_variant: the variant whose text Wikipedia's language-variant markup keeps, e.g. zh-cn or
                zh-tw for `-{zh-cn:域;zh-tw:體}-` (a variant of the same script stands in); None keeps the first
                variant written. The rest of the text stays in the script its authors wrote.
            loader: batch sizes, workers, and the seed of instance creation and masking.
            num_proc: preprocessing processes (default: the CPUs available, at most 8); the prepared data
                is the same whatever the number.
            predict: a file of sentences with `[MASK]`s to fill in, and how many tokens to propose.
        """
        super().__init__()
        self.save_hyperparameters()
        plain_sections(self.hparams)
        self.tokenizer_config = as_section(TokenizerConfig, tokenizer)
        self.examples = as_section(ExamplesConfig, examples)
        self.masking = as_section(MaskingConfig, masking)
        self.loader_config = as_section(LoaderConfig, loader)
        self.predict_inputs = as_section(FillMaskPredict, predict)
        self.tokenizer_train_docs = tokenizer_train_docs
        self.language_variant = language_variant
        self.num_proc = num_proc
        self.cache_dir = self.tokenizer_config.cache
        self.wikipedia = list(wikipedia or [])
        self.bookcorpus = list(bookcorpus or [])
        self.prepared = Path(prepared) if prepared else None
        if self.prepared is not None:
            if not (self.prepared / "index.json").is_file():
                raise FileNotFoundError(
                    f"prepared MLM folder {self.prepared} holds no index.json: expected a <cache_dir>/mlm-<key> "
                    "folder written by an earlier run"
                )
        elif (
            not self.wikipedia
            and not self.bookcorpus
            and not (self.predict_inputs.texts and self.tokenizer_config.path)
        ):
            if not sample_corpus:
                raise ValueError(
                    "no corpus given: pass --data.wikipedia '[dump.xml.bz2, ...]' and/or --data.bookcorpus "
                    "'[books_large_p1.txt, ...]', or --data.sample_corpus true for the bundled sample"
                )
            sample = generate_sample_corpus(Path(self.cache_dir) / "sample_corpus")
            self.wikipedia, self.bookcorpus = [str(sample["wikipedia"])], [str(sample["bookcorpus"])]
        if self.prepared is None:
            # fail now, naming a missing path or a folder with no files, before any vocabulary is trained
            for path in resolve_paths(self.wikipedia, WIKIPEDIA_FILES):
                # an index that does not fit its dump stops the run here, on rank 0 (the others skip the read)
                if rank_zero_only.rank == 0 and (index := multistream_index(path)) is not None:
                    check_multistream(path, index)
            resolve_paths(self.bookcorpus, BOOKCORPUS_FILES)
        ex = self.examples
        self.settings = PrepareSettings(
            max_seq_length=ex.max_seq_length,
            nsp=ex.nsp,
            short_seq_prob=ex.short_seq_prob,
            dupe_factor=ex.dupe_factor,
            val_fraction=ex.val_fraction,
            test_fraction=ex.test_fraction,
            lines_per_document=ex.lines_per_document,
            seed=self.loader_config.seed,
            variant=language_variant,
        )
        self.folder: Path | None = None
        self.datasets: dict[str, MLMInstanceDataset] = {}

    # tokenizer --------------------------------------------------------------------------------
    def _training_texts(self):
        stats = ReadStats()
        docs = iter_documents(self.wikipedia, self.bookcorpus, stats, self.settings.lines_per_document)
        docs = itertools.islice(docs, self.tokenizer_train_docs)
        # reading and cleaning 200k Wikipedia articles takes minutes: show that it moves
        found = 0
        for doc in tqdm(docs, desc="reading documents for the tokenizer", unit=" docs"):
            sentences = split_sentences(to_plain_text(doc, self.settings.variant))
            found += len(sentences)
            yield from sentences
        if not found:  # raised inside the trainer's iterator: no vocabulary of nothing is saved
            counts = ", ".join(f"{k}={v}" for k, v in stats.as_dict().items() if v) or "nothing read"
            raise ValueError(
                f"no text found in the inputs {[*self.wikipedia, *self.bookcorpus]} ({counts}); "
                "nothing to train a tokenizer on"
            )

    @cached_property
    def tokenizer(self) -> TextTokenizer:
        """Loaded, or trained on the corpus (keyed by its files' names, sizes and times) on first use."""
        config = self.tokenizer_config
        if self.prepared is not None and not config.path:
            raise ValueError(
                f"data.prepared {self.prepared} needs the tokenizer its instances were made with: pass "
                "--ckpt_path (validate and test use the checkpoint's tokenizer) or --data.tokenizer.path"
            )
        key = None
        if not config.path:
            inputs = resolve_paths([*self.wikipedia, *self.bookcorpus])
            files = str([(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in inputs])
            key = f"{files}|{self.tokenizer_train_docs}"
            if self.language_variant:  # other text
                key += f"|{self.language_variant}"
        # vocabularies apart from the instances and the sample corpus in the same cache folder
        return replace(config, cache_dir=str(Path(self.cache_dir) / "tokenizers")).build(
            self._training_texts, key
        )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    # data -------------------------------------------------------------------------------------
    def _check_prepared(self) -> Path:
        index = json.loads((self.prepared / "index.json").read_text())
        if index.get("tokenizer") != self.tokenizer.fingerprint():
            # other ids for the same tokens: the model would be scored on text it cannot read
            raise ValueError(
                f"{self.prepared} was prepared with another tokenizer (fingerprint {index.get('tokenizer')}) than "
                f"{self.tokenizer.source} ({self.tokenizer.fingerprint()})"
            )
        return self.prepared

    def _predicting(self) -> bool:
        # fill-in of a text file needs neither the corpus nor its prepared instances
        return self.trainer is not None and self.trainer.state.fn == "predict"

    def prepare_data(self) -> None:
        if self.prepared is not None or self._predicting():
            return
        prepare_mlm_cache(
            self.wikipedia,
            self.bookcorpus,
            self.tokenizer,
            self.settings,
            self.cache_dir,
            self.num_proc,
        )

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            return
        if self.folder is None and self.prepared is not None:
            self.folder = self._check_prepared()
        elif self.folder is None:
            # prepare_data ran on rank 0; this finds its output (same key) without redoing the work
            self.folder = prepare_mlm_cache(
                self.wikipedia,
                self.bookcorpus,
                self.tokenizer,
                self.settings,
                self.cache_dir,
                self.num_proc,
            )
        for split in stage_splits(stage):  # an evaluation machine may hold no training shards
            if split in self.datasets:
                continue
            self.datasets[split] = MLMInstanceDataset(self.folder, split)
            if split != "train" and len(self.datasets[split]) == 0:
                log.warning("the %s split is empty; raise data.examples.%s_fraction", split, split)

    def set_epoch(self, epoch: int) -> None:
        if "train" in self.datasets:
            self.datasets["train"].set_epoch(epoch)

    def collator(self, eval_seed_offset: int = 0) -> MLMCollator:
        tok = self.tokenizer
        whole_word = self.masking.whole_word
        word_start = np.asarray(tok.word_starts(range(tok.vocab_size)), dtype=bool) if whole_word else None
        return MLMCollator(
            vocab_size=tok.vocab_size,
            pad_id=tok.pad_id,
            mask_id=tok.mask_id,
            special_ids=sorted(tok.special_ids),
            mask_prob=self.masking.mask_prob,
            whole_word=whole_word,
            word_start=word_start,
            seed=self.loader_config.seed + eval_seed_offset,
        )

    def _loader(self, split: str, train: bool) -> ResumableDataLoader:
        if split not in self.datasets:  # a loader asked for outside its stage (after fit, in a notebook)
            self.setup(SPLIT_STAGE[split])
        return seeded_loader(
            self.datasets[split],
            self.trainer,
            train,
            self.loader_config.batch_size if train else self.loader_config.eval_size,
            self.loader_config.seed,
            self.loader_config.num_workers,
            # evaluation masks are fixed (epoch 0, their own seed) so validation numbers are comparable
            self.collator(0 if train else 1),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        """The lines of `predict.texts`, their `[MASK]`s marked for fill-in (`MaskedLinesCollate`)."""
        if not self.predict_inputs.texts:
            raise ValueError(
                "nothing to predict: set --data.predict.texts (a text file with one sentence per line, holding "
                "[MASK] where a word is to be filled in)"
            )
        return DataLoader(
            TextLines(self.predict_inputs.texts),
            batch_size=self.loader_config.eval_size,
            num_workers=self.loader_config.num_workers,
            collate_fn=MaskedLinesCollate(
                self.tokenizer, self.examples.max_seq_length, self.predict_inputs.top_k
            ),
        )
